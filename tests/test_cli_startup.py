"""The command line starts without the heavy libraries: `erasure --help` and commands' stubs import none of them."""

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "open_clip")

PROBE = """
import sys
from erasure.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("imported:" + ",".join(name for name in {heavy!r} if name in sys.modules))
"""


def imported_after(argv: list[str]) -> list[str]:
    code = PROBE.format(argv=argv, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("imported:"), result.stdout
    return [name for name in line.removeprefix("imported:").split(",") if name]


def test_importing_the_cli_imports_no_heavy_library():
    result = subprocess.run(
        [sys.executable, "-c", f"import sys, erasure.cli; print([m for m in {HEAVY!r} if m in sys.modules])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.strip() == "[]"


def test_top_level_help_and_a_command_help_import_no_heavy_library():
    assert imported_after(["--help"]) == []
    assert imported_after(["report", "--help"]) == []
    assert imported_after(["grid", "--help"]) == []


def test_every_command_is_listed_and_its_full_parser_is_built_when_named():
    from erasure.cli import COMMAND_HELP, COMMANDS, build_parser, requested_command

    assert COMMANDS.keys() == COMMAND_HELP.keys()
    assert requested_command(["-v", "erase", "uce"]) == "erase"
    assert requested_command(["--help"]) is None and requested_command(["nonsense"]) is None
    stub = build_parser(["--help"])._subparsers._group_actions[0].choices["export"]
    full = build_parser(["export"])._subparsers._group_actions[0].choices["export"]
    assert len(full._actions) > len(stub._actions) == 1  # the stub has only -h
