"""tcptrace(8) is rendered from the click command: it must list exactly what --help lists."""

from __future__ import annotations

import re
import shutil
import subprocess

import click
import pytest
from click.testing import CliRunner

from tcptrace import __version__, manpage
from tcptrace.cli import main as command
from tests.conftest import IN_CI


def help_options(cmd: click.Command) -> list[str]:
    """The option column of --help, in order: '-p, --port PORTS', '--json', ..."""
    text = CliRunner().invoke(cmd, ["--help"], prog_name="tcptrace").output
    section = text.split("Options:\n", 1)[1].split("\n\n", 1)[0]
    return [m.group(1) for m in re.finditer(r"^  (-\S.*?)(?:\s{2,}|$)", section, re.M)]


def man_options(roff: str) -> list[str]:
    """The OPTIONS section's item headings, unescaped."""
    section = roff.split(".SH OPTIONS\n", 1)[1].split("\n.SH ", 1)[0]
    items = re.findall(r"^\.TP\n\.B (.*)$", section, re.M)
    return [item.replace("\\-", "-").replace("\\e", "\\") for item in items]


def test_options_are_those_of_help():
    options = man_options(manpage.render(command))
    assert options == help_options(command)
    assert "-p, --port PORTS" in options and "--version" in options


def test_an_added_option_appears_in_both():
    extra = click.Option(["--new-thing"], is_flag=True, help="A new thing.")
    grown = click.Command(
        "tcptrace",
        params=[*command.params, extra],
        help=command.help,
        epilog=command.epilog,
        context_settings=command.context_settings,
    )
    roff = manpage.render(grown)
    assert "--new-thing" in man_options(roff)
    assert man_options(roff) == help_options(grown)
    assert "A new thing." in roff


def test_header_examples_and_description():
    roff = manpage.render(command)
    assert roff.startswith(f'.TH TCPTRACE 8 "" "tcptrace {__version__}"')
    assert "tcptrace \\- show every TCP state transition live" in roff
    # every example line of the epilog, as written there
    examples = [line.strip() for line in command.epilog.splitlines() if "tcptrace " in line]
    assert examples
    for line in examples:
        assert manpage.escape(line) in roff
    assert manpage.EXAMPLES_FILE.replace("-", "\\-") in roff


def test_escape():
    assert manpage.escape("--port") == "\\-\\-port"
    assert manpage.escape(".hidden\n'quote") == "\\&.hidden\n\\&'quote"
    assert manpage.escape("a\\b") == "a\\eb"


def test_groff_renders_without_warnings(tmp_path):
    groff = shutil.which("groff")
    if groff is None:
        if IN_CI:
            pytest.fail("groff is missing (Debian: man-db depends on groff-base)")
        pytest.skip("groff is not installed")
    page = tmp_path / "tcptrace.8"
    page.write_text(manpage.render(command))
    done = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stderr == ""
    shown = subprocess.run(
        [groff, "-man", "-Tutf8", "-P-cbou", str(page)], capture_output=True, text=True
    ).stdout
    for option in help_options(command):
        # groff may break a long heading's metavar; the option names themselves stay whole
        for name in re.findall(r"--?[\w-]+", option):
            assert name in shown


def test_capabilities_are_told_one_way():
    """The man page and the README's systemd unit once said CAP_SYS_RESOURCE, the
    error and the README's error table CAP_DAC_READ_SEARCH."""
    from pathlib import Path

    from tcptrace.kernel.preflight import CAPABILITIES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"root (or {CAPABILITIES})" in readme
    roff = manpage.render(command).replace("\\-", "-")
    assert f"It needs root (or {CAPABILITIES})" in roff
