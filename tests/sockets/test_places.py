"""Places: a socket's namespace and owner's cgroup as the columns and records show them."""

from __future__ import annotations

from tcptrace.sockets.places import Place, Places

DOCKER = "b" * 64


class Names:
    def name(self, inode: int):
        return {11: "blue"}.get(inode)

    def rescan(self):
        return {11: None, 12: None}


class Paths:
    def __init__(self) -> None:
        self.known = {5: "/system.slice/nginx.service", 6: f"/docker/{DOCKER}"}

    def path(self, cgroup_id: int):
        return self.known.get(cgroup_id)


def test_labels_prefer_names_units_and_short_container_ids():
    places = Places(Names(), Paths())  # type: ignore[arg-type]
    nginx = places.of(11, 5, 300, True)
    assert (nginx.netns_label, nginx.cgroup_label) == ("blue", "nginx.service")
    assert nginx.container is None
    box = places.of(12, 6, 301, True)
    assert (box.netns_label, box.cgroup_label) == ("12", DOCKER[:12])
    assert box.container == DOCKER
    unknown = places.of(0, 0, 0, False)
    assert (unknown.netns_label, unknown.cgroup_label) == ("-", "-")
    assert unknown == Place(None, None, None, None)


def test_a_cgroup_not_yet_indexed_is_asked_again():
    paths = Paths()
    places = Places(Names(), paths)  # type: ignore[arg-type]
    first = places.of(11, 7, 1, True)
    assert first.cgroup is None and not first.complete
    paths.known[7] = "/new.slice"
    assert places.of(11, 7, 1, True).cgroup == "/new.slice"
