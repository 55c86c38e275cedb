"""``accelerate launch -m erasure evaluate``: two CPU processes (gloo) give the single-process results.

accelerate's ``--cpu`` flag launches one process unless MPI is set up; ``--multi_gpu`` launches through torchrun,
and ``erasure evaluate --device cpu`` then joins the processes over gloo, which needs no GPU.
"""

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from erasure.cli import main
from erasure.edit import Edit, fingerprint, pipeline_tensor
from erasure.files import load_image
from erasure.prompt_sets import PromptRow, save_prompt_csv
from erasure.testing import save_tiny_pipeline, tiny_pipeline

REPO = Path(__file__).resolve().parent.parent
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_tiny_clip(folder: Path) -> Path:
    """A tiny random open_clip model in open_clip's local-dir layout."""
    import open_clip
    from safetensors.torch import save_file

    if "erasure-tiny-clip" not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as configs:
            Path(configs, "erasure-tiny-clip.json").write_text(json.dumps(TINY_CLIP_CONFIG))
            open_clip.add_model_config(configs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("erasure-tiny-clip", pretrained=None)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    preprocess = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": preprocess})
    )
    return folder


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_two_processes_merge_to_the_single_process_result(tmp_path):
    # Launched as `python -m accelerate.commands.launch`: no console script on PATH needed (make test runs
    # .venv/bin/python without activating the environment).
    import accelerate.commands.launch  # noqa: F401  (a required dependency: fail, do not skip, if it is broken)

    model = save_tiny_pipeline(tmp_path / "sd", "sd1")
    clip = save_tiny_clip(tmp_path / "clip")
    rows = [
        PromptRow(0, "a drawing of Pip", 1, concept="Pip", type="erased", extra={"anchor": "a photo"}),
        PromptRow(1, "a picture of Pip", 2, concept="Pip", type="erased", extra={"anchor": "a photo"}),
        PromptRow(2, "a drawing of Zog", 3, concept="Zog", type="preserved", extra={"anchor": ""}),
        PromptRow(3, "a red square", 4, concept="a red square", type="preserved", extra={"anchor": ""}),
        PromptRow(7, "a cat", 5, type="", extra={"anchor": ""}),
    ]
    prompts = save_prompt_csv(rows, tmp_path / "prompts.csv")
    pipe = tiny_pipeline("sd1")
    key = "unet." + next(k for k in pipe.unet.state_dict() if ".attn2.to_k." in k)
    noise = torch.randn(pipeline_tensor(pipe, key).shape, generator=torch.Generator().manual_seed(0))
    delta = noise * (3 * pipeline_tensor(pipe, key).norm() / noise.norm())  # 3x the tensor: strong, and valid
    config = {"method": "uce", "base_fingerprint": fingerprint({key: pipeline_tensor(pipe, key)})}
    edit = Edit({key: delta}, config).save(tmp_path / "edit")
    args = ["evaluate", "--model", str(model), "--edit", str(edit), "--prompts", str(prompts), "--clip", str(clip)]
    # Batch size 1: each image is generated and embedded alone in both runs, so the shards see bit-identical
    # arithmetic and the merged numbers must equal the single-process ones exactly (batching is tested elsewhere).
    args += ["--steps", "2", "--height", "32", "--width", "32", "--batch-size", "1", "--device", "cpu"]

    assert main([*args, "--out", str(tmp_path / "single")]) == 0

    # The same thread count as this process: float reductions may be split differently with another.
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    done = subprocess.run(
        [*launch, "-m", "erasure", *args, "--out", str(tmp_path / "sharded")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # only the main process reports

    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    sharded = json.loads((tmp_path / "sharded" / "metrics.json").read_text())
    assert (single["num_processes"], sharded["num_processes"]) == (1, 2)
    assert sharded["generation"]["seeds"] == single["generation"]["seeds"]
    assert list(sharded["metrics"]) == list(single["metrics"]) == ["base", "edit"]
    for label, metrics in single["metrics"].items():
        for name, value in metrics.items():
            expected = value if value is None else pytest.approx(value, rel=1e-9, abs=1e-12)
            assert sharded["metrics"][label][name] == expected, (label, name)
    a, b = read_csv(tmp_path / "single" / "per_image.csv"), read_csv(tmp_path / "sharded" / "per_image.csv")
    keys = ("model", "case_number", "sample_index", "seed", "prompt", "image", "predicted")
    assert [tuple(r[k] for k in keys) for r in b] == [tuple(r[k] for k in keys) for r in a]
    for row in a:
        first, second = load_image(tmp_path / "single" / row["image"]), load_image(tmp_path / "sharded" / row["image"])
        np.testing.assert_array_equal(first, second)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
