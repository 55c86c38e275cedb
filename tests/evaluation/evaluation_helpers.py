"""Shared helpers of the evaluation tests: a tiny real open_clip model and a stub CLIP with fixed text vectors."""

import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from erasure.evaluation import Evaluator

# --------------------------------------------------------------------------------------------------------------
# A tiny real open_clip model (random weights), saved in open_clip's local-dir layout
# --------------------------------------------------------------------------------------------------------------

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_clip_model(seed: int = 0):
    """The tiny architecture with seeded random weights."""
    import open_clip

    if "erasure-tiny-clip" not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as configs:
            Path(configs, "erasure-tiny-clip.json").write_text(json.dumps(TINY_CLIP_CONFIG))
            open_clip.add_model_config(configs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model("erasure-tiny-clip", pretrained=None)


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random open_clip model as ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    from safetensors.torch import save_file

    model = tiny_clip_model(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    preprocess = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": preprocess})
    )
    return folder


# --------------------------------------------------------------------------------------------------------------
# A stub CLIP with fixed text vectors (images are passed as embeddings)
# --------------------------------------------------------------------------------------------------------------


class StubClip(torch.nn.Module):
    """``encode_text`` looks texts up in a fixed table; ``encode_image`` returns the first D pixel values."""

    def __init__(self, vectors: dict[str, list[float]], logit_scale: float = 100.0):
        super().__init__()
        self.texts = list(vectors)
        self.table = torch.nn.Parameter(torch.tensor([vectors[t] for t in self.texts], dtype=torch.float32))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(logit_scale)))
        self.embed_dim = self.table.shape[1]

    def encode_text(self, ids):
        return self.table[ids]

    def encode_image(self, pixels):
        return pixels.flatten(1)[:, : self.embed_dim]

    def tokenizer(self, texts):
        return torch.tensor([self.texts.index(t) for t in texts])


def stub_evaluator(vectors, **kwargs):
    stub = StubClip(vectors)
    return Evaluator(stub, lambda image: torch.zeros(3, 2, 2), stub.tokenizer, templates=("{}",), **kwargs)


def unit(*values):
    return F.normalize(torch.tensor(values, dtype=torch.float32), dim=-1).tolist()


# --------------------------------------------------------------------------------------------------------------
# A judge for the wiring tests: "shows the target" when the image's mean red exceeds its mean blue
# --------------------------------------------------------------------------------------------------------------


class RednessJudge:
    """A stand-in judge registered by the tests (``JUDGES["redness"] = "evaluation_helpers:RednessJudge"``)."""

    name = "redness"

    def __init__(self, argument=None, device="cpu"):
        self.argument = argument

    def describe(self):
        return {"kind": "test", "argument": self.argument}

    def judge(self, images, rows):
        from erasure.evaluation import Verdict

        out = []
        for image, row in zip(images, rows, strict=True):
            red = float(image[..., 0].mean()) > float(image[..., 2].mean())
            out.append(Verdict("red" if red else "not red", red, not red if row.role == "preserved" else None))
        return out


def save_strong_edit(pipe, folder: Path, seed: int = 0) -> Path:
    """A valid edit of one cross-attention key of ``pipe``: a delta 3x the tensor's size, fingerprinted."""
    from erasure.edit import Edit, fingerprint, pipeline_tensor

    key = "unet." + next(k for k in pipe.unet.state_dict() if ".attn2.to_k." in k)
    noise = torch.randn(pipeline_tensor(pipe, key).shape, generator=torch.Generator().manual_seed(seed))
    delta = noise * (3 * pipeline_tensor(pipe, key).norm() / noise.norm())
    config = {
        "method": "uce",
        "base_fingerprint": fingerprint({key: pipeline_tensor(pipe, key)}),
        "base_model": "tiny",
    }
    return Edit({key: delta}, config).save(folder)
