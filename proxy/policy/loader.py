"""Policy loading: a directory of YAML files → one checked, immutable :class:`Policy`.

Every problem found is collected (not just the first) and raised together as a
:class:`PolicyLoadError`, each naming the file, the line and what to do. Secret values
are read only when ``resolve_secrets`` is true (``tracegate serve``); ``tracegate check``
checks their references for form only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proxy.backends.native import NATIVE_KEYS, parse_native, resolve_token
from proxy.backends.profiles import BACKEND_KEYS, parse_backend, resolve_credentials
from proxy.errors import PolicyLoadError, PolicyProblem
from proxy.policy.checker import Checker
from proxy.policy.limits import parse_limits
from proxy.policy.matchers import Matcher
from proxy.policy.model import (
    ALLOWED_ALGORITHMS,
    DEFAULT_STS_ENDPOINTS,
    MAX_AWS_MAX_AGE,
    SIGNALS,
    AwsIssuer,
    Issuer,
    Policy,
    Rule,
    ServiceAccount,
    Signal,
    Where,
    endpoint_origin,
)
from proxy.policy.source import LDict, read_document
from proxy.policy.stamps import parse_stamp
from proxy.policy.webhooks import metrics_problems, native_problems, parse_webhooks
from proxy.secrets import SecretRef
from proxy.urls import check_url

TOP_LEVEL = ("issuers", "service_accounts", "rules", "webhooks")
#: Claims that identify a project or person; a bare ``*`` on them needs ``allow_any: true``.
BROAD_CLAIMS = ("project_path", "namespace_path", "sub")
#: An ``aws`` issuer's ``server_id``: sent as a signed header, so visible ASCII, no spaces.
_SERVER_ID = re.compile(r"^[\x21-\x7e]{1,256}$")
#: What binds an ``aws`` allow rule to accounts: exact account ids, or ARNs in a fixed account.
_AWS_ACCOUNT = re.compile(r"^\d{12}$")
_AWS_ARN_IN_ACCOUNT = re.compile(r"^arn:aws[a-z-]*:(?:iam|sts)::\d{12}:")


def policy_files(directory: Path) -> list[Path]:
    """Every ``*.yaml`` / ``*.yml`` below ``directory``, hidden folders skipped, sorted by
    relative path: the order in which rules are tried."""
    found = [
        p
        for p in directory.rglob("*")
        if p.suffix in (".yaml", ".yml")
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def load_policy(
    directory: str | Path,
    *,
    environ: Mapping[str, str],
    resolve_secrets: bool = True,
) -> Policy:
    """Load and check every policy file in ``directory``. Raises :class:`PolicyLoadError`."""

    root = Path(directory)
    if not root.is_dir():
        raise PolicyLoadError([PolicyProblem(str(root), 1, "not a directory; point --policies at the policy folder")])
    files = policy_files(root)
    if not files:
        raise PolicyLoadError([PolicyProblem(str(root), 1, "no *.yaml files here; add at least one policy file")])

    problems: list[PolicyProblem] = []
    issuers: dict[str, Issuer] = {}
    aws_issuers: dict[str, AwsIssuer] = {}
    accounts: dict[str, ServiceAccount] = {}
    rules: list[Rule] = []
    webhooks = []
    rule_names: dict[str, Where] = {}
    #: Every name written under issuers:/service_accounts:, loaded or not: a rule naming one
    #: that failed to load is not reported again as "unknown" (its root cause already is).
    defined: dict[str, set[str]] = {"issuers": set(), "service_accounts": set()}
    for path in files:
        shown = str(path)
        doc, read_problems = read_document(path, shown)
        problems += read_problems
        if doc is None:
            continue
        check = Checker(shown)
        top = check.mapping(doc, 1, "a policy file")
        if top is not None:
            check.keys(top, TOP_LEVEL, (), "a policy file")
            for section, names in defined.items():
                names.update(_section_names(top, section))
            _issuers(check, top, issuers, aws_issuers)
            _accounts(check, top, accounts, environ if resolve_secrets else None)
            for rule in _rules(check, top):
                if rule.name in rule_names:
                    check.add(
                        rule.where.line,
                        f"rule {rule.name!r} is also defined at {rule_names[rule.name]}; names must be unique",
                    )
                rule_names[rule.name] = rule.where
                rules.append(rule)
            webhooks += parse_webhooks(
                check, top.get("webhooks"), top.line_of("webhooks"), environ if resolve_secrets else None
            )
        problems += check.problems

    problems += _cross_check({**issuers, **aws_issuers}, accounts, rules, webhooks, defined)
    problems += _aws_cross_check(aws_issuers, rules)
    if problems:
        raise PolicyLoadError(problems)
    return Policy(issuers, accounts, tuple(rules), tuple(webhooks), tuple(str(f) for f in files), aws_issuers)


def _section_names(top: LDict, key: str) -> tuple[str, ...]:
    section = top.get(key)
    return tuple(str(name) for name in section) if isinstance(section, LDict) else ()


def _issuers(check: Checker, top: LDict, out: dict[str, Issuer], aws_out: dict[str, AwsIssuer]) -> None:
    section = top.get("issuers")
    if section is None:
        return
    section = check.mapping(section, top.line_of("issuers"), "issuers")
    for name, entry in (section or {}).items():
        line = section.line_of(name) if section is not None else 0
        what = f"issuer {name!r}"
        if name in out or name in aws_out:
            check.add(line, f"{what} is also defined at {(out.get(name) or aws_out[name]).where}; names must be unique")
            continue
        entry = check.mapping(entry, line, what)
        if entry is None:
            continue
        kind = entry.get("kind", "oidc")
        if kind == "aws":
            aws = _aws_issuer(check, str(name), entry, line, what)
            if aws is not None:
                aws_out[name] = aws
            continue
        if kind != "oidc":
            check.add(entry.line_of("kind"), f"{what}.kind must be oidc (the default) or aws, not {kind!r}")
            continue
        check.keys(
            entry, ("kind", "issuer", "audiences", "jwks_uri", "algorithms"), ("issuer", "audiences"), what, line
        )
        url = check.url(entry, "issuer", what)
        audiences = check.strings(entry, "audiences", what)
        jwks_uri = check.url(entry, "jwks_uri", what)
        algorithms = check.strings(entry, "algorithms", what) or ("RS256",)
        for alg in algorithms:
            if alg not in ALLOWED_ALGORITHMS:
                check.add(
                    entry.line_of("algorithms"),
                    f"{what}: algorithm {alg!r} is not allowed; use one of {', '.join(ALLOWED_ALGORITHMS)}",
                )
        if url and audiences:
            if url.endswith("/"):
                check.add(
                    entry.line_of("issuer"), f"{what}: remove the trailing '/'; iss must equal the issuer exactly"
                )
            out[name] = Issuer(name, url, audiences, jwks_uri, algorithms, check.where(line))


def _aws_issuer(check: Checker, name: str, entry: LDict, line: int, what: str) -> AwsIssuer | None:
    """``kind: aws``: ``server_id`` (required), ``sts_endpoints`` (default: the global
    endpoint), ``max_age`` (seconds, default and most 900)."""
    check.keys(entry, ("kind", "server_id", "sts_endpoints", "max_age"), ("server_id",), what, line)
    server_id = check.string(entry, "server_id", what)
    if server_id is not None and not _SERVER_ID.match(server_id):
        check.add(
            entry.line_of("server_id"),
            f"{what}.server_id must be 1-256 visible ASCII characters, no spaces (it is a signed header's value)",
        )
        server_id = None
    endpoints: list[str] = []
    for url in check.strings(entry, "sts_endpoints", what) or DEFAULT_STS_ENDPOINTS:
        problem = check_url(url)
        if problem is None and url.split("://", 1)[1].rstrip("/").count("/"):
            problem = f"{url!r} must be an origin (https://sts.REGION.amazonaws.com), without a path"
        if problem is not None:
            check.add(entry.line_of("sts_endpoints"), f"{what}.sts_endpoints: {problem}")
            return None
        endpoints.append(endpoint_origin(url))
    max_age = entry.get("max_age", MAX_AWS_MAX_AGE)
    if isinstance(max_age, bool) or not isinstance(max_age, int) or not 1 <= max_age <= MAX_AWS_MAX_AGE:
        check.add(
            entry.line_of("max_age"),
            f"{what}.max_age must be whole seconds from 1 to {MAX_AWS_MAX_AGE} "
            f"(AWS refuses a signature older than that), not {max_age!r}",
        )
        return None
    if server_id is None:
        return None
    return AwsIssuer(
        name, f"aws:{name}", (server_id,), server_id, tuple(dict.fromkeys(endpoints)), max_age, check.where(line)
    )


def _accounts(check: Checker, top: LDict, out: dict[str, ServiceAccount], environ: Mapping[str, str] | None) -> None:
    section = top.get("service_accounts")
    if section is None:
        return
    section = check.mapping(section, top.line_of("service_accounts"), "service_accounts")
    for name, entry in (section or {}).items():
        line = section.line_of(name) if section is not None else 0
        what = f"service account {name!r}"
        if name in out:
            check.add(line, f"{what} is also defined at {out[name].where}; names must be unique")
            continue
        entry = check.mapping(entry, line, what)
        if entry is None:
            continue
        check.keys(
            entry,
            (
                "access_token",
                "signals",
                "upstream",
                "grpc_upstream",
                "upstream_protocol",
                "stamp",
                "limits",
                *BACKEND_KEYS,
                *NATIVE_KEYS,
            ),
            (),
            what,
            line,
        )
        spec, backend_problems = parse_backend(entry)
        for problem in backend_problems:
            if problem.key in ("upstream", "grpc_upstream") and problem.message.startswith(f"{problem.key}:"):
                continue  # a malformed URL: reported below, by the checker, as every URL in a policy is
            # "access_token is written inline…" reads as service account 'x'.access_token …
            named = problem.message.startswith((f"{problem.key} ", f"{problem.key}:"))
            message = f"{what}.{problem.message}" if named else f"{what}: {problem.message}"
            check.add(entry.line_of(problem.key) if problem.key in entry else line, message)
        ref = spec.credentials.get("access_token") if spec is not None else None
        signals = check.strings(entry, "signals", what) or SIGNALS
        bad = [s for s in signals if s not in SIGNALS]
        if bad:
            check.add(entry.line_of("signals"), f"{what}: unknown signal {bad[0]!r}; use traces, metrics or logs")
        upstream = check.url(entry, "upstream", what)
        stamp = parse_stamp(check, entry["stamp"], entry.line_of("stamp"), what) if "stamp" in entry else ()
        limits = parse_limits(check, entry["limits"], entry.line_of("limits"), what) if "limits" in entry else None
        grpc_upstream = check.grpc_target(entry, "grpc_upstream", what)
        protocol = entry.get("upstream_protocol", "grpc")
        if protocol not in ("grpc", "http"):
            check.add(entry.line_of("upstream_protocol"), f"{what}.upstream_protocol must be grpc or http")
            protocol = "grpc"
        if spec is None or stamp is None:
            continue
        # The keys of its native deployment events, as written; what markers: [native] needs
        # is checked against the webhook entries asking for it (webhooks.native_problems).
        native, native_found = parse_native(entry, spec, wanted=False)
        for problem in native_found:
            named = problem.message.startswith((f"{problem.key} ", f"{problem.key}:"))
            message = f"{what}.{problem.message}" if named else f"{what}: {problem.message}"
            check.add(entry.line_of(problem.key) if problem.key in entry else line, message)
        credentials = None
        native_token = None
        if environ is not None:
            credentials, unresolved = resolve_credentials(spec, environ)
            if native is not None:
                native_token, token_found = resolve_token(native, environ)
                unresolved += token_found
            for problem in unresolved:
                check.add(entry.line_of(problem.key) if problem.key in entry else line, f"{what}.{problem.message}")
        token = credentials.get("access_token") if credentials is not None else None
        # Signals: as written (unknown names were reported above), within what the backend accepts.
        sigs: frozenset[Signal] = frozenset(s for s in SIGNALS if s in signals and s in spec.signals)
        out[name] = ServiceAccount(
            name,
            ref if isinstance(ref, SecretRef) else None,
            sigs,
            upstream,
            check.where(line),
            token,
            stamp,
            grpc_upstream=grpc_upstream,
            upstream_protocol=protocol,
            backend=spec,
            credentials=credentials,
            native=native,
            native_token=native_token,
            limits=limits,
        )


def _rules(check: Checker, top: LDict) -> list[Rule]:
    rules = []
    entries = check.named_entries(
        top.get("rules"), top.line_of("rules"), "rule", "rules must be a list of rules (- name: …)"
    )
    for entry, name, what in entries:
        check.keys(
            entry,
            ("name", "issuer", "effect", "when", "service_account", "allow_any", "services", "limits"),
            ("name", "issuer"),
            what,
        )
        effect = entry.get("effect", "allow")
        if effect not in ("allow", "deny"):
            check.add(entry.line_of("effect"), f"{what}: effect must be allow or deny")
            continue
        allow_any = entry.get("allow_any", False)
        if not isinstance(allow_any, bool):
            check.add(entry.line_of("allow_any"), f"{what}: allow_any must be true or false")
            continue
        account = check.string(entry, "service_account", what)
        if effect == "allow" and account is None and "service_account" not in entry:
            check.add(entry.line, f"{what} allows but names no service_account; add one or set effect: deny")
        if effect == "deny" and "service_account" in entry:
            check.add(entry.line_of("service_account"), f"{what} denies; remove service_account")
        when = _when(check, entry, what, allow_any)
        services = check.strings(entry, "services", what) or ()
        issuer = check.string(entry, "issuer", what)
        limits = parse_limits(check, entry["limits"], entry.line_of("limits"), what) if "limits" in entry else None
        if effect == "deny" and "limits" in entry:
            check.add(entry.line_of("limits"), f"{what} denies; remove limits (they apply to what a rule allows)")
        if issuer is None or when is None:
            continue
        rules.append(Rule(name, issuer, effect, when, account, services, check.where(entry.line), limits))
    return rules


def _when(check: Checker, entry: LDict, what: str, allow_any: bool) -> tuple[tuple[str, Matcher], ...] | None:
    raw = entry.get("when", LDict())
    block = check.mapping(raw, entry.line_of("when"), f"{what}.when")
    if block is None:
        return None
    out = []
    for claim in block:
        matcher = _matcher(check, block, claim, f"{what}.when")
        if matcher is None:
            return None
        if claim in BROAD_CLAIMS and matcher.matches_everything and not allow_any:
            check.add(
                block.line_of(claim),
                f"{what}: a bare '*' on {claim} matches every project; narrow it or add allow_any: true",
            )
        out.append((claim, matcher))
    if not out and not allow_any:
        check.add(
            entry.line,
            f"{what} has no 'when' and so matches every token of its issuer; add conditions or allow_any: true",
        )
    return tuple(out)


def _matcher(check: Checker, block: LDict, claim: str, what: str) -> Matcher | None:
    """``claim: pattern``, ``claim: [patterns]`` or ``claim: {match: …, case: insensitive}``."""
    value = block[claim]
    if not isinstance(value, LDict):
        patterns = check.strings(block, claim, what, scalars=True)
        return Matcher(patterns) if patterns is not None else None
    check.keys(value, ("match", "case"), ("match",), f"{what}.{claim}", block.line_of(claim))
    case = value.get("case", "sensitive")
    if case not in ("sensitive", "insensitive"):
        check.add(value.line_of("case"), f"{what}.{claim}.case must be sensitive or insensitive")
        return None
    patterns = check.strings(value, "match", f"{what}.{claim}", scalars=True)
    return Matcher(patterns, case_insensitive=case == "insensitive") if patterns is not None else None


def _aws_cross_check(aws_issuers: dict[str, AwsIssuer], rules: list[Rule]) -> list[PolicyProblem]:
    """Two ``aws`` issuers may not share a ``server_id`` (a signed request names only that),
    and every allow rule of one must pin AWS accounts: anyone can create an AWS account with
    a role named ``ci-deploy``, so ``role: ci-*`` alone would admit the world."""
    problems = []
    seen: dict[str, AwsIssuer] = {}
    for aws in aws_issuers.values():
        if aws.server_id in seen:
            problems.append(
                PolicyProblem(
                    aws.where.file,
                    aws.where.line,
                    f"issuer {aws.name!r} has the same server_id as {seen[aws.server_id].name!r}; "
                    "a signed request could not tell them apart: merge them or change one",
                )
            )
        seen[aws.server_id] = aws
    for rule in rules:
        if rule.issuer not in aws_issuers or rule.effect != "allow":
            continue
        matchers = dict(rule.when)
        account, arn = matchers.get("account"), matchers.get("arn")
        if (account is not None and all(_AWS_ACCOUNT.match(p) for p in account.patterns)) or (
            arn is not None and all(_AWS_ARN_IN_ACCOUNT.match(p) for p in arn.patterns)
        ):
            continue
        problems.append(
            PolicyProblem(
                rule.where.file,
                rule.where.line,
                f"rule {rule.name!r} allows callers of aws issuer {rule.issuer!r} without pinning their AWS "
                'account: add account: "123456789012" (12 digits, quoted; a list for several) or arn patterns '
                "that start arn:aws:sts::<account>: — any AWS account can name a role like yours",
            )
        )
    return problems


def _cross_check(
    issuers: Mapping[str, Issuer | AwsIssuer],
    accounts: dict[str, ServiceAccount],
    rules: list[Rule],
    webhooks: list[Any],
    defined: dict[str, set[str]],
) -> list[PolicyProblem]:
    """Problems between sections. ``defined`` holds every name written under ``issuers:``
    and ``service_accounts:``, loaded or not: one that failed to load is not "unknown" to
    the rules naming it (its own problem is reported once, where it is defined)."""
    problems = []

    def add(where: Where, message: str) -> None:
        problems.append(PolicyProblem(where.file, where.line, message))

    known_issuers = ", ".join(sorted(issuers)) or "none"
    known_accounts = ", ".join(sorted(accounts)) or "none"
    seen_urls: dict[str, Issuer | AwsIssuer] = {}
    for issuer in issuers.values():
        if issuer.issuer in seen_urls:
            add(
                issuer.where,
                f"issuer {issuer.name!r} has the same URL as {seen_urls[issuer.issuer].name!r}; merge them",
            )
        seen_urls[issuer.issuer] = issuer
    for rule in rules:
        if rule.issuer not in defined["issuers"]:
            add(
                rule.where,
                f"rule {rule.name!r} names unknown issuer {rule.issuer!r}; "
                f"define it under issuers: (known: {known_issuers})",
            )
        if rule.service_account is not None and rule.service_account not in defined["service_accounts"]:
            add(
                rule.where,
                f"rule {rule.name!r} names unknown service account {rule.service_account!r}; "
                f"define it under service_accounts: (known: {known_accounts})",
            )
    for hook in webhooks:
        if hook.service_account not in defined["service_accounts"]:
            add(
                hook.where,
                f"webhook {hook.name!r} names unknown service account {hook.service_account!r}; "
                f"define it under service_accounts: (known: {known_accounts})",
            )
        elif "traces" not in accounts[hook.service_account].signals:
            add(
                hook.where,
                f"webhook {hook.name!r} sends its markers (trace spans) as service account "
                f"{hook.service_account!r}, which may not send traces; add traces to its signals "
                "or use another account",
            )
    return problems + native_problems(webhooks, accounts) + metrics_problems(webhooks, accounts)
