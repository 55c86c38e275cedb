"""``accelerate launch -m erasure evaluate``: two CPU processes (gloo) give the single-process results.

accelerate's ``--cpu`` flag launches one process unless MPI is set up; ``--multi_gpu`` launches through torchrun,
and ``erasure evaluate --device cpu`` then joins the processes over gloo, which needs no GPU.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluation_helpers import save_tiny_clip

from erasure.cli import main
from erasure.edit import Edit, fingerprint, pipeline_tensor
from erasure.files import load_image
from erasure.prompt_sets import PromptRow, save_prompt_csv
from erasure.testing import save_tiny_pipeline, tiny_pipeline

REPO = Path(__file__).resolve().parents[2]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow  # two accelerate processes: ~25 s
def test_two_processes_merge_to_the_single_process_result(tmp_path):
    # Launched as `python -m accelerate.commands.launch`: no console script on PATH needed (make test runs
    # .venv/bin/python without activating the environment).
    import accelerate.commands.launch  # noqa: F401  (a required dependency: fail, do not skip, if it is broken)

    model = save_tiny_pipeline(tmp_path / "sd", "sd1")
    clip = save_tiny_clip(tmp_path / "clip")
    rows = [
        PromptRow(0, "a drawing of Pip", 1, concept="Pip", row_type="erased", extra={"anchor": "a photo"}),
        PromptRow(1, "a picture of Pip", 2, concept="Pip", row_type="erased", extra={"anchor": "a photo"}),
        PromptRow(2, "a drawing of Zog", 3, concept="Zog", row_type="preserved", extra={"anchor": ""}),
        PromptRow(3, "a red square", 4, concept="a red square", row_type="preserved", extra={"anchor": ""}),
        PromptRow(7, "a cat", 5, row_type="", extra={"anchor": ""}),
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


def test_gather_puts_every_process_share_back_in_prompt_order(monkeypatch):
    # Each process holds some jobs' embeddings and verdicts; gather_object returns the processes' objects in rank
    # order. The merge must follow the job indices, whatever the shards look like.
    import accelerate.utils

    from erasure.evaluation.jobs import EvaluationPlan, Generation, ImageJob, ModelEntry
    from erasure.evaluation.judges import Verdict
    from erasure.evaluation.run import _gather

    rows = [PromptRow(i, f"prompt {i}", i) for i in range(5)]
    jobs = [ImageJob(i, row, 0, i) for i, row in enumerate(rows)]
    plan = EvaluationPlan([ModelEntry("base", "base", "m"), ModelEntry("edit", "edit", "e")], jobs, Generation(), 1)
    features = {
        label: torch.randn(5, 3, generator=torch.Generator().manual_seed(k))
        for k, label in enumerate(("base", "edit"))
    }

    def share(indices):
        return {
            "index": indices,
            "features": {label: value[indices] for label, value in features.items()},
            "verdicts": {"judge": {label: [Verdict(f"{label}{i}") for i in indices] for label in features}},
        }

    shares = [share([3, 1, 4]), share([0, 2])]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objects: [*shares])

    class TwoProcesses:
        num_processes = 2

    merged, verdicts = _gather(TwoProcesses(), shares[0], plan)
    for label, value in features.items():
        assert torch.equal(merged[label], value)
        assert [v.label for v in verdicts["judge"][label]] == [f"{label}{i}" for i in range(5)]
    shares[1] = share([0])  # image 2 is missing: refuse, never write a partial evaluation
    with pytest.raises(RuntimeError, match="not each of the 5 once"):
        _gather(TwoProcesses(), shares[0], plan)
