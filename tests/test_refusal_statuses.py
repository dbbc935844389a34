"""Every status a refusal can carry has an answer on both transports.

A refusal's status becomes a ``google.rpc.Status`` (``proxy.answers``) and a gRPC status
(``proxy.grpc_status``) by table lookup; a status missing from a table was a KeyError, a 500
and an unhandled-error log line (JSON to a protobuf-only backend, 415). This walks the
package's source for every place a refusal is made with a literal status — ``BodyError``,
``UpstreamError``, ``StampError``, ``Refused``, ``refuse(status=…)``, ``refusal(…)`` — so
that a status added tomorrow without its answers fails here, not in production."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from proxy import answers, grpc_status

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"
MAKERS = {"BodyError", "UpstreamError", "StampError", "Refused", "refuse", "refusal", "refusal_answer"}


def statuses_in(source: str) -> set[int]:
    """The literal statuses passed to a refusal maker in ``source`` (positional or status=),
    and exception classes' own ``status``."""
    found: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):  # an exception's own status: class AuthError: status = 401
            found |= {
                item.value.value
                for item in node.body
                if isinstance(item, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "status" for t in item.targets)
                and isinstance(item.value, ast.Constant)
                and type(item.value.value) is int
            }
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if name not in MAKERS:
            continue
        values = [*node.args, *(k.value for k in node.keywords if k.arg == "status")]
        found |= {v.value for v in values if isinstance(v, ast.Constant) and type(v.value) is int and v.value >= 100}
    return found


def test_the_scanner_sees_every_way_a_status_is_written() -> None:
    source = """
raise BodyError("x", 415)
raise errors.UpstreamError("y", 502)
return Refused(403, "z")
refuse(runtime, signal=s, status=429, reason="r")
refusal(418, "teapot")
class Gone(TracegateError):
    status = 410
"""
    assert statuses_in(source) == {415, 502, 403, 429, 418, 410}


def all_statuses() -> set[int]:
    return {s for path in PACKAGE.rglob("*.py") for s in statuses_in(path.read_text(encoding="utf-8"))}


def test_the_package_makes_refusals_with_literal_statuses() -> None:
    assert {400, 401, 403, 413, 415, 502, 504} <= all_statuses()


@pytest.mark.parametrize("status", sorted(all_statuses()))
def test_every_refusal_status_has_an_otlp_and_a_grpc_answer(status: int) -> None:
    answer = answers.refusal_answer(status, "application/json")
    assert answer.status == status and answer.body
    assert grpc_status.refusal(status, "some-reason").code is not None
