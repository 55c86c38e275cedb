"""Bad input, as a hostile tester types it: a clear error naming the input, exit status != 0, nothing written.

Every case runs the real command line on a tiny saved pipeline. After each: the output folder is as it was (empty),
and the base model's files are byte-identical.
"""

import hashlib
import json

import pytest

from erasure.cli import main
from erasure.testing import save_tiny_pipeline

# (argv, text the error must contain); {model}, {out}, {run}, {concept}, {file} are filled in per test
CASES = [
    (["erase", "uce", "--model", "{out}/nowhere", "--prompt", "pip", "--out", "{out}/run"], "nowhere"),
    (["erase", "uce", "--model", "{model}", "--concept", "{out}/missing.toml", "--out", "{out}/run"], "missing.toml"),
    (["erase", "uce", "--model", "{model}", "--prompt", "pip", "--out", "{out}/run", "--erase-scal", "2"],
     "--erase-scale"),
    (["erase", "uce", "--model", "{model}", "--prompt", "pip", "--out", "{out}/run", "--lam", "nan"], "--lam"),
    (["erase", "uce", "--model", "{model}", "--prompt", "pip", "--out", "{out}/run", "--lam", "-1"], "lam"),
    (["erase", "esd-x", "--model", "{model}", "--prompt", "pip", "--out", "{out}/run", "--iterations", "0"],
     "--iterations"),
    (["erase", "fmn", "--model", "{model}", "--prompt", "pip", "--out", "{out}/run", "--images", "{out}/no-dir"],
     "no-dir"),
    (["erase", "uce", "--model", "{model}", "--prompt", "pip", "--out", "{file}"], "{file}"),
    (["erase", "uce", "--model", "{model}", "--out", "{out}/run"], "--prompt"),
    (["export", "{out}/no-run", "--format", "lora", "--out", "{out}/lora"], "no-run"),
    (["export", "{run}", "--format", "diffusers", "--out", "{out}/x", "--scale", "nan"], "--scale"),
    (["export", "{run}", "--format", "lora", "--out", "{out}/x", "--rank", "0"], "--rank"),
    (["export", "{run}", "--format", "onnx", "--out", "{out}/x"], "onnx"),
    (["export", "{run}", "--format", "single-file", "--out", "{out}/x.bin", "--model", "{model}"], ".safetensors"),
    (["grid", "--model", "{model}", "--concept", "{concept}", "--out", "{out}/g.png", "--per-group", "-1"],
     "--per-group"),
    (["grid", "--images", "{out}/no-images", "--out", "{out}/g.png"], "no-images"),
    (["grid", "--model", "{model}", "--concept", "{concept}", "--prompts", "{concept}", "--out", "{out}/g.png"],
     "--concept"),
    (["grid", "--model", "{model}", "--edit", "{out}/no-edit", "--concept", "{concept}", "--out", "{out}/g.png"],
     "no-edit"),
    (["report", "{out}/no-eval", "--out", "{out}/r.html"], "no-eval"),
    (["demo", "--method", "banana", "--out", "{out}/demo"], "banana"),
    (["demo", "--steps", "0", "--out", "{out}/demo"], "--steps"),
    (["evaluate", "--model", "{model}", "--concept", "{concept}", "--out", "{out}/e", "--steps", "0"], "--steps"),
    (["evaluate", "--model", "{model}", "--concept", "{concept}", "--out", "{out}/e", "--batch-size", "0"],
     "--batch-size"),
    (["evaluate", "--model", "{model}", "--concept", "{concept}", "--out", "{out}/e", "--guidance", "nan"],
     "--guidance"),
]  # fmt: skip

CONCEPT = """
[[concept]]
name = "pip"
kind = "character"
erase = ["pip"]
evaluate = ["a drawing of pip"]
"""


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    model = save_tiny_pipeline(root / "tiny-sd1", "sd1")
    concept = root / "pip.toml"
    concept.write_text(CONCEPT)
    run = root / "run"
    argv = ["erase", "uce", "--model", str(model), "--prompt", "pip", "--out", str(run), "--no-progress"]
    assert main([*argv, "--device", "cpu"]) == 0
    return {"model": model, "concept": concept, "run": run}


def status(argv):
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return exit_.code


@pytest.mark.parametrize(
    "argv, expected", CASES, ids=[" ".join(argv[:2]) + f" [{i}]" for i, (argv, _) in enumerate(CASES)]
)
def test_bad_input_is_refused_clearly_and_writes_nothing(world, tmp_path, capsys, argv, expected):
    out = tmp_path / "outputs"
    out.mkdir()
    file = out / "a-file"
    file.write_text("keep me")
    names = {"model": world["model"], "concept": world["concept"], "run": world["run"], "out": out, "file": file}
    before_model, before_run = digest(world["model"]), digest(world["run"])
    filled = [part.format(**names) for part in argv]
    assert status(filled) not in (0, None)
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert expected.format(**names) in last, err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["a-file"] and file.read_text() == "keep me"
    assert digest(world["model"]) == before_model and digest(world["run"]) == before_run


def test_an_altered_edit_is_refused_by_every_command_that_reads_it(world, tmp_path, capsys):
    altered = tmp_path / "altered"
    altered.mkdir()
    for item in world["run"].iterdir():
        (altered / item.name).write_bytes(item.read_bytes())
    config = json.loads((altered / "edit_config.json").read_text())
    config["method"] = "uce-but-renamed"
    (altered / "edit_config.json").write_text(json.dumps(config))
    out = tmp_path / "outputs"
    for argv in (
        ["export", str(altered), "--format", "lora", "--out", str(out / "lora")],
        ["grid", "--model", str(world["model"]), "--edit", str(altered), "--concept", str(world["concept"]),
         "--out", str(out / "g.png")],
    ):  # fmt: skip
        assert status(argv) == 1
        assert "uce-but-renamed" in capsys.readouterr().err
    assert not out.exists()
