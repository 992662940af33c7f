"""A pipe whose reader left is noticed on a tick, with nothing written."""

import io
import os
import socket

import pytest

from tcptrace.pipes import PipeWatch, is_pipe


def test_pipe_watch_raises_once_the_reader_is_gone():
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as out:
        watch = PipeWatch(out)
        watch.on_tick(0)  # reader still there: nothing happens
        os.close(read_end)
        with pytest.raises(BrokenPipeError):
            watch.on_tick(1)


def test_only_pipes_are_watched():
    read_end, write_end = os.pipe()
    with os.fdopen(read_end) as r, os.fdopen(write_end, "w") as w:
        assert is_pipe(w) and is_pipe(r)
    a, b = socket.socketpair()
    with a, b, a.makefile("w") as f:
        assert not is_pipe(f)
    assert not is_pipe(io.StringIO())
