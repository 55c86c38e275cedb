"""The package's public API: every advertised name resolves, and importing the package imports no model code."""

import subprocess
import sys

import erasure


def test_every_public_name_resolves_to_its_module():
    for name in erasure._EXPORTS:
        value = getattr(erasure, name)
        assert value.__module__.startswith(erasure._EXPORTS[name]) or callable(value), name
    assert set(erasure.__all__) == {"__version__", *erasure._EXPORTS}


def test_importing_the_package_is_cheap():
    code = "import sys, erasure; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "[]"


def test_an_unknown_name_is_an_attribute_error():
    try:
        erasure.no_such_thing  # noqa: B018
    except AttributeError as error:
        assert "no_such_thing" in str(error)
    else:
        raise AssertionError("no AttributeError")
