"""tcptrace run as an unprivileged user (uid/gid 65534), from a copy it can read: the
checkout or the venv may live under a private directory (a fresh clone in a 0700
mktemp directory, a home)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import pyroute2

import tcptrace

NOBODY = "65534"
# the interpreter itself, not the venv's link to it (under the checkout)
PYTHON = os.path.realpath(sys.executable)
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


@contextlib.contextmanager
def readable_tree() -> Iterator[Path]:
    """tcptrace (with bpf/) and the dependencies the command imports, copied where an
    unprivileged user can read them; run it there with PYTHONPATH=tree."""
    root = Path(tempfile.mkdtemp(prefix="tcptrace-nobody-"))
    try:
        source = Path(tcptrace.__file__).resolve().parent
        shutil.copytree(source, root / "tcptrace", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(source.parent / "bpf", root / "bpf")
        for package in (click, pyroute2):
            shutil.copytree(
                Path(package.__file__).parent,
                root / package.__name__,
                ignore=shutil.ignore_patterns("__pycache__"),
            )
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
            if path.is_dir():
                mode |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH | stat.S_IWUSR
            path.chmod(mode)
        yield root
    finally:
        shutil.rmtree(root)
