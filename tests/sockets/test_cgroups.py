"""cgroup v2 paths: the mount, ids to paths, units, container ids, the --cgroup filter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tcptrace.sockets.cgroups import (
    CgroupIndex,
    cgroup2_mount,
    container_id,
    process_cgroup,
    resolve_filter,
    unit_of,
)

DOCKER = "a" * 64


def test_the_cgroup2_mount_is_read_from_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "25 1 0:23 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert cgroup2_mount(info) == Path("/sys/fs/cgroup/uni fied")
    info.write_text("25 1 0:23 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    assert cgroup2_mount(info) is None
    assert cgroup2_mount(tmp_path / "missing") is None


@pytest.mark.parametrize(
    "path,expected",
    [
        (f"/system.slice/docker-{DOCKER}.scope", DOCKER),
        (f"/docker/{DOCKER}", DOCKER),
        (f"/kubepods.slice/kubepods-burstable.slice/cri-containerd-{DOCKER}.scope", DOCKER),
        (f"/kubepods/burstable/pod1234-5678/{DOCKER}", DOCKER),
        (f"/machine.slice/libpod-{DOCKER}.scope/container", DOCKER),
        (f"/system.slice/crio-{DOCKER}.scope", DOCKER),
        ("/system.slice/nginx.service", None),
        (f"/user.slice/{DOCKER}", None),  # 64 hex digits, but not a runtime's path
        (None, None),
    ],
)
def test_container_ids_come_from_runtime_paths(path, expected):
    assert container_id(path) == expected


def test_the_innermost_unit_names_a_cgroup():
    assert unit_of("/system.slice/nginx.service") == "nginx.service"
    assert unit_of("/user.slice/user-0.slice/session-3.scope") == "session-3.scope"
    assert unit_of("/custom/group") is None
    assert unit_of(None) is None


def test_a_filter_is_a_directory_below_the_mount_with_its_id_and_level(tmp_path):
    (tmp_path / "system.slice" / "nginx.service").mkdir(parents=True)
    f = resolve_filter("/system.slice/nginx.service", tmp_path)
    assert f.path == "/system.slice/nginx.service"
    assert f.level == 2
    assert f.id == os.stat(tmp_path / "system.slice" / "nginx.service").st_ino
    same = resolve_filter(str(tmp_path / "system.slice"), tmp_path)  # a full path works too
    assert (same.path, same.level) == ("/system.slice", 1)
    assert resolve_filter("/", tmp_path).level == 0
    with pytest.raises(ValueError, match="no cgroup /nope"):
        resolve_filter("/nope", tmp_path)
    with pytest.raises(ValueError, match="no cgroup"):
        resolve_filter("/../etc", tmp_path)


def test_ids_become_paths_and_new_cgroups_are_found(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    index = CgroupIndex(tmp_path)
    assert index.path(os.stat(tmp_path / "a").st_ino) == "/a"
    assert index.path(os.stat(tmp_path).st_ino) == "/"
    (tmp_path / "a" / "b").mkdir()
    monkeypatch.setattr("tcptrace.sockets.cgroups.RESCAN_S", 0.0)
    assert index.path(os.stat(tmp_path / "a" / "b").st_ino) == "/a/b"
    assert index.path(0) is None


def test_a_process_cgroup_is_its_v2_line(tmp_path):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cgroup").write_text("9:name=systemd:/\n0::/system.slice/x.service\n")
    assert process_cgroup(7, tmp_path) == "/system.slice/x.service"
    assert process_cgroup(8, tmp_path) is None
