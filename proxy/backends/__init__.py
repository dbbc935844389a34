"""Backends: where a service account's telemetry goes, and how it authenticates there.

One profile per backend (``profiles``: Lightstep, the default, then Honeycomb, Grafana
Cloud, Datadog, New Relic, Dynatrace, Elastic, Splunk and a generic OTLP endpoint), data
from each vendor's own documentation: per signal the OTLP/HTTP URL, the gRPC target or
none, whether OTLP/JSON is accepted, and the headers with the credential's shape. Native
deployment-event requests per vendor (``native``). A new backend is a profile here, read
by the one forwarder, the one gRPC upstream and the one authz answer.

Below policy (the loader validates a service account's backend fields with it); imports
only the shared leaves (secrets, urls).
"""
