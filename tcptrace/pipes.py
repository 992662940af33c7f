"""Noticing that the reader of a pipe went away, even while nothing is written.

`tcptrace --json | head -3` would otherwise learn it only at its next write, which
may never come on a quiet port. The write end of a pipe whose read end closed
polls as POLLERR, so a stage checks that on each tick (one poll(2) per tick) and
raises BrokenPipeError, which the session turns into a quiet exit.
"""

from __future__ import annotations

import os
import select
import stat
from typing import TextIO

from tcptrace.stages import Stage


def is_pipe(stream: TextIO) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError):
        return False


class PipeWatch(Stage):
    """Raise BrokenPipeError from on_tick once the pipe's reader is gone."""

    def __init__(self, stream: TextIO) -> None:
        self.poller = select.poll()
        # no events asked for: POLLERR and POLLHUP are always reported
        self.poller.register(stream.fileno(), 0)

    def on_tick(self, now_ns: int) -> None:
        for _fd, events in self.poller.poll(0):
            if events & select.POLLERR:
                raise BrokenPipeError("the reader of the output went away")
