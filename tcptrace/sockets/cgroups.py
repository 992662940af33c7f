"""cgroup v2: where an owner runs, as a path, a systemd unit or a container id.

The kernel reports an owner's cgroup by its id (bpf_get_current_cgroup_id()),
which in cgroup v2 is the inode number of the cgroup's directory. This module
finds the cgroup2 mount in /proc/self/mountinfo (it may be /sys/fs/cgroup, or
/sys/fs/cgroup/unified on a hybrid system), turns ids into paths relative to it
by walking the tree (cached, walked again at most every RESCAN_S on a miss), and
reads a container id out of a path the way container runtimes lay them out.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from tcptrace.filters import CgroupFilter

MOUNTINFO = Path("/proc/self/mountinfo")
# A missing id walks the tree again, at most this often.
RESCAN_S = 1.0

# Container ids are 64 hex digits, in the last components of paths such as
#   /system.slice/docker-<id>.scope, /docker/<id>,
#   /kubepods.slice/.../cri-containerd-<id>.scope, crio-<id>.scope,
#   /machine.slice/libpod-<id>.scope, /kubepods/burstable/pod<uid>/<id>
_CONTAINER = re.compile(
    r"(?:^|/)(?:docker-|cri-containerd-|crio-|libpod-|containerd-)?([0-9a-f]{64})(?:\.scope)?(?:/|$)"
)
_RUNTIMES = ("docker", "containerd", "crio", "libpod", "kubepods", "podman", "machine.slice")
# systemd units: the last component that names one
_UNIT = re.compile(r"[^/]+\.(?:service|scope|slice|socket|mount)$")


def cgroup2_mount(mountinfo: Path = MOUNTINFO) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted, or None."""
    try:
        text = mountinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        # mount ID, parent, major:minor, root, mount point, options, [optional...] - fstype ...
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(_unescape(left.split(" ")[4]))
    return None


def _unescape(field: str) -> str:
    """mountinfo escapes spaces and the like as octal (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def container_id(path: str | None) -> str | None:
    """The container id in a cgroup path of a container runtime, else None."""
    if not path or not any(runtime in path for runtime in _RUNTIMES):
        return None
    found = _CONTAINER.findall(path)
    return found[-1] if found else None


def unit_of(path: str | None) -> str | None:
    """The innermost systemd unit (nginx.service, session-3.scope), else None."""
    if not path:
        return None
    for part in reversed(path.split("/")):
        if _UNIT.fullmatch(part):
            return part
    return None


def process_cgroup(pid: int, proc: Path = Path("/proc")) -> str | None:
    """A process's cgroup v2 path ('0::/system.slice/x.service'), or None."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


def resolve_filter(text: str, mount: Path | None = None) -> CgroupFilter:
    """A --cgroup value (a path relative to the cgroup2 mount, or a full path under it)."""
    mount = mount if mount is not None else cgroup2_mount()
    if mount is None:
        raise ValueError("no cgroup v2 hierarchy is mounted (see /proc/self/mountinfo)")
    given = Path(text)
    if given.is_absolute() and given.is_relative_to(mount):
        full = given
    else:
        full = mount / text.lstrip("/")
    full = Path(os.path.normpath(full))
    if not full.is_relative_to(mount) or not full.is_dir():
        raise ValueError(f"no cgroup {text} under {mount}")
    rel = "/" + str(full.relative_to(mount)).strip(".").strip("/")
    level = 0 if rel == "/" else rel.count("/")
    return CgroupFilter(path=rel, id=full.stat().st_ino, level=level, directory=str(full))


class CgroupIndex:
    """cgroup id -> path relative to the cgroup2 mount ('/system.slice/nginx.service')."""

    def __init__(self, mount: Path | None = None) -> None:
        self.mount = mount if mount is not None else cgroup2_mount()
        self.paths: dict[int, str] = {}
        self.walked = 0.0  # time.monotonic() of the last walk

    def path(self, cgroup_id: int) -> str | None:
        if not cgroup_id or self.mount is None:
            return None
        found = self.paths.get(cgroup_id)
        if found is None and time.monotonic() - self.walked >= RESCAN_S:
            self._walk()
            found = self.paths.get(cgroup_id)
        return found

    def _walk(self) -> None:
        assert self.mount is not None
        self.walked = time.monotonic()
        paths: dict[int, str] = {}
        root = str(self.mount)
        for dirpath, _dirs, _files in os.walk(root):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue  # removed while walking
            rel = dirpath[len(root) :] or "/"
            paths[ino] = rel
        self.paths = paths
