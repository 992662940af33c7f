"""tcptrace(8), rendered in roff from the click command itself, so it cannot drift from --help.

    python -m tcptrace.manpage > tcptrace.8

scripts/install writes the page from the installed code. OPTIONS holds click's own
help records (the very text --help prints); EXAMPLES and SHELL COMPLETION are the
command's epilog; the rest is the few facts --help has no room for.
"""

from __future__ import annotations

import re
import sys

import click

from tcptrace import __version__
from tcptrace.errors import EXIT_INTERRUPTED
from tcptrace.kernel.preflight import CAPABILITIES

SECTION = 8
# Where scripts/install puts the examples file and bash completion (named in FILES).
EXAMPLES_FILE = "/usr/local/share/doc/tcptrace/tcptrace_example.txt"
COMPLETION_FILE = "/usr/local/share/bash-completion/completions/tcptrace"
# click's marker for a paragraph it must not rewrap.
NO_REWRAP = "\b"


def escape(text: str) -> str:
    """Text as roff shows it literally: backslashes, hyphens (minus signs), leading dots."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def _epilog_sections(epilog: str) -> list[tuple[str, list[str]]]:
    """The epilog's no-rewrap blocks: a 'Heading (detail):' line, then literal lines."""
    sections = []
    for block in epilog.split(NO_REWRAP):
        lines = [line for line in block.strip("\n").splitlines() if line.strip()]
        if not lines:
            continue
        heading = re.sub(r"\s*\(.*\)", "", lines[0]).rstrip(":").strip().upper()
        body = lines[1:]
        indent = min(len(line) - len(line.lstrip()) for line in body) if body else 0
        sections.append((heading, [line[indent:] for line in body]))
    return sections


def render(command: click.Command, name: str = "tcptrace") -> str:
    ctx = click.Context(command, info_name=name, **command.context_settings)
    summary, _, _rest = (command.help or "").strip().partition("\n")
    out = [
        f'.TH {name.upper()} {SECTION} "" "{name} {__version__}" "System Administration"',
        ".SH NAME",
        f"{name} \\- {escape(summary[:1].lower() + summary[1:].rstrip('.'))}",
        ".SH SYNOPSIS",
        f".B {name}",
        "[\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
    ]
    for paragraph in _paragraphs(command.help or ""):
        out += [".PP", escape(paragraph)]
    out += [
        ".PP",
        f"It needs root (or {CAPABILITIES}), bcc's Python "
        "bindings and the running kernel's headers. Events it could not show are counted "
        "and reported as lost; the per-state statistics, kept in the kernel, stay exact. "
        "When something does not work, run tcptrace \\-\\-check first: one line per "
        "feature the kernel allows or refuses, and what tcptrace does instead.",
        ".SH OPTIONS",
    ]
    for param in command.get_params(ctx):
        # options only: the words after -r FILE are more files (SYNOPSIS shows them)
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record is None:
            continue
        opts, help_text = record
        out += [".TP", f".B {escape(opts)}", escape(help_text)]
    for heading, lines in _epilog_sections(command.epilog or ""):
        out += [f".SH {heading}", ".PP", ".nf", ".RS 2"]
        out += [escape(line) for line in lines]
        out += [".RE", ".fi"]
    out += [
        ".SH EXIT STATUS",
        ".TP",
        ".B 0",
        "Stopped by Ctrl\\-C, SIGTERM, \\-\\-count or \\-\\-duration; the summary was printed. "
        "With \\-\\-check: tracing works here (some features may be degraded).",
        ".TP",
        ".B 1",
        "A problem it names on one line (no root, no BPF, no headers, ...). With "
        "\\-\\-check: tracing does not work here.",
        ".TP",
        ".B 2",
        "A usage error.",
        ".TP",
        f".B {EXIT_INTERRUPTED}",
        "A second Ctrl\\-C, or Ctrl\\-C before tracing started.",
        ".SH ENVIRONMENT",
        ".TP",
        ".B NO_COLOR",
        "Set and not empty: no colour in the \\-\\-interval table.",
        ".TP",
        ".B TCPTRACE_DEBUG",
        "Set: an internal error shows Python's traceback.",
        ".SH FILES",
        ".TP",
        f".I {escape(EXAMPLES_FILE)}",
        "Real captures of real situations, each explained: a slow handshake, a "
        "CLOSE_WAIT leak, TIME_WAIT, lost events, JSON into jq.",
        ".TP",
        f".I {escape(COMPLETION_FILE)}",
        "bash completion of options, state names and timestamp styles, loaded by the "
        "bash\\-completion package in every new shell.",
        ".SH SEE ALSO",
        ".BR ss (8),",
        ".BR tcpstates\\-bpfcc (8),",
        ".BR tcplife\\-bpfcc (8),",
        ".BR jq (1)",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    from tcptrace.cli import main as command

    sys.stdout.write(render(command))


if __name__ == "__main__":
    main()
