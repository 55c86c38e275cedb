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


# --- strict parsing ----------------------------------------------------------------------------------------------


def _exit(argv):
    from erasure.cli import main

    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_a_misspelt_option_is_refused_and_the_nearest_is_named(capsys):
    import pytest

    for argv, nearest in (
        (["erase", "uce", "--model", "m", "--prompt", "p", "--out", "o", "--erase-scal", "2"], "--erase-scale"),
        (["grid", "--out", "o.png", "--stepz", "3"], "--steps"),
        (["evaluate", "--out", "o", "--stp", "3"], "--steps"),
    ):
        assert _exit(argv) != 0
        message = capsys.readouterr().err
        assert f"unrecognized option {argv[-2]}" in message and f"did you mean {nearest}?" in message, message
    with pytest.raises(SystemExit):  # a prefix is no longer taken for the full name
        from erasure.cli import build_parser

        build_parser(["export"]).parse_args(["export", "run", "--form", "lora", "--out", "x"])


def test_numbers_are_checked_where_they_are_parsed(capsys):
    cases = [
        (["evaluate", "--out", "o", "--steps", "0"], "--steps: must be at least 1"),
        (["evaluate", "--out", "o", "--batch-size", "0"], "--batch-size: must be at least 1"),
        (["evaluate", "--out", "o", "--guidance", "nan"], "--guidance: 'nan' is not a finite number"),
        (["grid", "--out", "o.png", "--scale", "inf"], "--scale: 'inf' is not a finite number"),
        (["export", "run", "--format", "lora", "--out", "x", "--rank", "0"], "--rank: must be at least 1"),
        (["erase", "uce", "--model", "m", "--prompt", "p", "--out", "o", "--erase-scale", "nan"], "--erase-scale"),
    ]
    for argv, expected in cases:
        assert _exit(argv) != 0, argv
        assert expected in capsys.readouterr().err, argv
