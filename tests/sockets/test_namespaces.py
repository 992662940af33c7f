"""Network namespaces by inode: names from /run/netns, paths through /proc."""

from __future__ import annotations

import os

import pytest

from tcptrace.sockets import namespaces
from tcptrace.sockets.namespaces import NetnsIndex, resolve, scan


def fake_host(tmp_path):
    run, proc = tmp_path / "netns", tmp_path / "proc"
    run.mkdir()
    (run / "blue").write_text("")
    for pid in ("1", "42"):
        (proc / pid / "ns").mkdir(parents=True)
    # two processes share the first namespace; pid 42 runs in blue's
    (proc / "1" / "ns" / "net").write_text("")
    os.link(run / "blue", proc / "42" / "ns" / "net")
    (proc / "self").mkdir()  # not a pid: ignored
    return run, proc


def test_scan_names_the_named_and_reaches_the_others_through_a_process(tmp_path):
    run, proc = fake_host(tmp_path)
    found = scan(run, proc)
    blue = os.stat(run / "blue").st_ino
    host = os.stat(proc / "1" / "ns" / "net").st_ino
    assert found[blue].name == "blue" and found[blue].path == str(run / "blue")
    assert found[host].name is None and found[host].path == str(proc / "1" / "ns" / "net")
    assert len(found) == 2


def test_the_index_labels_by_name_else_inode_and_finds_new_ones(tmp_path):
    run, proc = fake_host(tmp_path)
    index = NetnsIndex(run, proc)
    blue = os.stat(run / "blue").st_ino
    host = os.stat(proc / "1" / "ns" / "net").st_ino
    assert index.label(blue) == "blue"
    assert index.label(host) == str(host)
    assert index.label(0) == "-"
    (run / "green").write_text("")
    index.scanned = -1.0  # as if the last scan were long ago
    assert index.name(os.stat(run / "green").st_ino) == "green"


def test_resolve_takes_a_name_a_path_or_a_known_inode(tmp_path, monkeypatch):
    run, proc = fake_host(tmp_path)
    # the fake host's files stand for namespaces
    monkeypatch.setattr(namespaces, "namespace_type", lambda fd: namespaces.CLONE_NEWNET)
    blue = os.stat(run / "blue").st_ino
    assert resolve("blue", run, proc) == blue
    assert resolve(str(proc / "42" / "ns" / "net"), run, proc) == blue
    assert resolve(str(blue), run, proc) == blue
    with pytest.raises(ValueError, match="no network namespace named red"):
        resolve("red", run, proc)
    with pytest.raises(ValueError, match="no network namespace at /no/such"):
        resolve("/no/such", run, proc)
    with pytest.raises(ValueError, match="no network namespace with inode 123"):
        resolve("123", run, proc)


def test_a_path_that_is_not_a_network_namespace_is_refused():
    """--netns /etc/passwd once traced nothing under the file's inode."""
    for path in ("/etc/passwd", "/tmp", "/dev/null", "/proc/self/ns/uts"):
        with pytest.raises(ValueError, match="is not a network namespace"):
            resolve(path)
    assert resolve("/proc/self/ns/net") == os.stat("/proc/self/ns/net").st_ino
