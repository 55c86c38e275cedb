"""Benchmark the erasure methods: wall time, UNet forward passes, peak memory against the pipeline's own weights.

Two pipelines:

* the shipped toy-world pipeline (``--toy``, default ``checkpoints/toyworld-sd``): every method of ``--methods``
  with its default config on a toy-world concept file (``--toy-iterations`` caps ESD's iterations; the full run's
  time is then extrapolated);
* an SD 1.4-sized pipeline (``--sd14``): the real SD 1.4 ``UNet2DConditionModel`` and CLIP ViT-L/14 text encoder
  architectures, built from the configs written below with random weights (nothing is downloaded), a *small* VAE
  (4 levels, so latents are 1/8 of the image side as in SD, but 32-64 channels: ESD and UCE never touch the VAE,
  Forget-Me-Not only encodes its images once) and a CLIP-style tokenizer generated in code
  (:func:`erasure.testing.tiny_tokenizer`) whose vocabulary holds synthetic concept names. On it: UCE with 1, 10
  and 100 concepts, RECE with 1 and 100, MACE's closed-form stage with 10 and 100 and all three stages on 1
  concept, ESD-x iterations, Forget-Me-Not steps, Concept Ablation steps (anchor
  images are setup) and AdvUnlearn iterations (one plain warm-up iteration, then attacked ones with
  ``--attack-steps`` inner steps each; the official 30 cost 30 times one inner step).

Every measurement runs in a fresh subprocess (``--in-process`` turns that off), so runs do not contaminate each
other. The worker builds the pipeline, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and runs
``method.apply``; ``peak_rss`` is the process's ``VmHWM`` afterwards: everything resident during ``apply``
(Python and torch themselves, the weights, the method's copies, activations). ``process_peak_rss`` is the whole
worker's ``ru_maxrss``, building included. The memory ratio is ``peak_rss / pipeline weight bytes`` (parameters and
buffers of UNet, text encoder and VAE); ``runtime_rss`` (the worker's RSS after imports, before any model exists)
is part of the numerator. Workers run with fixed glibc malloc thresholds (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` = 1 MiB) so freed tensors leave the RSS instead of lingering in the heap;
``--malloc-default`` turns that off.

UNet forward passes are counted with forward hooks on the UNet, optimizer steps with torch's global step hook: a
forward belongs to the iteration whose optimizer step follows it. Forwards made while Forget-Me-Not generates its
training images are counted apart, as setup. Phases (prompt encoding, ridge solves, DDIM trajectories, image
generation) are timed by wrapping the functions the method modules call.

ESD iteration cost: an iteration runs ``k`` guided DDIM steps (one batch-2 forward each, no gradients), one batch-2
forward of the original weights (no gradients), one batch-1 forward with gradients and its backward, with ``k``
uniform in ``{0, ..., ddim_steps - 1}``. The SD 1.4 run uses ``ddim_steps = 1`` by default (``k = 0``: two
forwards), and reports the paper setting's expected iteration time ``T(k=0) + 24.5 * t(batch-2 forward)`` (``E[k]``
for 50 steps).

Examples::

    python scripts/bench_methods.py --toy /tmp/ck3/ck/toyworld-sd --no-sd14 --json bench_toy.json
    python scripts/bench_methods.py --no-toy --sd14 --json bench_sd14.json
    python scripts/bench_methods.py --tiny   # a few seconds: tiny test pipelines, in one process
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import random
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOY = REPO / "checkpoints" / "toyworld-sd"
DEFAULT_TOY_CONCEPTS = REPO / "prompts" / "toyworld" / "pip.toml"
TOY_METHODS = ("uce", "esd-x", "esd-u", "resteer")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
MIB = 1024 * 1024

#: SD 1.4's UNet (CompVis/stable-diffusion-v1-4, unet/config.json); the rest are diffusers defaults that match it.
SD14_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}
#: SD 1.4's text encoder, CLIP ViT-L/14 (openai/clip-vit-large-patch14, text_config).
SD14_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}
#: A small VAE with SD's latent geometry (4 channels, 8x downsampling); not SD's 83M-parameter VAE.
SMALL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SYLLABLES = (
    "ka", "zo", "ri", "mu", "te", "lo", "va", "ne", "si", "du", "po", "ge", "fa", "xi", "bo", "ru", "qe", "wi",
    "ha", "jo", "ce", "nu", "pe", "ty",
)  # fmt: skip
ERASE_TEMPLATES = ("{}", "a painting by {}", "art by {}", "a picture of {}", "in the style of {}")
PRESERVE_TEMPLATES = ("{}", "a painting by {}", "art by {}", "a picture of {}", "in the style of {}")


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def synthetic_words(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct made-up lowercase names of 2-3 syllables (``"kazori"``), the same for the same seed."""
    from erasure.testing import TINY_WORDS

    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < count:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3))))
        if word not in TINY_WORDS:
            words[word] = None
    return list(words)


def synthetic_request(concepts: int, erase_per: int, preserve_per: int, seed: int = 0) -> Any:
    """A request of ``concepts`` made-up concepts, each with its own erase and preserve prompts (templates)."""
    from erasure.concepts import Concept, EraseRequest

    words = synthetic_words(concepts * 2, seed)
    names, neighbours = words[:concepts], words[concepts:]
    return EraseRequest(
        tuple(
            Concept(
                name=name,
                kind="style",
                erase=tuple(t.format(name) for t in ERASE_TEMPLATES[:erase_per]),
                anchor="",
                preserve=tuple(t.format(other) for t in PRESERVE_TEMPLATES[:preserve_per]),
            )
            for name, other in zip(names, neighbours, strict=True)
        )
    )


def sd14_pipeline(words: list[str], seed: int = 0) -> Any:
    """SD 1.4's UNet and text encoder architectures with random weights, a small VAE, a generated tokenizer."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasure.testing import TINY_WORDS, sd_ddim_scheduler, tiny_tokenizer

    tokenizer = tiny_tokenizer((*TINY_WORDS, "artwork", *words))
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD14_UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD14_TEXT, **special, pad_token_id=tokenizer.pad_token_id))
        vae = AutoencoderKL(**SMALL_VAE)
    scheduler = sd_ddim_scheduler()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def _build(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(pipe, request, images)`` of a measurement spec."""
    import numpy as np

    from erasure.concepts import load_concepts

    kind = spec["pipeline"]
    req = spec["request"]
    if req["kind"] == "file":
        request = load_concepts(req["path"])
        words: list[str] = []
    else:
        request = synthetic_request(req["concepts"], req["erase_per"], req["preserve_per"], req.get("seed", 0))
        words = synthetic_words(req["concepts"] * 2, req.get("seed", 0))
    if kind == "sd14":
        pipe = sd14_pipeline(words)
    elif kind == "tiny":
        from erasure.testing import tiny_pipeline

        pipe = tiny_pipeline("sd1")
    else:
        from erasure.pipeline import load_pipeline

        pipe = load_pipeline(spec["path"])
        pipe.set_progress_bar_config(disable=True)
    images = None
    if spec.get("random_images"):
        size = spec.get("image_size") or 64
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(spec["random_images"])]
    return pipe, request, images


# --------------------------------------------------------------------------------------------------------------
# Measuring (inside a worker)
# --------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB; 0 where /proc is missing."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _module_bytes(module: Any) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class Recorder:
    """UNet forward hooks, a global optimizer-step hook and wrapped phase functions, recording times and counts."""

    #: (module, attribute, phase); phases marked setup hold forwards that are no iteration's.
    PHASES = (
        ("erasure.methods.base", "check_encodable", "check_encodable", False),
        ("erasure.methods.uce", "encode_prompts", "encode_prompts", False),
        ("erasure.methods.esd", "encode_prompts", "encode_prompts", False),
        ("erasure.methods.esd", "unconditional_conditioning", "encode_prompts", False),
        ("erasure.methods.esd", "partial_ddim", "partial_ddim", False),
        ("erasure.methods.forget_me_not", "encode_prompts", "encode_prompts", False),
        ("erasure.methods.forget_me_not", "generate", "generate_images", True),
        ("erasure.methods.forget_me_not", "images_to_latents", "vae_encode", False),
        ("erasure.methods.base", "fingerprint", "fingerprint", False),
    )

    def __init__(self, unet: Any) -> None:
        import importlib

        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        from erasure.methods import closed_form

        self._grad_enabled = torch.is_grad_enabled
        self.calls: list[dict[str, Any]] = []
        self.steps: list[float] = []
        self._forwards_at_last_step = -1
        self.phase_seconds: dict[str, float] = {}
        self._setup_depth = 0
        self._restore: list[tuple[Any, str, Any]] = []
        self._handles = [
            unet.register_forward_pre_hook(self._pre, with_kwargs=True),
            unet.register_forward_hook(self._post),
            register_optimizer_step_post_hook(self._step),
        ]
        for module_name, attribute, phase, setup in self.PHASES:
            self._wrap(importlib.import_module(module_name), attribute, phase, setup)
        self._wrap(closed_form.RidgeSolver, "__init__", "ridge_factor", False)
        self._wrap(closed_form.RidgeSolver, "solve", "ridge_solve", False)

    def _wrap(self, owner: Any, attribute: str, phase: str, setup: bool) -> None:
        original = getattr(owner, attribute)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._setup_depth += setup
            try:
                return original(*args, **kwargs)
            finally:
                self._setup_depth -= setup
                self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start

        setattr(owner, attribute, wrapped)
        self._restore.append((owner, attribute, original))

    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.calls.append(
            {
                "start": time.perf_counter(),
                "batch": int(sample.shape[0]),
                "grad": self._grad_enabled(),
                "setup": self._setup_depth > 0,
            }
        )

    def _post(self, module: Any, args: tuple, output: Any) -> None:
        self.calls[-1]["end"] = time.perf_counter()

    def _step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        # ESD steps one Adam per tensor inside the backward: steps with no UNet forward between them are one
        # iteration, which ends at the last of them
        if self.steps and self._forwards_at_last_step == len(self.calls):
            self.steps[-1] = time.perf_counter()
            return
        self.steps.append(time.perf_counter())
        self._forwards_at_last_step = len(self.calls)

    def remove(self) -> None:
        """Remove the hooks and unwrap the phase functions."""
        for handle in self._handles:
            handle.remove()
        for owner, attribute, original in reversed(self._restore):
            setattr(owner, attribute, original)

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        """Counts and timings; ``t0`` and ``t1`` bracket ``apply``."""
        calls = [c for c in self.calls if not c["setup"]]
        setup = [c for c in self.calls if c["setup"]]
        kinds: dict[str, list[float]] = {}
        for call in calls:
            kinds.setdefault(f"batch{call['batch']}_{'grad' if call['grad'] else 'nograd'}", []).append(
                call["end"] - call["start"]
            )
        result: dict[str, Any] = {
            "unet_forwards": len(calls),
            "unet_forward_samples": sum(c["batch"] for c in calls),
            "unet_forwards_with_grad": sum(c["grad"] for c in calls),
            "setup_unet_forwards": len(setup),
            "forward_seconds_median": {k: sorted(v)[len(v) // 2] for k, v in sorted(kinds.items())},
            "phase_seconds": dict(sorted(self.phase_seconds.items())),
            "iterations": len(self.steps),
        }
        if self.steps:
            per_iteration, seconds, nograd, previous = [], [], [], None
            for index, end in enumerate(self.steps):
                begin_limit = self.steps[index - 1] if index else t0
                inside = [c for c in calls if begin_limit <= c["start"] < end]
                per_iteration.append(len(inside))
                nograd.append(sum(c["end"] - c["start"] for c in inside if not c["grad"]))
                begin = previous if index else (inside[0]["start"] if inside else t0)
                seconds.append(end - begin)
                previous = end
            result["forwards_per_iteration"] = per_iteration
            result["iteration_seconds"] = seconds
            result["iteration_nograd_forward_seconds"] = nograd
            result["before_first_iteration_seconds"] = (next(iter(calls), {"start": t1})["start"]) - t0
            result["after_last_step_seconds"] = t1 - self.steps[-1]
        return result


@contextlib.contextmanager
def _profiled(enabled: bool, sink: dict[str, Any], top: int = 30) -> Iterator[None]:
    if not enabled:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
        sink["profile"] = text.getvalue()


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the pipeline of ``spec``, run the method once and measure it (see the module docstring)."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from erasure.methods import get_method

    runtime_rss = _status_kib("VmRSS") * 1024
    build_start = time.perf_counter()
    pipe, request, images = _build(spec)
    build_seconds = time.perf_counter() - build_start
    method = get_method(spec["method"], **spec.get("overrides", {}))
    weights = {name: _module_bytes(getattr(pipe, name)) for name in ("unet", "text_encoder", "vae")}
    selected = method.select_parameters(pipe)
    selected_bytes = sum(p.numel() * p.element_size() for p in selected.values())
    del selected
    recorder = Recorder(pipe.unet)
    rss_before = _status_kib("VmRSS") * 1024
    reset = _reset_peak_rss()
    result: dict[str, Any] = {"load_average_before": os.getloadavg()[0]}
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    with _profiled(spec.get("profile", False), result):
        edit = method.apply(pipe, request, images=images, progress=False)
    t1 = time.perf_counter()
    result["cpu_seconds"] = _cpu_seconds() - cpu0
    result["load_average_after"] = os.getloadavg()[0]
    recorder.remove()
    peak = _status_kib("VmHWM") * 1024 if reset else 0
    pipeline_bytes = sum(weights.values())
    result |= {
        "label": spec["label"],
        "pipeline": spec["pipeline"],
        "method": spec["method"],
        "method_config": method.config.to_dict(),
        "default_config": get_method(spec["method"]).config.to_dict(),
        "concepts": len(request.concepts),
        "erase_prompts": len(request.erase_prompts),
        "preserve_prompts": len(request.preserve_prompts),
        "torch_threads": torch.get_num_threads(),
        "build_seconds": build_seconds,
        "wall_seconds": t1 - t0,
        **recorder.summary(t0, t1),
        "weight_bytes": weights,
        "pipeline_weight_bytes": pipeline_bytes,
        "selected_parameter_bytes": selected_bytes,
        "edit_delta_bytes": sum(d.numel() * d.element_size() for d in edit.deltas.values()),
        "runtime_rss": runtime_rss,
        "rss_before_apply": rss_before,
        "peak_rss": peak,
        "peak_rss_over_weights": peak / pipeline_bytes if peak else None,
        "apply_extra_peak": peak - rss_before if peak else None,
        "process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "stats": {k: v for k, v in edit.config.get("stats", {}).items() if not isinstance(v, list)},
    }
    return result


# --------------------------------------------------------------------------------------------------------------
# Driving (in the parent)
# --------------------------------------------------------------------------------------------------------------


def _specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    base = {"threads": args.threads, "profile": args.profile}
    if args.tiny:
        tiny = {**base, "pipeline": "tiny"}
        one = {"kind": "synthetic", "concepts": 1, "erase_per": 2, "preserve_per": 1}
        specs.append({**tiny, "label": "tiny uce 3 concepts", "method": "uce", "request": one | {"concepts": 3}})
        esd = {"iterations": 2, "ddim_steps": 2, "resolution": 32, "preset": "paper"}  # a trajectory per iteration
        specs.append({**tiny, "label": "tiny esd-x", "method": "esd-x", "overrides": esd, "request": one})
        fmn = {"steps": 2, "resolution": 32}
        specs.append(
            {
                **tiny,
                "label": "tiny resteer",
                "method": "resteer",
                "overrides": fmn,
                "request": one,
                "random_images": 1,
                "image_size": 32,
            }
        )
        return specs
    if args.toy:
        toy = {**base, "pipeline": "toy", "path": str(args.toy)}
        request = {"kind": "file", "path": str(args.toy_concepts)}
        for name in args.methods:
            overrides: dict[str, Any] = {}
            if args.toy_iterations and name.startswith("esd"):
                overrides["iterations"] = args.toy_iterations
            specs.append({**toy, "label": f"toy {name}", "method": name, "overrides": overrides, "request": request})
    if args.sd14:
        sd = {**base, "pipeline": "sd14"}
        exact = {"expand": "off"}  # the synthetic request as stated: no templated phrasings added
        for count in args.uce_concepts:
            request = {"kind": "synthetic", "concepts": count, "erase_per": args.erase_per, "preserve_per": 0}
            request["preserve_per"] = args.preserve_per
            specs.append(
                {**sd, "label": f"sd14 uce {count} concepts", "method": "uce", "overrides": exact, "request": request}
            )
        for count in args.rece_concepts:
            request = {"kind": "synthetic", "concepts": count, "erase_per": args.erase_per}
            request["preserve_per"] = args.preserve_per
            specs.append(
                {
                    **sd,
                    "label": f"sd14 rece {count} concepts",
                    "method": "rece",
                    "overrides": exact,
                    "request": request,
                }
            )
        one = {"kind": "synthetic", "concepts": 1, "erase_per": 2, "preserve_per": 0}
        kept = {"kind": "synthetic", "concepts": 1, "erase_per": 2, "preserve_per": 5}
        size = {"resolution": args.sd14_resolution} if args.sd14_resolution else {}
        for count in args.mace_concepts:  # the closed-form stage alone: CFR over every concept's prompts
            request = {"kind": "synthetic", "concepts": count, "erase_per": args.erase_per, "preserve_per": 0}
            mace = exact | {"lora_steps": 0, "prior": "none"}
            specs.append({**sd, "label": f"sd14 mace cfr {count} concepts", "method": "mace", "overrides": mace,
                          "request": request})  # fmt: skip
        if args.mace_concepts:  # one concept through all three stages: the LoRA stage's cost per concept
            mace = exact | {
                "lora_steps": args.esd_iterations,
                "training_images": 1,
                "image_steps": 1,
                "prior": "none",
                **size,
            }
            specs.append({**sd, "label": "sd14 mace 1 concept", "method": "mace", "overrides": mace, "request": one})
        if args.sd14_ca:  # anchor images are setup; the figures that matter are per step
            ca = {"steps": args.esd_iterations, "anchor_images": 2, "image_steps": 1, **size}
            specs.append({**sd, "label": "sd14 ca", "method": "ca", "overrides": ca, "request": one})
        if args.sd14_advunlearn:  # one plain warm-up iteration, then attacked ones with their inner steps
            adv = {"iterations": args.esd_iterations, "warmup_iterations": 1, "attack_steps": args.attack_steps,
                   "ddim_steps": args.esd_ddim_steps, "trajectories": 1, **size}  # fmt: skip
            specs.append({**sd, "label": "sd14 advunlearn", "method": "advunlearn", "overrides": adv, "request": kept})
        for variant in args.sd14_esd:
            esd = {"iterations": args.esd_iterations, "ddim_steps": args.esd_ddim_steps, "preset": "paper"}
            if args.sd14_resolution:
                esd["resolution"] = args.sd14_resolution
            name, _, flag = variant.partition("+")
            if flag == "nogc":
                esd["gradient_checkpointing"] = False
            specs.append({**sd, "label": f"sd14 {variant}", "method": name, "overrides": esd, "request": one})
        if args.sd14_fmn:
            fmn = {"steps": args.esd_iterations}
            if args.sd14_resolution:
                fmn["resolution"] = args.sd14_resolution
            specs.append(
                {
                    **sd,
                    "label": "sd14 resteer",
                    "method": "resteer",
                    "overrides": fmn,
                    "request": one,
                    "random_images": 1,
                    "image_size": args.sd14_resolution or 512,
                }
            )
    if args.only:
        specs = [s for s in specs if any(word in s["label"] for word in args.only)]
    return specs


def _run_worker(spec: dict[str, Any], malloc_default: bool, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    if not malloc_default:
        env |= MALLOC_ENV
    env.setdefault("PYTHONPATH", str(REPO))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout)[-3000:]
        return {"label": spec["label"], "method": spec["method"], "error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def _mib(value: float | None) -> str:
    return "-" if not value else f"{value / MIB:,.0f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 10 else f"{value:,.1f}"


#: Tensors of the size of the trained selection that a method holds besides the weights: the base snapshot, plus
#: for ESD Adam's two moments (it borrows the snapshot for its frozen predictions and steps each tensor inside the
#: backward, so at most one tensor's gradient exists); for Forget-Me-Not gradients and AdamW's two moments.
COPIES = {"uce": 1, "esd": 3, "resteer": 4, "fmn": 4}


def _derived(result: dict[str, Any]) -> dict[str, Any]:
    """Steady per-iteration figures (iteration 2 on when there are several), estimates and memory shares."""
    derived: dict[str, Any] = {}
    per = result.get("forwards_per_iteration") or []
    seconds = result.get("iteration_seconds") or []
    nograd = result.get("iteration_nograd_forward_seconds") or []
    if per:
        first = 1 if len(per) > 1 else 0
        derived["forwards_per_iteration_mean"] = sum(per[first:]) / len(per[first:])
        derived["iteration_seconds_mean"] = sum(seconds[first:]) / len(seconds[first:])
        train = [s - n for s, n in zip(seconds[first:], nograd[first:], strict=True)]
        derived["iteration_train_seconds_mean"] = sum(train) / len(train)  # gradient forward, backward, step
    b2 = result.get("forward_seconds_median", {}).get("batch2_nograd")
    if result["method"].startswith("esd") and b2 and per:
        # default config: k ~ U{0..ddim_steps-1} guided DDIM steps + one frozen batch-2 forward + the training part
        default = result["default_config"]
        mean_k = (default["ddim_steps"] - 1) / 2
        derived["esd_default_forwards_per_iteration"] = mean_k + 2
        derived["esd_default_iteration_seconds_estimate"] = derived["iteration_train_seconds_mean"] + (mean_k + 1) * b2
        derived["esd_default_run_seconds_estimate"] = (
            default["iterations"] * derived["esd_default_iteration_seconds_estimate"]
        )
    copies = COPIES.get(result["method"].split("-")[0], 1)
    derived["held_copies_bytes_estimate"] = copies * result["selected_parameter_bytes"]
    if result.get("peak_rss"):
        model_peak = result["peak_rss"] - result["runtime_rss"]
        derived["model_peak_over_weights"] = model_peak / result["pipeline_weight_bytes"]
        derived["activations_and_other_bytes"] = result["apply_extra_peak"] - derived["held_copies_bytes_estimate"]
    return derived


def _table(results: list[dict[str, Any]]) -> str:
    header = (
        "label",
        "wall s",
        "cpu s",
        "load",
        "iter s",
        "fwd/iter",
        "fwd",
        "setup fwd",
        "peak RSS MiB",
        "runtime MiB",
        "weights MiB",
        "peak/weights",
        "(peak-runtime)/weights",
        "apply extra MiB",
    )
    rows = [header]
    for r in results:
        if "error" in r:
            rows.append((r["label"], "ERROR", *[""] * (len(header) - 2)))
            continue
        d = r.get("derived", {})
        ratio, model_ratio = r.get("peak_rss_over_weights"), d.get("model_peak_over_weights")
        load = max(r["load_average_before"], r["load_average_after"])
        rows.append(
            (
                r["label"],
                _seconds(r["wall_seconds"]),
                _seconds(r["cpu_seconds"]),
                f"{load:.1f}",
                _seconds(d.get("iteration_seconds_mean")),
                f"{d['forwards_per_iteration_mean']:.3g}" if "forwards_per_iteration_mean" in d else "-",
                str(r["unet_forwards"]),
                str(r["setup_unet_forwards"]),
                _mib(r["peak_rss"]),
                _mib(r["runtime_rss"]),
                _mib(r["pipeline_weight_bytes"]),
                f"{ratio:.2f}" if ratio else "-",
                f"{model_ratio:.2f}" if model_ratio else "-",
                _mib(r["apply_extra_peak"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _notes(results: list[dict[str, Any]]) -> list[str]:
    notes = []
    for r in results:
        if "error" in r:
            notes.append(f"{r['label']}: {r['error'].strip().splitlines()[-1] if r['error'].strip() else 'failed'}")
            continue
        d = r.get("derived", {})
        phases = ", ".join(f"{k} {v:.3g}s" for k, v in r["phase_seconds"].items())
        forwards = ", ".join(f"{k} {v:.3g}s" for k, v in r["forward_seconds_median"].items())
        line = f"{r['label']}: build {r['build_seconds']:.1f}s; phases: {phases or '-'}"
        if forwards:
            line += f"; median forward: {forwards}"
        if "iteration_train_seconds_mean" in d:
            line += f"; per iteration: {d['iteration_train_seconds_mean']:.3g}s outside no-grad forwards"
        if "esd_default_iteration_seconds_estimate" in d:
            default = r["default_config"]
            line += (
                f"; default config ({default['ddim_steps']} DDIM steps): "
                f"{d['esd_default_forwards_per_iteration']:.1f} forwards and "
                f"{d['esd_default_iteration_seconds_estimate']:.3g}s per iteration expected, "
                f"{default['iterations']} iterations ~ {d['esd_default_run_seconds_estimate'] / 3600:.2f} h"
            )
        weights = r["weight_bytes"]
        line += (
            f"; weights unet {_mib(weights['unet'])} + text {_mib(weights['text_encoder'])} + vae "
            f"{_mib(weights['vae'])} MiB; selected {_mib(r['selected_parameter_bytes'])} MiB"
        )
        if "activations_and_other_bytes" in d:
            line += (
                f"; apply extra = held copies ~{_mib(d['held_copies_bytes_estimate'])} MiB + activations/other "
                f"~{_mib(d['activations_and_other_bytes'])} MiB"
            )
        notes.append(line)
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", type=Path, default=DEFAULT_TOY, help="toy-world pipeline folder")
    parser.add_argument("--no-toy", dest="toy", action="store_const", const=None, help="skip the toy-world runs")
    parser.add_argument("--toy-concepts", type=Path, default=DEFAULT_TOY_CONCEPTS, help="toy-world concept file")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(TOY_METHODS), help="toy methods")
    parser.add_argument(
        "--toy-iterations", type=int, default=None, help="cap ESD iterations on the toy world (default: full)"
    )
    parser.add_argument("--sd14", action=argparse.BooleanOptionalAction, default=True, help="SD 1.4-size runs")
    parser.add_argument("--uce-concepts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 100])
    parser.add_argument("--rece-concepts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 100])
    parser.add_argument("--mace-concepts", type=lambda s: [int(x) for x in s.split(",") if x], default=[10, 100])
    parser.add_argument("--sd14-ca", action=argparse.BooleanOptionalAction, default=True, help="SD 1.4 CA run")
    parser.add_argument(
        "--sd14-advunlearn", action=argparse.BooleanOptionalAction, default=True, help="SD 1.4 AdvUnlearn run"
    )
    parser.add_argument("--attack-steps", type=int, default=2, help="SD 1.4 AdvUnlearn inner steps per iteration")
    parser.add_argument("--erase-per", type=int, default=2, help="UCE erase prompts per synthetic concept")
    parser.add_argument("--preserve-per", type=int, default=2, help="UCE preserve prompts per synthetic concept")
    parser.add_argument(
        "--sd14-esd",
        type=lambda s: [x for x in s.split(",") if x],
        default=["esd-x", "esd-x+nogc"],
        help="SD 1.4 ESD variants; '+nogc' turns ESD's gradient checkpointing off",
    )
    parser.add_argument("--esd-iterations", type=int, default=2, help="SD 1.4 ESD iterations / FMN steps")
    parser.add_argument("--esd-ddim-steps", type=int, default=1, help="SD 1.4 ESD ddim_steps (1: k = 0)")
    parser.add_argument("--sd14-resolution", type=int, default=None, help="SD 1.4 image side (default 512)")
    parser.add_argument("--sd14-fmn", action=argparse.BooleanOptionalAction, default=True, help="SD 1.4 FMN run")
    parser.add_argument("--only", type=lambda s: s.split(","), default=None, help="run labels containing these")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers")
    parser.add_argument("--profile", action="store_true", help="cProfile apply() and print the top functions")
    parser.add_argument("--tiny", action="store_true", help="tiny test pipelines only (smoke test)")
    parser.add_argument("--in-process", action="store_true", help="measure in this process (no isolation)")
    parser.add_argument("--malloc-default", action="store_true", help="keep glibc's default malloc thresholds")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    if args.toy is not None and not (args.toy / "model_index.json").is_file():
        if not args.tiny:
            print(f"note: no toy-world pipeline at {args.toy}; skipping it (pass --toy PATH)", file=sys.stderr)
        args.toy = None
    specs = _specs(args)
    results = []
    for spec in specs:
        print(f"... {spec['label']}", file=sys.stderr, flush=True)
        if args.in_process or args.tiny:
            result = measure(spec)
        else:
            result = _run_worker(spec, args.malloc_default, args.timeout)
        if "error" not in result:
            result["derived"] = _derived(result)
        results.append(result)
        if result.get("profile"):
            print(f"--- profile of {spec['label']}\n{result['profile']}", file=sys.stderr)
        if args.json:  # after every measurement, atomically: an interrupted run keeps what it measured
            from erasure.files import atomic_write_text

            args.json.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.json, json.dumps({"results": results, "argv": sys.argv[1:]}, indent=2))
        print(f"    {spec['label']}: {_seconds(result.get('wall_seconds'))}", file=sys.stderr, flush=True)
    print(_table(results))
    print()
    for note in _notes(results):
        print(f"* {note}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
