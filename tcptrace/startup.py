"""The command's first and last moments: signals before anything slow loads, and an
output that cannot be written (a full disk) as the user's problem, not a bug.

Python's default SIGTERM kills at once (143, no summary) and its SIGINT raises
KeyboardInterrupt wherever the interpreter is (a traceback mid-import, click's
"Aborted!"): these handlers replace both before the slow imports run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from typing import TextIO

from tcptrace.errors import EXIT_INTERRUPTED

INTERRUPTED = "tcptrace: interrupted before tracing started"
# A full or failing output (> /dev/full, a quota, a file size limit): one line, exit 1.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})
EXIT_OUTPUT = 1

# SIGTERMs received before tracing started: honoured as soon as it has (summary, exit 0)
early_sigterms: list[int] = []


def _interrupted(_signum: int, _frame: object) -> None:
    """Ctrl-C before tracing started: nothing to summarise, nothing to undo (the kernel
    frees a half-loaded program with the process), so leave at once, without unwinding."""
    with contextlib.suppress(OSError):
        os.write(2, (INTERRUPTED + "\n").encode())
    os._exit(EXIT_INTERRUPTED)


def record_sigterm(signum: int, _frame: object) -> None:
    early_sigterms.append(signum)


def install_early_signals() -> None:
    # SIGINT first: once SIGTERM shows as caught (/proc/PID/status), both are ours
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, record_sigterm)


def silence(stream: TextIO) -> None:
    """Point a stream that cannot be written (reader gone, disk full) at /dev/null, so
    that Python's final flush at exit finds nothing to complain about."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def reader_gone(*streams: TextIO) -> None:
    """The reader went away (| head): flush what can go, silence what cannot, so that
    neither now nor Python's flush at exit prints a traceback."""
    for stream in streams:
        try:
            stream.flush()
        except OSError:
            silence(stream)


def output_failed(exc: OSError, *streams: TextIO) -> int:
    """One line on stderr (if it can take it) for an output that cannot be written."""
    reason = exc.strerror or os.strerror(exc.errno or 0)
    with contextlib.suppress(OSError):
        os.write(2, f"tcptrace: cannot write output: {reason}\n".encode())
    for stream in streams:
        silence(stream)
    return EXIT_OUTPUT
