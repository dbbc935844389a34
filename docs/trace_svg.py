"""Draw the trace tracegate makes of the test pipeline (tests/ci_payloads.py: pipeline 99001,
three jobs, unit-tests failed and retried, lint failed) as a waterfall SVG.

The spans come from tracegate's own code (proxy.ci.gitlab → OTLP/JSON), decoded back
from the JSON the upstream would receive, so the picture is what Lightstep gets.

    python docs/trace_svg.py            # writes docs/ci-trace.svg
"""

from __future__ import annotations

import json
import sys
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.ci import gitlab  # noqa: E402
from proxy.ci.pipeline import otlp_json  # noqa: E402
from tests import ci_payloads as c  # noqa: E402

INSTANCE = "https://gitlab.example.com"
WIDTH, ROW, LEFT, TOP = 980, 34, 250, 64


def spans() -> list[dict[str, object]]:
    drawn = [gitlab.spans_for("Pipeline Hook", c.gitlab_pipeline("failed"), INSTANCE, with_jobs=False)]
    drawn += [gitlab.spans_for("Job Hook", c.gitlab_job(job[0]), INSTANCE, with_jobs=False) for job in c.JOBS]
    out = []
    for result in drawn:
        assert isinstance(result, gitlab.Spans)
        body = json.loads(otlp_json(result.spans, "ci/payments-api", "gitlab"))
        out += body["resourceSpans"][0]["scopeSpans"][0]["spans"]
    return out


def attribute(span: dict[str, object], key: str) -> object:
    for item in span["attributes"]:  # type: ignore[attr-defined]
        if item["key"] == key:
            return next(iter(item["value"].values()))
    return None


def render(found: list[dict[str, object]]) -> str:
    root = next(s for s in found if "parentSpanId" not in s)
    jobs = sorted((s for s in found if s is not root), key=lambda s: int(s["startTimeUnixNano"]))  # type: ignore[arg-type]
    t0 = int(root["startTimeUnixNano"])  # type: ignore[arg-type]
    t1 = int(root["endTimeUnixNano"])  # type: ignore[arg-type]
    scale = (WIDTH - LEFT - 30) / (t1 - t0)

    def x(t: int) -> float:
        return LEFT + (t - t0) * scale

    rows = [root, *jobs]
    height = TOP + ROW * len(rows) + 70
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" '
        'font-size="13">',
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<text x="16" y="24" font-size="15" font-weight="bold">Trace {root["traceId"]} — '
        f"service ci/payments-api</text>",
        '<text x="16" y="44" fill="#555">GitLab pipeline 99001 of project 4242: one root span, one child span '
        "per job attempt (queue time shaded, ● = started event)</text>",
    ]
    for minute in range(0, (t1 - t0) // 60_000_000_000 + 1):
        gx = x(t0 + minute * 60_000_000_000)
        parts.append(f'<line x1="{gx:.1f}" y1="{TOP - 6}" x2="{gx:.1f}" y2="{height - 50}" stroke="#eee"/>')
        parts.append(f'<text x="{gx:.1f}" y="{height - 34}" fill="#888" text-anchor="middle">{minute} min</text>')
    for i, span in enumerate(rows):
        y = TOP + i * ROW
        start, end = int(span["startTimeUnixNano"]), int(span["endTimeUnixNano"])  # type: ignore[arg-type]
        error = span["status"]["code"] == 2  # type: ignore[index]
        color = "#d9534f" if error else "#3c9d5d"
        indent = 16 if span is root else 36
        job_id = attribute(span, "cicd.pipeline.task.run.id")
        label = span["name"] if span is root else f"{span['name']} #{job_id}"
        parts.append(f'<text x="{indent}" y="{y + 20}">{escape(str(label))}</text>')
        queued = attribute(span, "tracegate.cicd.queued_seconds")
        if span is not root and isinstance(queued, (int, float)) and queued > 0:
            qx = x(start - int(queued * 1e9))
            parts.append(
                f'<rect x="{qx:.1f}" y="{y + 7}" width="{x(start) - qx:.1f}" height="18" fill="{color}" '
                'opacity="0.25"/>'
            )
        parts.append(
            f'<rect x="{x(start):.1f}" y="{y + 7}" width="{max(x(end) - x(start), 2):.1f}" height="18" rx="3" '
            f'fill="{color}"/>'
        )
        for event in span.get("events", []):  # type: ignore[attr-defined]
            ex = x(int(event["timeUnixNano"]))
            parts.append(f'<circle cx="{ex:.1f}" cy="{y + 16}" r="3.5" fill="#1d3557"/>')
        status = span["status"].get("message") or "ok"  # type: ignore[attr-defined]
        seconds = (end - start) / 1e9
        right, fill = x(end) + 6, "#333"
        if right > WIDTH - 160:  # no room after the bar: write inside it
            right, fill = x(start) + 10, "#fff"
        parts.append(f'<text x="{right:.1f}" y="{y + 20}" fill="{fill}">{seconds:.1f} s · {escape(str(status))}</text>')
    parts.append(
        f'<text x="16" y="{height - 12}" fill="#555">A job that exports TRACEPARENT from /v1/traceparent puts its '
        "own spans under its job span in this trace.</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    target = ROOT / "docs" / "ci-trace.svg"
    target.write_text(render(spans()))
    print(f"wrote {target.relative_to(ROOT)}")
