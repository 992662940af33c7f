"""Run the real tcptrace command as a user would, and wait for it to attach."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

READY = "Ctrl-C to stop"
# Compiling and verifying the programs takes ~1 s here and 20-40 s in the CI's
# emulated VM (QEMU TCG): how long to wait for the ready line.
READY_TIMEOUT = 120.0 if os.environ.get("TCPTRACE_IN_VM") == "1" else 30.0


class Running:
    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        stdout: int | IO = subprocess.PIPE,
        command: Sequence[str] = (sys.executable, "-m", "tcptrace"),
        cwd: str | None = None,
    ) -> None:
        """command: how to start tcptrace (the installed one: ["tcptrace"], or via sudo)."""
        self.proc = subprocess.Popen(
            [*command, *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        self.stderr_head = ""

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the 'tracing ... Ctrl-C to stop' line: the program is attached."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stderr.fileno()
        while READY not in self.stderr_head:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                rest = self.proc.stderr.read() if self.proc.poll() is not None else ""
                raise AssertionError(f"tcptrace did not start: {self.stderr_head}{rest}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096).decode()
                if not chunk:
                    continue
                self.stderr_head += chunk

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, self.stderr_head + err

    def wait(self, timeout: float = 30.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, self.stderr_head + err


class Lines(threading.Thread):
    """A tracer's stdout, read as it comes."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []
        self.start()

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(
        self, text: str, count: int, timeout: float = 60.0, at_start: bool = False
    ) -> None:
        """Until count lines hold text (at_start: begin with it)."""
        deadline = time.monotonic() + timeout
        has = str.startswith if at_start else lambda line, text: text in line
        while sum(has(line, text) for line in self.lines) < count:
            assert time.monotonic() < deadline, f"no {count} lines with {text!r}: {self.lines}"
            time.sleep(0.05)
