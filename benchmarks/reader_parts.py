#!/usr/bin/env python3
"""tcptrace --lifetime with a part of its reader cut off: what each part costs.

    python benchmarks/reader_parts.py read --port N --lifetime
        reads the perf rings and hands the space back, decodes nothing: the floor
        of any reader of these records
    python benchmarks/reader_parts.py read-events --port N
        the same for a stream of every transition (text, --json, --write): the floor
        of any reader of the kernel's transition records, capture included
    python benchmarks/reader_parts.py unformatted --port N --lifetime
        everything but building and writing the lines: decoding, owners,
        TIME_WAIT following, connections (the summary still counts them as shown)

churn.py runs these beside the whole `tcptrace --lifetime` (modes "read-only
lifetime" and "unformatted lifetime"). A benchmark tool, not part of the package:
it patches two methods before tcptrace's own entry point runs.
"""

from __future__ import annotations

import sys

PARTS = ("read", "unformatted", "read-events")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in PARTS:
        sys.exit(f"usage: reader_parts.py {{{','.join(PARTS)}}} TCPTRACE-ARGS...")
    part = sys.argv.pop(1)
    from tcptrace.kernel import loader
    from tcptrace.outputs import output

    if part == "read":
        sample = loader.perfbuf.record_size(loader.LIFE_STRUCT.size)

        def read_only(self, events) -> None:
            for run in self._read_runs():
                self.received += len(run) // sample

        loader.Probe._read_lives = read_only
    elif part == "read-events":
        record = loader.perfbuf.record_size(loader.EVENT_STRUCT.size)

        def read_events_only(self, timeout_ms: int) -> list:
            if not self._wait(timeout_ms):
                return []
            for run in self._read_runs():
                self.received += len(run) // record
            self._publish_progress()
            return []

        loader.Probe.poll_events = read_events_only
    else:

        def count_only(self, lives) -> None:
            self.printed += len(lives)

        output.LifetimeFormatter.write = count_only
    from tcptrace.cli import main as tcptrace_main

    sys.argv[0] = "tcptrace"
    tcptrace_main()


if __name__ == "__main__":
    main()
