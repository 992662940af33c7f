"""tcptrace --check's report: one line per finding (kernel/features.py), then what is
degraded or missing, and the verdict."""

from __future__ import annotations

from collections.abc import Sequence

from tcptrace.kernel.features import DEGRADED, MISSING, STATUSES, Finding, tracing_works


def format_findings(findings: Sequence[Finding]) -> str:
    """Aligned NAME STATUS DETAIL lines; then, per degraded or missing feature, what
    tcptrace does without it; then whether tracing works."""
    width = max((len(f.name) for f in findings), default=0)
    status_width = max(len(status) for status in STATUSES)  # the same columns everywhere
    lines = [f"{f.name:<{width}}  {f.status:<{status_width}}  {f.detail}" for f in findings]
    for status in (MISSING, DEGRADED):
        lines += [
            f"{status}: {f.name}: {f.impact}" if f.impact else f"{status}: {f.name}"
            for f in findings
            if f.status == status
        ]
    lines.append(verdict(findings))
    return "\n".join(lines) + "\n"


def verdict(findings: Sequence[Finding]) -> str:
    degraded = sum(f.status == DEGRADED for f in findings)
    if not tracing_works(findings):
        return "result: tracing does not work here"
    if not degraded:
        return "result: tracing works, with every feature"
    return f"result: tracing works, {degraded} feature{'s' if degraded > 1 else ''} degraded"
