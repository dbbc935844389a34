"""``tracegate`` — serve, check, explain, demo, dev.

Exit codes: 0 success (explain: allowed); 1 policy errors (check) or a denial (explain);
2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.ci.explain_ci import is_ci
from proxy.errors import ConfigError, PolicyLoadError
from proxy.observe import logs
from proxy.policy import decide, load_policy
from proxy.policy.limits import limit_lines
from proxy.policy.model import SIGNALS, Policy, ServiceAccount
from proxy.run import gateway_config
from proxy.secrets import SecretRef
from proxy.settings.config import OPTIONS, Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracegate", description="Identity-aware OTLP proxy for Lightstep.")
    parser.add_argument("--version", action="version", version=f"tracegate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    for option in OPTIONS:
        if option.flag:
            default = option.default or "unset"
            serve.add_argument(option.flag_name, dest=option.field, help=f"{option.help} [{option.env}, {default}]")
    check = sub.add_parser("check", help="validate a policy repository (secrets need not be present)")
    check.add_argument("directory", nargs="?", default="policies", help="the policy directory (default: ./policies)")
    check.add_argument("--strict", action="store_true", help="exit 1 on warnings too (rules binding weakly)")
    check.add_argument(
        "--gateway",
        choices=("yes", "no"),
        help="whether the gateway door (TRACEGATE_AUTHZ_LISTEN) serves this policy: yes makes a rule that "
        "reaches a stamping account an error (default: yes if TRACEGATE_AUTHZ_LISTEN is set, else a note)",
    )
    explain = sub.add_parser("explain", help="show which rule and service account a claim set gets")
    explain.add_argument("directory")
    what = explain.add_mutually_exclusive_group(required=True)
    what.add_argument("--claims", help="JSON file with a token's claims (iss selects the issuer)")
    what.add_argument(
        "--payload",
        help="JSON file with a GitLab, Gitea or Forgejo webhook payload; its forge and event are detected from "
        "it (GitLab's object_kind; Gitea's and Forgejo's shape) unless --source/--event say",
    )
    explain.add_argument("--signal", choices=SIGNALS, help="with --claims: check the account may send this signal")
    explain.add_argument(
        "--event",
        help="with --payload: the X-Gitea-Event (push, create, release, workflow_run, workflow_job) or, "
        "for gitlab, pipeline / job (default: detected from the payload; push if it cannot tell)",
    )
    explain.add_argument(
        "--source",
        choices=("gitea", "forgejo", "gitlab", "github"),
        help="with --payload: the forge (default: detected, gitlab from object_kind, gitea from Gitea's shape; "
        "Forgejo sends the same shape, so say forgejo for a source: forgejo entry)",
    )
    sub.add_parser("demo", help="run a local issuer, sink and tracegate, and send a real trace through")
    aws_token = sub.add_parser(
        "aws-token",
        help="print a signed sts:GetCallerIdentity request for an aws issuer (AWS credentials from "
        "botocore's default chain)",
    )
    aws_token.add_argument("--server-id", required=True, help="the issuer's server_id (X-Tracegate-Server-ID)")
    aws_token.add_argument(
        "--sts-endpoint", default="https://sts.amazonaws.com", help="one of the issuer's sts_endpoints [global]"
    )
    aws_token.add_argument("--region", help="the signing region [the endpoint's; us-east-1 for the global one]")
    aws_token.add_argument(
        "--format",
        choices=("header", "token", "otel"),
        default="header",
        help="header: 'Bearer aws-sts.…' (the Authorization value); token: without 'Bearer '; "
        "otel: 'authorization=Bearer%%20aws-sts.…' for OTEL_EXPORTER_OTLP_HEADERS [header]",
    )
    from proxy.dev.loop import add_dev_parser

    add_dev_parser(sub)
    gateway_config.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = dict(os.environ) if environ is None else environ
    try:
        if args.command == "serve":
            return _serve(args, env)
        if args.command == "check":
            gateway = {"yes": True, "no": False}.get(args.gateway or "", "TRACEGATE_AUTHZ_LISTEN" in env or None)
            return _check(Path(args.directory), strict=args.strict, gateway=gateway)
        if args.command == "explain" and args.payload:
            source, event = _payload_forge(Path(args.payload), args.source, args.event)
            if is_ci(source, event):
                return _explain_ci(Path(args.directory), Path(args.payload), event, source)
            return _explain_webhook(Path(args.directory), Path(args.payload), event, source)
        if args.command == "explain":
            return _explain(Path(args.directory), Path(args.claims), args.signal, env)
        if args.command == "aws-token":
            return _aws_token(args)
        if args.command == "gateway-config":
            return gateway_config.main(args, env)
        if args.command == "dev":
            from proxy.dev.loop import run_dev_command

            return run_dev_command(args, env)
        from proxy.dev.demo import run_demo

        return asyncio.run(run_demo())
    except ConfigError as exc:
        print(f"tracegate: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    # gRPC's C core writes plain-text INFO lines (failed handshakes, GOAWAYs) to stderr, where
    # tracegate's logs are JSON; it reads this before grpc is first imported. Errors still show.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from proxy.run.server import run

    flags = {o.field: getattr(args, o.field) for o in OPTIONS if o.flag}
    settings = Settings.load(flags, environ)
    logs.configure(settings.log_level)
    return run(settings, environ)


def _aws_token(args: argparse.Namespace) -> int:
    """Sign now, with botocore's default credential chain (which reads the process's own
    environment and files: env keys, profiles, SSO, web identity/IRSA, ECS, instance metadata)."""
    from proxy.urls import check_url

    problem = check_url(args.sts_endpoint)
    if problem:
        raise ConfigError(f"--sts-endpoint: {problem}")
    try:
        import botocore.session
    except ImportError:
        raise ConfigError("aws-token needs botocore: pip install botocore") from None
    from proxy.identity.aws import presign

    credentials = botocore.session.get_session().get_credentials()
    if credentials is None:
        raise ConfigError("no AWS credentials found (botocore's default chain: env, profile, SSO, IRSA, ECS, IMDS)")
    token = presign(
        credentials.get_frozen_credentials(), server_id=args.server_id, endpoint=args.sts_endpoint, region=args.region
    )
    print({"header": f"Bearer {token}", "token": token, "otel": f"authorization=Bearer%20{token}"}[args.format])
    return 0


def _load_unresolved(directory: Path, command: str = "explain") -> Policy | None:
    if not directory.is_dir():  # the loader's message names serve's --policies
        default = (
            " (with no PATH, check reads ./policies)" if (command, directory) == ("check", Path("policies")) else ""
        )
        print(f"{directory}: not a directory{default}; name the policy folder: tracegate {command} PATH")
        print("1 problem(s) found", file=sys.stderr)
        return None
    try:
        return load_policy(directory, environ={}, resolve_secrets=False)
    except PolicyLoadError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        return None


def _check(directory: Path, *, strict: bool = False, gateway: bool | None = None) -> int:
    """``gateway``: whether the gateway door serves this policy (None: not known)."""
    from proxy.policy.lint import gateway_refusals, warnings

    policy = _load_unresolved(directory, "check")
    if policy is None:
        return 1
    print(
        f"ok: {len(policy.files)} file(s), {len(policy.issuers) + len(policy.aws_issuers)} issuer(s), "
        f"{len(policy.service_accounts)} service account(s), {len(policy.rules)} rule(s), "
        f"{len(policy.webhooks)} webhook(s)"
    )
    found = warnings(policy)
    for warning in found:
        print(warning)
    refused = gateway_refusals(policy, known=True) if gateway else []
    for error in refused:
        print(error)
    if gateway is None:
        for note in gateway_refusals(policy, known=False):
            print(note)
    return 1 if refused or (strict and found) else 0


def _payload_forge(path: Path, source: str | None, event: str | None) -> tuple[str, str]:
    """(source, event) for ``explain --payload``: as given, else told by the payload. GitLab
    names its kind in ``object_kind``; Gitea and Forgejo (one shape: gitea is assumed) by the
    object their event carries. Raises ConfigError when neither is given nor can be told."""
    payload = _read_object(path, "payload")
    kind = payload.get("object_kind")
    found: tuple[str, str] | None = None
    if isinstance(kind, str):
        found = "gitlab", {"pipeline": "pipeline", "build": "job"}.get(kind, kind)
    elif isinstance(payload.get("repository"), dict):
        carried = [k for k in ("workflow_job", "workflow_run", "release") if isinstance(payload.get(k), dict)]
        shape = carried[0] if carried else "create" if "ref_type" in payload else "push" if "after" in payload else None
        found = ("gitea", shape) if shape else None
    if source is None and found is None:
        raise ConfigError(
            f"{path}: cannot tell the forge from the payload (a GitLab one carries object_kind; a Gitea or Forgejo "
            "one a repository and workflow_run, workflow_job, release, ref_type or after): pass --source and --event"
        )
    source = source or (found[0] if found else "gitea")
    if event is None:  # a detected event holds for the forge family it was detected for only
        event = found[1] if found and (found[0] == "gitlab") == (source == "gitlab") else "push"
    return source, event


def _read_object(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: the {what} must be a JSON object")
    return value


def _explain(directory: Path, claims_file: Path, signal: str | None, environ: Mapping[str, str]) -> int:
    policy = _load_unresolved(directory)
    if policy is None:
        return 1
    claims = _read_object(claims_file, "claims")
    issuer = policy.issuer_by_url(str(claims.get("iss", "")))
    if issuer is None:
        known = ", ".join(f"{i.name}={i.issuer}" for i in policy.issuers.values())
        print(f"denied (unknown-issuer): iss {claims.get('iss')!r} is not a configured issuer ({known})")
        return 1
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    if not any(a in issuer.audiences for a in auds):
        print(
            f"note: aud {aud!r} holds none of {list(issuer.audiences)}; "
            "a real token would be refused (audience-mismatch)"
        )
    decision = decide(policy, issuer.name, claims, signal, explain=True)
    print(f"issuer: {issuer.name} ({issuer.issuer})")
    for line in decision.trace:
        print(f"  {line}")
    if decision.allowed and decision.account is not None and decision.rule is not None:
        account = decision.account
        print(
            f"allowed ({decision.reason}): rule {decision.rule.name!r} at {decision.rule.where} "
            f"→ service account {account.name!r} (signals: {', '.join(sorted(account.signals))}; "
            f"{_credential_sources(account)})"
        )
        for line in [*_backend_lines(account, signal, environ), *limit_lines(account, decision.rule)]:
            print(f"  {line}")
        if account.stamp:
            from proxy.upstream.stamp import stamp_values

            for key, value in stamp_values(account.stamp, claims):
                print(f"  stamps {key} = {value!r}" if value is not None else f"  stamps {key}: removed (no claim)")
        return 0
    rule = f" by rule {decision.rule.name!r} at {decision.rule.where}" if decision.rule else ""
    print(f"denied ({decision.reason}){rule}")
    return 1


def _credential_sources(account: ServiceAccount) -> str:
    """Where the account's secrets are read from (references, never values)."""
    spec = account.backend
    refs = [(p, r) for p, r in spec.credentials.items() if isinstance(r, SecretRef)] if spec is not None else []
    if spec is None or [p for p, _ in refs] == ["access_token"]:
        return f"key from {account.access_token_ref}"
    return "credentials from " + ", ".join(f"{p.removeprefix('header:')} {r}" for p, r in refs)


def _backend_lines(account: ServiceAccount, signal: str | None, environ: Mapping[str, str]) -> list[str]:
    """Where each signal of ``account`` goes, as ``serve`` with this environment would send it:
    the OTLP/HTTP URL, what its gRPC clients reach, and the header *names* (a preview: no
    secret is read, and no value is ever printed)."""
    from proxy.backends.profiles import BackendSpec, preview
    from proxy.gate.runtime import backend_defaults

    defaults = backend_defaults(Settings.load({}, environ))  # TRACEGATE_UPSTREAM & co., which lightstep honours
    spec = account.backend or BackendSpec("lightstep", upstream=account.upstream, grpc_upstream=account.grpc_upstream)
    routes = preview(spec, defaults).routes
    lines = [f"backend: {spec.backend} (header names only; values are never shown)"]
    for name in SIGNALS:
        route = routes.get(name)
        if route is None or name not in account.signals or signal not in (None, name):
            continue
        bridged = account.upstream_protocol == "http" or route.grpc is None  # as the gRPC door decides
        grpc = "bridged to OTLP/HTTP (protobuf)" if bridged else route.grpc
        body = "protobuf or JSON" if route.json else "protobuf only"
        lines.append(
            f"  {name}: {route.url} ({body}); gRPC clients: {grpc}; headers: {', '.join(route.header_names())}"
        )
    return lines


def _explain_webhook(directory: Path, payload_file: Path, event: str, source: str) -> int:
    from proxy.ci.gitea import Classified, classify, repository_name

    policy = _load_unresolved(directory)
    if policy is None:
        return 1
    payload = _read_object(payload_file, "payload")
    repository = repository_name(payload)
    hooks = [h for h in policy.webhooks if h.source == source and repository and h.repository.match_text(repository)]
    print(f"{source} {event} for repository {repository!r} (signatures are not checked by explain)")
    if not hooks:
        print("refused (unknown-repository): no webhooks entry names it → 401, answered as a wrong signature")
        return 1
    hook = hooks[0]
    print(f"  entry {hook.name!r} at {hook.where}; secrets: {', '.join(str(r) for r in hook.secret_refs)}")
    classified = classify(source, event, "explain", payload)
    if not isinstance(classified, Classified):
        reason = classified.reason
    elif classified.kind not in hook.events:
        reason = "event-not-listed"
    elif not hook.refs.match_text(classified.ref):
        reason = f"ref-not-listed ({classified.ref} not in {list(hook.refs.patterns)})"
    else:
        marker = classified.marker
        print(
            f"marker ({classified.kind}): services {', '.join(hook.services)} get service.version={marker.revision} "
            f"({marker.ref_type} {marker.ref_name}) via service account {hook.service_account!r} → 202"
        )
        return 0
    print(f"no marker ({reason}) → 202, nothing sent")
    return 1


def _explain_ci(directory: Path, payload_file: Path, event: str, source: str) -> int:
    from proxy.ci.explain_ci import explain

    policy = _load_unresolved(directory)
    if policy is None:
        return 1
    return explain(policy, _read_object(payload_file, "payload"), event, source, print)
