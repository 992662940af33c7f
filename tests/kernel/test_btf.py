"""Struct offsets from the running kernel's BTF, checked against bpftool's own reading."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tcptrace.kernel.btf import (
    KIND_FUNC,
    SOCK_FIELDS,
    VMLINUX,
    Btf,
    BtfError,
    netns_offsets,
    sock_offsets,
)

pytestmark = pytest.mark.skipif(not VMLINUX.exists(), reason="this kernel has no BTF")


def bpftool_member_offset(struct: str, member: str) -> int:
    """The bit offset bpftool's raw dump gives a direct member, in bytes."""
    raw = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(VMLINUX), "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    block = re.search(rf"^\[\d+\] STRUCT '{struct}' size=\d+ vlen=\d+\n((?:\t.*\n)+)", raw, re.M)
    assert block, struct
    found = re.search(rf"^\t'{member}' type_id=\d+ bits_offset=(\d+)", block.group(1), re.M)
    assert found, (struct, member)
    return int(found.group(1)) // 8


@pytest.fixture(scope="module")
def btf() -> Btf:
    return Btf.load()


@pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool is not installed")
def test_offsets_agree_with_bpftool(btf):
    for struct, member in (("sock_common", "skc_net"), ("net", "ns"), ("ns_common", "inum")):
        assert btf.offset_of(struct, member) == bpftool_member_offset(struct, member)


@pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool is not installed")
def test_the_tracepoints_fields_in_a_socket_agree_with_bpftool(btf):
    offsets = sock_offsets(btf).offsets
    assert set(offsets) == {macro for macro, _, _ in SOCK_FIELDS}
    # inet_sock begins with its struct sock; sk_protocol is a member of its own (no bitfield)
    assert offsets["INET_SPORT_OFFSET"] == bpftool_member_offset("inet_sock", "inet_sport")
    assert offsets["INET_SADDR_OFFSET"] == bpftool_member_offset("inet_sock", "inet_saddr")
    assert offsets["SK_PROTOCOL_OFFSET"] == bpftool_member_offset("sock", "sk_protocol")
    assert offsets["SK_FAMILY_OFFSET"] == btf.offset_of("sock_common", "skc_family")
    assert offsets["SK_V6_DADDR_OFFSET"] == bpftool_member_offset("sock_common", "skc_v6_daddr")
    assert sock_offsets(btf).cflags()[0] == f"-DSK_FAMILY_OFFSET={offsets['SK_FAMILY_OFFSET']}"


@pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool is not installed")
def test_functions_are_found_by_name_with_bpftool_s_ids(btf):
    raw = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(VMLINUX), "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("bpf_iter_bpf_map_elem", "tcp_set_state"):
        found = re.search(rf"^\[(\d+)\] FUNC '{name}' ", raw, re.M)
        assert found, name
        assert btf.find(name, KIND_FUNC, "function") == int(found.group(1))
    with pytest.raises(BtfError, match="no function sock in the BTF"):
        btf.find("sock", KIND_FUNC, "function")  # a struct, not a function


def test_member_paths_add_up_and_look_into_anonymous_unions(btf):
    # skc_daddr sits in an anonymous struct inside an anonymous union, at the start
    assert btf.offset_of("sock_common", "skc_daddr") == 0
    offsets = netns_offsets(btf)
    assert offsets.sock_net == btf.offset_of("sock_common", "skc_net")  # __sk_common is first
    assert offsets.net_inum == btf.offset_of("net", "ns") + btf.offset_of("ns_common", "inum")
    assert offsets.cflags() == [
        f"-DSK_NET_OFFSET={offsets.sock_net}",
        f"-DNET_INUM_OFFSET={offsets.net_inum}",
    ]


def test_missing_structs_members_and_bad_data_are_errors(btf):
    with pytest.raises(BtfError, match="no struct no_such_struct_here"):
        btf.find_struct("no_such_struct_here")
    with pytest.raises(BtfError, match="has no member nope"):
        btf.offset_of("sock", "nope")
    with pytest.raises(BtfError, match="bad BTF magic"):
        Btf(b"\0" * 64)
    with pytest.raises(BtfError, match="cannot read"):
        Btf.load(VMLINUX.with_name("no-such-btf"))
