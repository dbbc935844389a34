"""tracegate: an identity-aware reverse proxy in front of Lightstep's OTLP ingest."""

__version__ = "0.1.0"
