"""erasure.resources: the documented lookup order, and an error that names every place it looked."""

from pathlib import Path

import pytest

from erasure import resources
from erasure.resources import ResourceNotFoundError, checkpoint, prompt_file

CHECKOUT = Path(__file__).resolve().parents[1]


def test_a_source_checkout_finds_its_own_checkpoints_and_prompts(monkeypatch):
    monkeypatch.delenv(resources.CHECKPOINTS_VARIABLE, raising=False)
    monkeypatch.delenv(resources.PROMPTS_VARIABLE, raising=False)
    assert checkpoint("toyworld-sd") == CHECKOUT / "checkpoints" / "toyworld-sd"
    assert prompt_file("toyworld/pip.toml") == CHECKOUT / "prompts" / "toyworld" / "pip.toml"


def test_the_environment_variable_comes_first(monkeypatch, tmp_path):
    (tmp_path / "toyworld-sd").mkdir()
    monkeypatch.setenv(resources.CHECKPOINTS_VARIABLE, str(tmp_path))
    assert checkpoint("toyworld-sd") == tmp_path / "toyworld-sd"
    assert checkpoint("toyworld-clip") == CHECKOUT / "checkpoints" / "toyworld-clip"  # not there: the next place


def test_installed_data_is_the_last_place(monkeypatch, tmp_path):
    package = tmp_path / "site-packages" / "erasure"
    (package / "data" / "prompts" / "toyworld").mkdir(parents=True)
    (package / "data" / "prompts" / "toyworld" / "pip.toml").write_text("")
    monkeypatch.setattr(resources, "_PACKAGE", package)  # as if installed from a wheel: no checkout above it
    monkeypatch.delenv(resources.PROMPTS_VARIABLE, raising=False)
    monkeypatch.delenv(resources.CHECKPOINTS_VARIABLE, raising=False)
    assert prompt_file("toyworld/pip.toml") == package / "data" / "prompts" / "toyworld" / "pip.toml"
    with pytest.raises(ResourceNotFoundError) as error:
        checkpoint("toyworld-sd")
    assert str(package / "data" / "checkpoints" / "toyworld-sd") in str(error.value)
    assert resources.CHECKPOINTS_VARIABLE in str(error.value)
