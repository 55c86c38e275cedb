"""The wheel: every package is in it, and an installed wheel runs `erasure demo` from an empty folder."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def configured_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_python_package_is_listed_for_the_wheel():
    found = set(find_packages(str(ROOT), include=["erasure", "erasure.*", "toyworld_train", "toyworld_train.*"]))
    listed = set(configured_packages())
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    data = listed - found
    assert data == {"erasure.data.checkpoints", "erasure.data.prompts"}


@pytest.mark.slow
def test_an_installed_wheel_runs_the_demo_from_an_empty_folder(tmp_path):
    source = tmp_path / "source"  # a copy of the tracked files: the build writes build/ into its source folder
    tracked = subprocess.check_output(["git", "ls-files", "-z"], cwd=ROOT, text=True).split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
                   check=True, cwd=tmp_path)  # fmt: skip
    (wheel,) = wheels.glob("erasure-*.whl")
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = fresh / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())  # fmt: skip
    # the dependencies (torch, diffusers, ...) come from this environment; erasure only from the wheel
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)], check=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ERASURE_", "PYTHONPATH"))}
    located = subprocess.run([python, "-c", "import erasure; print(erasure.__file__)"], cwd=empty, text=True,
                             capture_output=True, env=environment, check=True)  # fmt: skip
    assert Path(located.stdout.strip()).is_relative_to(site), located.stdout  # the wheel's copy, not the checkout
    command = [python, "-m", "erasure", "demo", "--out", "run", "--steps", "2", "--seeds-per-prompt", "1"]
    result = subprocess.run(command, cwd=empty, text=True, capture_output=True, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("samples.png", "edit", "evaluation", "grid.png", "report.html"):
        assert (empty / "run" / name).exists(), name
