"""Python 3.9 to 3.13, as pyproject.toml promises (requires-python >= 3.9).

scripts/test runs vermin for 3.10+ syntax, library members and keyword arguments;
these tests catch what it cannot see reliably (`X | Y` evaluated at run time), check
compat.slotted, and compile and import the package under every interpreter of that
range that pyenv has (this machine kind always has them: with CI=true a missing one
fails, elsewhere its test skips with the reason).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import os
import pickle
import re
import subprocess
import sysconfig
from importlib.metadata import metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from tcptrace.compat import slotted

ROOT = Path(__file__).resolve().parents[1]
# Every directory of the project's own Python
SOURCES = ("tcptrace", "tests", "benchmarks")
MINORS = range(9, 14)
PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Modules that import click when imported (everything else imports it lazily or not
# at all): compiled only under a Python the venv's click does not support (3.9 now).
NEED_CLICK = ("tcptrace.cli", "tcptrace.manpage")
# Names that are types when one side of `|` outside an annotation is one
BUILTIN_TYPES = frozenset(
    {"bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list"}
    | {"memoryview", "object", "range", "set", "slice", "str", "tuple", "type"}
)


def python_files() -> list[Path]:
    return sorted(p for d in SOURCES for p in (ROOT / d).rglob("*.py"))


# --- `X | Y` evaluated at run time (PEP 604 unions are 3.10+) ---------------------


def _type_like(node: ast.expr) -> bool:
    """None, a builtin type, a CapWords name (a class; not a FLAG constant) or a
    generic alias such as list[int]."""
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Subscript):
        return _type_like(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _type_like(node.left) or _type_like(node.right)
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return name in BUILTIN_TYPES or (name[:1].isupper() and any(c.islower() for c in name))


def _annotations(tree: ast.AST) -> list[ast.expr]:
    found: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            found += [a.annotation for a in every if a is not None and a.annotation is not None]
            found += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
    return found


def union_problems(source: str, name: str) -> list[str]:
    tree = ast.parse(source, name)
    postponed = any(
        isinstance(n, ast.ImportFrom)
        and n.module == "__future__"
        and any(a.name == "annotations" for a in n.names)
        for n in tree.body
    )
    problems: list[tuple[int, str]] = []
    in_annotations: set[int] = set()
    for annotation in _annotations(tree):
        unions = [
            n
            for n in ast.walk(annotation)
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
        ]
        in_annotations.update(id(n) for n in unions)
        if unions and not postponed:
            problems.append(
                (
                    annotation.lineno,
                    "`X | Y` annotation without `from __future__ import annotations` "
                    "(3.9 evaluates it)",
                )
            )
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.BitOr)
            and id(node) not in in_annotations
            and (_type_like(node.left) or _type_like(node.right))
        ):
            problems.append((node.lineno, f"`{ast.unparse(node)}` evaluated at run time"))
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if called == "get_type_hints":
                # it evaluates the annotations: `X | Y` in them fails on 3.9
                problems.append((node.lineno, "get_type_hints evaluates annotations"))
    return [f"{name}:{line}: {what}" for line, what in sorted(problems, key=lambda p: p[0])]


def test_no_union_type_is_evaluated_at_run_time() -> None:
    problems = [
        problem
        for path in python_files()
        for problem in union_problems(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not problems, "3.10-only unions:\n" + "\n".join(problems)


def test_the_union_check_finds_what_3_9_cannot_run() -> None:
    sample = (
        "import typing\n"
        "Alias = int | None\n"
        "def f(x: int | None) -> str | None:\n"
        "    return isinstance(x, int | str) or typing.cast(list[int] | None, x)\n"
        "def g(flags: int) -> int:\n"
        "    typing.get_type_hints(f)\n"
        "    return flags | F_OWNER | g.A | 3\n"
    )
    annotation = "`X | Y` annotation without `from __future__ import annotations`"
    assert union_problems(sample, "s.py") == [
        "s.py:2: `int | None` evaluated at run time",
        f"s.py:3: {annotation} (3.9 evaluates it)",
        f"s.py:3: {annotation} (3.9 evaluates it)",
        "s.py:4: `int | str` evaluated at run time",
        "s.py:4: `list[int] | None` evaluated at run time",
        "s.py:6: get_type_hints evaluates annotations",
    ]
    # postponed annotations are never evaluated: only the run-time unions remain
    postponed = union_problems("from __future__ import annotations\n" + sample, "s.py")
    assert [p.split(":")[1] for p in postponed] == ["3", "5", "5", "7"]


# --- compat.slotted: dataclass(slots=True) on 3.9 ---------------------------------


@slotted
@dataclasses.dataclass
class Row:
    name: str
    items: list[int] = dataclasses.field(default_factory=list)
    count: int = 0


@slotted
@dataclasses.dataclass(frozen=True)
class Key:
    addr: str
    port: int = 0


def test_slotted_has_slots_and_the_dataclass_behaviour() -> None:
    row = Row("a")
    assert Row.__slots__ == ("name", "items", "count")
    assert not hasattr(row, "__dict__")
    with pytest.raises(AttributeError):
        row.other = 1  # type: ignore[attr-defined]
    assert row == Row("a", [], 0) and row.items is not Row("a").items
    row.count += 2
    assert dataclasses.asdict(row) == {"name": "a", "items": [], "count": 2}
    assert dataclasses.replace(row, name="b") == Row("b", [], 2)
    assert repr(row) == "Row(name='a', items=[], count=2)"
    assert Row.__qualname__ == "Row" and Row.__module__ == __name__
    with pytest.raises(TypeError, match="already specifies __slots__"):

        @slotted
        @dataclasses.dataclass
        class Twice:
            __slots__ = ("x",)
            x: int


def test_slotted_frozen_stays_frozen_and_copies_and_pickles() -> None:
    key = Key("127.0.0.1", 80)
    assert not hasattr(key, "__dict__") and hash(key) == hash(Key("127.0.0.1", 80))
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.port = 81  # type: ignore[misc]
    assert copy.copy(key) == key and copy.deepcopy(key) == key
    assert pickle.loads(pickle.dumps(key)) == key
    assert Key("::1").port == 0


# --- compiled and imported under each interpreter ---------------------------------

# Run by each interpreter: compile every file of the project (warnings as errors, as
# 3.12+ turn invalid escapes into SyntaxWarnings), then import every tcptrace module
# except those needing bcc (loader imports it lazily: all of them import here).
CHILD = r"""
import importlib, pkgutil, sys, warnings
root, site, need_click, *files = sys.argv[1:]
sys.path.insert(0, root)
sys.path.append(site)  # the venv's pure-Python click, pyroute2 and prometheus_client
with warnings.catch_warnings():
    warnings.simplefilter("error")
    for path in files:
        with open(path, "rb") as f:
            compile(f.read(), path, "exec", dont_inherit=True)
try:
    import click
except Exception:
    click = None
import tcptrace
names = ["tcptrace"] + [m.name for m in pkgutil.walk_packages(tcptrace.__path__, "tcptrace.")]
imported = []
for name in names:
    if click is None and name in need_click.split(","):
        continue
    importlib.import_module(name)
    imported.append(name)
print(len(files), "click" if click else "no-click", *sorted(imported))
"""


def interpreter(minor: int) -> Path | None:
    """pyenv's newest 3.<minor>.x."""
    found = []
    for path in PYENV_VERSIONS.glob(f"3.{minor}.*"):
        if re.fullmatch(rf"3\.{minor}\.\d+", path.name) and (path / "bin/python").is_file():
            found.append((int(path.name.split(".")[2]), path / "bin/python"))
    return max(found)[1] if found else None


def package_modules() -> list[str]:
    names = []
    for path in (ROOT / "tcptrace").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return sorted(names)


@pytest.mark.parametrize("minor", MINORS, ids=[f"3.{m}" for m in MINORS])
def test_compiles_and_imports_under(minor: int) -> None:
    python = interpreter(minor)
    if python is None:
        message = f"no Python 3.{minor} under {PYENV_VERSIONS}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    files = [str(p) for p in python_files()]
    site = sysconfig.get_path("purelib")
    # -I: nothing from the environment or the user's site; -B: no .pyc left behind
    done = subprocess.run(
        [str(python), "-I", "-B", "-c", CHILD, str(ROOT), site, ",".join(NEED_CLICK), *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    count, click, *imported = done.stdout.split()
    assert int(count) == len(files)
    # click imports wherever the venv's click supports the version (not 3.9 now)
    wanted = SpecifierSet(metadata("click")["Requires-Python"] or "").contains(f"3.{minor}")
    assert click == ("click" if wanted else "no-click"), done.stdout
    modules = package_modules()
    assert imported == (modules if wanted else [m for m in modules if m not in NEED_CLICK])
