"""The command's entry point (`tcptrace`, `python -m tcptrace`): signals first."""

from __future__ import annotations

import sys

from tcptrace import startup

startup.install_early_signals()  # before click, bcc and LLVM load


def main() -> None:
    if sys.stdout is None:
        # started with its standard output closed (>&-): where would lines go?
        if sys.stderr is not None:
            sys.stderr.write("tcptrace: standard output is closed: nothing to write to\n")
        sys.exit(startup.EXIT_OUTPUT)
    from tcptrace.cli import main as command

    try:
        command()
    except OSError as exc:
        # click writing --help or a usage error to a full disk
        if exc.errno not in startup.OUTPUT_ERRNOS:
            raise
        sys.exit(startup.output_failed(exc, sys.stdout, sys.stderr))


if __name__ == "__main__":
    main()
