"""Struct offsets of the running kernel, from its BTF (/sys/kernel/btf/vmlinux).

The tracepoint program reads tracepoint fields, never struct sock, except for the
one thing no tracepoint field says: the socket's network namespace. The nested
program, which handles the hits the kernel skipped the tracepoint program for, is
given no fields: it reads from the socket what the tracepoint would have given.
The offsets for those reads come from here, never from the installed headers
(which may belong to another kernel), and bcc compiles them in as -D constants.
The loader checks them on sockets of tcptrace's own before it trusts what they
read.

BTF layout (Documentation/bpf/btf.rst): a header, a type section (records of
struct btf_type, each followed by data whose size depends on its kind) and a
string section. Parsing indexes the types once (~40 ms for vmlinux here, seconds
under emulation: a start parses it once) and resolves only the structs asked for.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
# Read this BTF file instead (a kernel that keeps it elsewhere; tests of the fallback).
BTF_ENV = "TCPTRACE_BTF"
BTF_MAGIC = 0xEB9F

_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type/str off+len
_TYPE = struct.Struct("<III")  # name_off, info, size or type
_MEMBER = struct.Struct("<III")  # name_off, type, offset
_ENUMERATOR = struct.Struct("<Ii")  # name_off, value

# BTF kinds (include/uapi/linux/btf.h)
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19
# bytes after struct btf_type: fixed, and per vlen entry
_EXTRA = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}
_PER_ENTRY = {
    KIND_STRUCT: 12,
    KIND_UNION: 12,
    KIND_ENUM: 8,
    KIND_FUNC_PROTO: 8,
    KIND_DATASEC: 12,
    KIND_ENUM64: 12,
}
_WORD = 4
_TYPE_WORDS = _TYPE.size // _WORD
# the same, in words and indexed by kind (the kind field has 5 bits)
_EXTRA_WORDS = [_EXTRA.get(kind, 0) // _WORD for kind in range(32)]
_ENTRY_WORDS = [_PER_ENTRY.get(kind, 0) // _WORD for kind in range(32)]
# kinds that only qualify or rename another type
_MODIFIERS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})


class BtfError(Exception):
    """The BTF is missing, unreadable, or lacks what was asked for."""


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    vlen: int
    kflag: bool
    ref: int  # size for structs and unions, the referenced type otherwise
    data_pos: int  # where the members start in the type section


class Btf:
    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError("BTF too short")
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(
            data
        )
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x}")
        self._types = data[hdr_len + type_off : hdr_len + type_off + type_len]
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        if len(self._types) % _WORD:
            raise BtfError("BTF type section is not made of 4-byte words")
        # every record is whole words: walked as words, not unpacked (4x faster,
        # which counts at each start under emulation)
        self._words = memoryview(self._types).cast("I")
        self._offsets = self._index()

    @classmethod
    def load(cls, path: Path | None = None) -> Btf:
        path = path or Path(os.environ.get(BTF_ENV) or VMLINUX)
        try:
            return cls(path.read_bytes())
        except OSError as exc:
            raise BtfError(f"cannot read {path}: {exc.strerror}") from None

    def _index(self) -> list[int]:
        """Where each type id's record starts, in words (id 0 is void)."""
        offsets = [0]
        append = offsets.append
        words = self._words
        pos, end = 0, len(words)
        while pos < end:
            append(pos)
            info = words[pos + 1]
            kind = (info >> 24) & 0x1F
            pos += _TYPE_WORDS + _EXTRA_WORDS[kind] + _ENTRY_WORDS[kind] * (info & 0xFFFF)
        return offsets

    def _name(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def type(self, type_id: int) -> _Type:
        pos = self._offsets[type_id] * _WORD
        name_off, info, ref = _TYPE.unpack_from(self._types, pos)
        return _Type(
            kind=(info >> 24) & 0x1F,
            name=self._name(name_off),
            vlen=info & 0xFFFF,
            kflag=bool(info >> 31),
            ref=ref,
            data_pos=pos + _TYPE.size,
        )

    def find_struct(self, name: str) -> int:
        """The id of the struct so named (the first with members, not a declaration)."""
        return self.find(name, KIND_STRUCT, "struct")

    def find(self, name: str, kind: int, what: str) -> int:
        """The id of the first type of this kind so named (what: the kind, for errors)."""
        wanted = self._strings.find(b"\0" + name.encode() + b"\0")
        if wanted < 0:
            raise BtfError(f"no {what} {name} in the BTF")
        name_off = wanted + 1
        words = self._words
        for type_id, pos in enumerate(self._offsets[1:], start=1):
            if words[pos] == name_off and (words[pos + 1] >> 24) & 0x1F == kind:
                return type_id
        raise BtfError(f"no {what} {name} in the BTF")

    def resolve(self, type_id: int) -> int:
        """Skip typedefs and qualifiers."""
        while self.type(type_id).kind in _MODIFIERS:
            type_id = self.type(type_id).ref
        return type_id

    def member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(byte offset, type id) of a member, looking into anonymous structs and unions."""
        t = self.type(self.resolve(type_id))
        if t.kind not in (KIND_STRUCT, KIND_UNION):
            return None
        for i in range(t.vlen):
            name_off, member_type, offset = _MEMBER.unpack_from(
                self._types, t.data_pos + i * _MEMBER.size
            )
            bits = offset & 0xFFFFFF if t.kflag else offset
            member_name = self._name(name_off)
            if member_name == name:
                return bits // 8, member_type
            if not member_name:  # anonymous: its members are the outer struct's
                inner = self.member(member_type, name)
                if inner is not None:
                    return bits // 8 + inner[0], inner[1]
        return None

    def enum_value(self, enum_name: str, enumerator: str) -> int:
        """The value of one enumerator of a named enum (enum sock_flags, SOCK_DONE)."""
        t = self.type(self.find(enum_name, KIND_ENUM, "enum"))
        for i in range(t.vlen):
            pos = t.data_pos + i * _ENUMERATOR.size
            name_off, value = _ENUMERATOR.unpack_from(self._types, pos)
            if self._name(name_off) == enumerator:
                return value
        raise BtfError(f"enum {enum_name} has no {enumerator}")

    def offset_of(self, struct_name: str, path: str) -> int:
        """Byte offset of a dotted member path, as offsetof(struct NAME, a.b.c)."""
        type_id = self.find_struct(struct_name)
        total = 0
        for part in path.split("."):
            found = self.member(type_id, part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path}")
            offset, type_id = found
            total += offset
        return total


@dataclass(frozen=True)
class NetnsOffsets:
    """Where a socket's network namespace inode is: *(sk + sock_net) is the struct net,
    and the inode is at net + net_inum."""

    sock_net: int
    net_inum: int

    def cflags(self) -> list[str]:
        return [f"-DSK_NET_OFFSET={self.sock_net}", f"-DNET_INUM_OFFSET={self.net_inum}"]


def netns_offsets(btf: Btf | None = None) -> NetnsOffsets:
    """offsetof(struct sock, __sk_common.skc_net.net) and offsetof(struct net, ns.inum)."""
    btf = btf or Btf.load()
    return NetnsOffsets(
        sock_net=btf.offset_of("sock", "__sk_common.skc_net.net"),
        net_inum=btf.offset_of("net", "ns.inum"),
    )


# Where the tracepoint sock:inet_sock_set_state takes its fields from (its
# TP_fast_assign): (macro for the BPF program, struct, member path).
SOCK_FIELDS = (
    ("SK_FAMILY_OFFSET", "sock", "__sk_common.skc_family"),
    ("SK_PROTOCOL_OFFSET", "sock", "sk_protocol"),
    ("SK_DPORT_OFFSET", "sock", "__sk_common.skc_dport"),
    ("SK_DADDR_OFFSET", "sock", "__sk_common.skc_daddr"),
    ("SK_V6_SADDR_OFFSET", "sock", "__sk_common.skc_v6_rcv_saddr"),
    ("SK_V6_DADDR_OFFSET", "sock", "__sk_common.skc_v6_daddr"),
    ("INET_SPORT_OFFSET", "inet_sock", "inet_sport"),
    ("INET_SADDR_OFFSET", "inet_sock", "inet_saddr"),
)


@dataclass(frozen=True)
class SockOffsets:
    """Where the nested program (bpf/tcptrace.bpf.c, NESTED) reads what the tracepoint
    gives: {macro: byte offset from the socket}."""

    offsets: dict[str, int]

    def cflags(self) -> list[str]:
        return [f"-D{macro}={offset}" for macro, offset in self.offsets.items()]


def sock_offsets(btf: Btf | None = None) -> SockOffsets:
    """The tracepoint's fields in struct sock and struct inet_sock (which begins with
    its struct sock), from the running kernel's BTF."""
    btf = btf or Btf.load()
    return SockOffsets({macro: btf.offset_of(st, path) for macro, st, path in SOCK_FIELDS})


@dataclass(frozen=True)
class TimewaitOffsets:
    """What the program reads of a socket at its FIN_WAIT2/CLOSING -> CLOSE to tell
    whether a timewait socket took its place, and in which substate: the socket is
    out of the established hash already (inet_twsk_hashdance_schedule unhashed it
    before tcp_done) only when one did; SOCK_DONE is set when the peer's FIN came
    (tcp_fin), so the timewait socket is in TIME_WAIT, not an orphan's FIN_WAIT2."""

    node_pprev: int  # offsetof(struct sock, __sk_common.skc_node.pprev): NULL, unhashed
    flags: int  # offsetof(struct sock, sk_flags): __sk_common.skc_flags in newer kernels
    sock_done_bit: int  # SOCK_DONE in enum sock_flags

    def cflags(self) -> list[str]:
        return [
            f"-DSK_PPREV_OFFSET={self.node_pprev}",
            f"-DSK_FLAGS_OFFSET={self.flags}",
            f"-DSOCK_DONE_BIT={self.sock_done_bit}",
        ]


NO_TIMEWAIT_OFFSETS = TimewaitOffsets(node_pprev=-1, flags=-1, sock_done_bit=0)


def timewait_offsets(btf: Btf | None = None) -> TimewaitOffsets:
    btf = btf or Btf.load()
    try:
        flags = btf.offset_of("sock", "__sk_common.skc_flags")
    except BtfError:
        flags = btf.offset_of("sock", "sk_flags")  # older kernels
    return TimewaitOffsets(
        node_pprev=btf.offset_of("sock", "__sk_common.skc_node.pprev"),
        flags=flags,
        sock_done_bit=btf.enum_value("sock_flags", "SOCK_DONE"),
    )


@dataclass(frozen=True)
class TaskOffsets:
    """Where the process's name is, as ps -o comm shows it: the comm of the current
    thread's group leader (bpf_get_current_comm gives the thread's own name)."""

    group_leader: int  # offsetof(struct task_struct, group_leader)
    comm: int  # offsetof(struct task_struct, comm)

    def cflags(self) -> list[str]:
        return [f"-DTASK_LEADER_OFFSET={self.group_leader}", f"-DTASK_COMM_OFFSET={self.comm}"]


NO_TASK_OFFSETS = TaskOffsets(group_leader=-1, comm=-1)


def task_offsets(btf: Btf | None = None) -> TaskOffsets:
    btf = btf or Btf.load()
    return TaskOffsets(
        group_leader=btf.offset_of("task_struct", "group_leader"),
        comm=btf.offset_of("task_struct", "comm"),
    )


@dataclass(frozen=True)
class AcceptOffsets:
    """Where the program finds, at accept()'s return, the socket behind the new file
    descriptor: current->files->fdt->fd[fd]->private_data (struct socket)->sk."""

    task_files: int  # offsetof(struct task_struct, files)
    files_fdt: int  # offsetof(struct files_struct, fdt)
    fdt_max_fds: int  # offsetof(struct fdtable, max_fds)
    fdt_fd: int  # offsetof(struct fdtable, fd)
    file_private: int  # offsetof(struct file, private_data)
    socket_sk: int  # offsetof(struct socket, sk)

    def cflags(self) -> list[str]:
        return [
            f"-DTASK_FILES_OFFSET={self.task_files}",
            f"-DFILES_FDT_OFFSET={self.files_fdt}",
            f"-DFDT_MAX_FDS_OFFSET={self.fdt_max_fds}",
            f"-DFDT_FD_OFFSET={self.fdt_fd}",
            f"-DFILE_PRIVATE_OFFSET={self.file_private}",
            f"-DSOCKET_SK_OFFSET={self.socket_sk}",
        ]


def accept_offsets(btf: Btf | None = None) -> AcceptOffsets:
    btf = btf or Btf.load()
    return AcceptOffsets(
        task_files=btf.offset_of("task_struct", "files"),
        files_fdt=btf.offset_of("files_struct", "fdt"),
        fdt_max_fds=btf.offset_of("fdtable", "max_fds"),
        fdt_fd=btf.offset_of("fdtable", "fd"),
        file_private=btf.offset_of("file", "private_data"),
        socket_sk=btf.offset_of("socket", "sk"),
    )


# The map-element iterator's context as the BPF program declares it (bpf/tcptrace.bpf.c):
# (struct, member, offset). The verifier types the program's reads by the kernel's BTF,
# so the declaration must match the running kernel's.
MAP_ITER_LAYOUT = (
    ("bpf_iter__bpf_map_elem", "meta", 0),
    ("bpf_iter__bpf_map_elem", "map", 8),
    ("bpf_iter__bpf_map_elem", "key", 16),
    ("bpf_iter__bpf_map_elem", "value", 24),
    ("bpf_iter_meta", "seq", 0),
)


def map_iter_problem(btf: Btf | None = None) -> str | None:
    """Why the program's map-iterator context does not fit this kernel (None: it does)."""
    try:
        btf = btf or Btf.load()
        for struct_name, member, expected in MAP_ITER_LAYOUT:
            found = btf.offset_of(struct_name, member)
            if found != expected:
                return f"struct {struct_name}.{member} is at {found}, not {expected}"
    except (BtfError, OSError) as exc:
        return f"no usable BTF ({exc})"
    return None
