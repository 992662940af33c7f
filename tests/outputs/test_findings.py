"""tcptrace --check's report: aligned lines, what is degraded or missing, the verdict."""

from __future__ import annotations

from tcptrace.kernel import features
from tcptrace.kernel.features import DEGRADED, MISSING, OK, UNKNOWN, Finding
from tcptrace.outputs.findings import format_findings, verdict


def test_one_aligned_line_per_finding_then_the_verdict():
    report = format_findings(
        [
            Finding(features.TRACEPOINT, OK, "loaded and attached"),
            Finding(features.MAP_SCAN, DEGRADED, "batch scan in user space: why", "slower"),
            Finding(features.BCC, OK, "0.26.0"),
        ]
    )
    assert report == (
        "tracepoint  ok        loaded and attached\n"
        "map scan    degraded  batch scan in user space: why\n"
        "bcc         ok        0.26.0\n"
        "degraded: map scan: slower\n"
        "result: tracing works, 1 feature degraded\n"
    )


def test_missing_before_degraded_and_unknown_not_repeated():
    report = format_findings(
        [
            Finding(features.PRIVILEGES, MISSING, "needs root", "tcptrace cannot trace"),
            Finding(features.TRACEPOINT, UNKNOWN, "not checked: privileges missing"),
            Finding(features.LOCKDOWN, DEGRADED, "odd"),
        ]
    ).splitlines()
    assert report[0] == "privileges  missing   needs root"
    assert report[1] == "tracepoint  unknown   not checked: privileges missing"
    assert report[3:] == [
        "missing: privileges: tcptrace cannot trace",
        "degraded: lockdown",
        "result: tracing does not work here",
    ]


def test_verdicts():
    ok = [Finding(features.TRACEPOINT, OK, "")]
    assert verdict(ok) == "result: tracing works, with every feature"
    two = [*ok, Finding(features.NESTED, DEGRADED, ""), Finding(features.CGROUP, DEGRADED, "")]
    assert verdict(two) == "result: tracing works, 2 features degraded"
    assert (
        verdict([Finding(features.TRACEPOINT, MISSING, "")]) == "result: tracing does not work here"
    )
    assert verdict([]) == "result: tracing does not work here"
