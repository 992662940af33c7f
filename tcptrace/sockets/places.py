"""Where a socket lives: its network namespace and its owner's cgroup, as people name them.

Events carry numbers: the namespace's inode and the owner's cgroup v2 id (the
kernel's, or 0 when user space found the owner itself, then the owner's
/proc/PID/cgroup says). This turns them into what `ip netns`, systemd and
container runtimes call them, cached, for the text columns and the records.
"""

from __future__ import annotations

from dataclasses import dataclass

from tcptrace.compat import slotted
from tcptrace.sockets.cgroups import CgroupIndex, container_id, process_cgroup, unit_of
from tcptrace.sockets.namespaces import NetnsIndex

# Cached places at most (a host's namespaces and cgroups are few; pids churn).
MAX_CACHED = 16384
# Characters of a container id in the text column (as docker ps shows it).
SHORT_ID = 12


@slotted
@dataclass(frozen=True)
class Place:
    netns: int | None  # the namespace's inode (None: unknown)
    netns_name: str | None  # its `ip netns` name
    cgroup: str | None  # the owner's cgroup v2 path, relative to the cgroup2 mount
    container: str | None  # the container id when that path is a runtime's
    # everything that can be known was found (a cgroup made a moment ago may not be
    # indexed yet: such a place is not cached, and asked again)
    complete: bool = True

    @property
    def netns_label(self) -> str:
        """The NETNS column: the name, else the inode."""
        if self.netns is None:
            return "-"
        return self.netns_name or str(self.netns)

    @property
    def cgroup_label(self) -> str:
        """The CGROUP column: a container's short id, else the systemd unit, else the path."""
        if self.container:
            return self.container[:SHORT_ID]
        return unit_of(self.cgroup) or self.cgroup or "-"


class Places:
    def __init__(
        self, netns_index: NetnsIndex | None = None, cgroups: CgroupIndex | None = None
    ) -> None:
        self.netns_index = netns_index or NetnsIndex()
        self.cgroups = cgroups or CgroupIndex()
        self._cache: dict[tuple[int, int, int], Place] = {}

    def of(self, netns: int, cgroup_id: int, pid: int, owner_known: bool) -> Place:
        """The place of a socket in namespace `netns` whose owner is (pid, cgroup_id)."""
        key = place_key(netns, cgroup_id, pid, owner_known)
        place = self._cache.get(key)
        if place is None:
            if len(self._cache) > MAX_CACHED:
                self._cache.clear()
            path = None
            if cgroup_id:
                path = self.cgroups.path(cgroup_id)
            elif owner_known and pid:
                path = process_cgroup(pid)
            place = Place(
                netns=netns or None,
                netns_name=self.netns_index.name(netns) if netns else None,
                cgroup=path,
                container=container_id(path),
                complete=path is not None or not cgroup_id,
            )
            if place.complete:
                self._cache[key] = place
        return place


def place_key(netns: int, cgroup_id: int, pid: int, owner_known: bool) -> tuple[int, int, int]:
    """What a place is known by (Places.of's cache key): a pid only where the place
    comes from the owner's /proc/PID/cgroup (no cgroup id from the kernel)."""
    return (netns, cgroup_id, pid if owner_known and not cgroup_id else 0)


class RecordedPlaces(Places):
    """Places as a capture recorded them on its host (-r): nothing is looked up here.

    rows: [netns, cgroup_id, pid, netns_name, cgroup, container] as place_key keys
    them (outputs/capture.py writes them); a place not recorded has its inode only.
    """

    def __init__(self) -> None:  # no indexes of this host: not Places.__init__
        self._cache = {}
        self.netns_names: dict[int, str] = {}  # inode -> its ip netns name, as recorded

    def add(self, rows: list) -> None:
        for netns, cgroup_id, pid, name, cgroup, container in rows:
            key = (int(netns), int(cgroup_id), int(pid))
            if name is not None:
                self.netns_names[key[0]] = str(name)
            self._cache[key] = Place(
                netns=key[0] or None,
                netns_name=None if name is None else str(name),
                cgroup=None if cgroup is None else str(cgroup),
                container=None if container is None else str(container),
            )

    def of(self, netns: int, cgroup_id: int, pid: int, owner_known: bool) -> Place:
        place = self._cache.get(place_key(netns, cgroup_id, pid, owner_known))
        if place is None:
            return Place(netns=netns or None, netns_name=None, cgroup=None, container=None)
        return place
