"""Train the toy world's generator (UNet + text encoder) on the 2-core CPU, and optionally its other models.

The default run reproduces the shipped ``checkpoints/toyworld-sd`` from scratch in about an hour on 2 CPU cores:

1. render ``--images`` training examples (seeded; ``--exclude-concept`` drops every image and caption of a concept);
2. encode them with the VAE of ``--vae-from`` (cached in ``--work-dir``), centre its latents per channel, folded
   exactly into the VAE's biases (``erasure.toyworld.models.center_vae_latents``), and set ``scaling_factor`` to
   1 / std of the centred latents (``--keep-vae`` skips this and keeps the VAE bit for bit, so the new generator
   shares ``--vae-from``'s latent space, as the exact-unlearning reference must);
3. train a fresh UNet and text encoder on the v-prediction loss under the zero-terminal-SNR schedule
   (``erasure.toyworld.models.SCHEDULER_CONFIG``), logging the oracle's verdicts on a 72-prompt check set every
   ``--check-every`` steps;
4. save a stock diffusers ``StableDiffusionPipeline`` folder with ``training_log.json`` (recipe, loss curve, checks).

Reused by default, retrained only when named in ``--stages``: the VAE (its reconstructions are exact for the
oracle; retraining it is a GPU-sized job), the oracle and the toy CLIP (``--stages oracle vae clip``, hours on a
CPU). Every stage is seeded and resumable: rerun the same command after an interruption and it continues from the
last saved state in ``--work-dir``.

Examples:
    python scripts/train_toyworld.py                                   # checkpoints/toyworld-sd
    python scripts/train_toyworld.py --exclude-concept Pip             # checkpoints/toyworld-sd-without-pip
    python scripts/train_toyworld.py --exclude-concept Pip --keep-vae --out runs/ref   # the same, in the base's
                                                                       # latent space (a --model2 for probes)
    python scripts/train_toyworld.py --out /tmp/ck --images 400 --steps 20 --check-every 10   # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from erasure.toyworld import models, quality
from erasure.toyworld.tokenizer import write_tokenizer_files
from toyworld_train import train

STAGES = ("oracle", "vae", "denoiser", "clip")
# Optimizer steps of the stages that are reused by default (GPU-sized recipes of the first toy world).
OTHER_STEPS = {"oracle": 2000, "vae": 4000, "clip": 3000}
CHECK_GUIDANCE = 7.5  # what a user's plain pipe(prompt) gets
CHECK_STEPS = 25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--out", type=Path, default=Path("checkpoints"), help="folder the model folders go in")
    parser.add_argument("--name", default=None,
                        help="generator folder (default toyworld-sd, or toyworld-sd-without-<concept>)")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="resumable stage states and the latent cache (default work-train/<name>)")  # fmt: skip
    parser.add_argument("--images", type=int, default=12_000, help="training examples rendered (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights, batches and noise")
    parser.add_argument("--steps", type=int, default=2400, help="denoiser optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="denoiser images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="denoiser peak learning rate")
    parser.add_argument("--minutes", type=float, default=math.inf, help="wall-clock budget of the denoiser stage")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=["denoiser"],
                        help="stages to train; the others are reused from --vae-from / --oracle / --clip")  # fmt: skip
    parser.add_argument("--exclude-concept", action="append", default=[], metavar="NAME",
                        help="leave out every image and caption of this concept (Pip, red, striped, ...); "
                             "repeatable. The exact-unlearning reference for probes")  # fmt: skip
    parser.add_argument("--vae-from", type=Path, default=Path("checkpoints/toyworld-sd"),
                        help="pipeline folder whose VAE and tokenizer are reused")  # fmt: skip
    parser.add_argument("--keep-vae", action="store_true",
                        help="use --vae-from's VAE exactly as it is (no re-centring, its own scaling_factor), so "
                             "the new generator shares its latent space bit for bit: what a reference model "
                             "needs to be compared step by step (--model2, trajectory completion)")  # fmt: skip
    parser.add_argument("--oracle", type=Path, default=Path("checkpoints/toyworld-oracle"),
                        help="oracle for the quality checks (written here when 'oracle' is a stage)")  # fmt: skip
    parser.add_argument("--check-every", type=int, default=800, help="denoiser steps between quality checks")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from this pipeline's UNet and text encoder instead of fresh ones")  # fmt: skip
    parser.add_argument("--use-ema", choices=["yes", "no"], default="yes",
                        help="ship the EMA or the raw weights (the other copy goes to the work dir)")  # fmt: skip
    parser.add_argument("--schedule", choices=["ztsnr-v", "sd-epsilon"], default="ztsnr-v",
                        help="ztsnr-v: zero terminal SNR, v-prediction, trailing steps (the shipped recipe); "
                             "sd-epsilon: SD 1.x's schedule with offset noise 0.1 and half of t in [600, 1000) "
                             "(the comparison)")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.keep_vae and "vae" in args.stages:
        parser.error("--keep-vae keeps --vae-from's VAE; it cannot be combined with --stages vae")
    if args.images < 1 or args.steps < 1 or args.batch_size < 1 or args.check_every < 1:
        parser.error("--images, --steps, --batch-size and --check-every must be positive")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.name is None:
        suffix = "".join(f"-without-{name.lower()}" for name in args.exclude_concept)
        args.name = f"toyworld-sd{suffix}"
    args.work_dir = args.work_dir or Path("work-train") / args.name
    return args


def caption_targets(captions: list[str], scenes: list) -> dict[str, torch.Tensor]:
    """Attribute class indices of each caption (``-1`` where the caption is empty), for the text auxiliary loss."""
    targets = train.scene_targets(scenes)
    empty = torch.tensor([not caption for caption in captions])
    return {name: values.masked_fill(empty, -1) for name, values in targets.items()}


def write_slow_tokenizer_files(folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` from ``tokenizer.json`` where they are missing.

    transformers 5 saves a CLIP tokenizer as ``tokenizer.json`` only; SD 1.x folders (and transformers 4's slow
    ``CLIPTokenizer``, and conversion scripts) expect the two classic files as well.
    """
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


SCHEDULES = {
    "ztsnr-v": (models.SCHEDULER_CONFIG, {}),
    "sd-epsilon": (models.SD_EPSILON_SCHEDULER_CONFIG, {"offset_noise": 0.1, "high_noise_fraction": 0.5}),
}


def build_pipeline(vae, unet, text_encoder, tokenizer, schedule: str = "ztsnr-v"):
    """A stock diffusers StableDiffusionPipeline of the toy world (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    scheduler = models.build_scheduler(SCHEDULES[schedule][0])
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer, extra_files: dict[str, str] | None = None,
                  schedule: str = "ztsnr-v") -> None:  # fmt: skip
    """Save a stock diffusers StableDiffusionPipeline folder atomically (an existing one is replaced)."""
    vae = vae.to("cpu", torch.float32)
    pipe = build_pipeline(vae, copy_module(unet), copy_module(text_encoder), tokenizer, schedule)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_slow_tokenizer_files(tmp / "tokenizer")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o755)
        old = out.with_name(f".{out.name}-old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_module(module: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU copy (saving must not move the live training modules)."""
    import copy

    return copy.deepcopy(module).to("cpu", torch.float32).eval()


def save_oracle(out: Path, oracle) -> None:
    """Save the oracle's weights (safetensors) and label spaces."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in oracle.state_dict().items()}
    save_file(state, out / "oracle.safetensors")
    (out / "oracle_config.json").write_text(json.dumps({"heads": models.ORACLE_HEADS, "width": 32}, indent=2))


def file_digest(path: Path) -> str:
    """sha256 of a file (keys the latent cache to the exact VAE weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_latents(vae, images, device, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (means, stds) of ``images``, from ``cache`` when it exists (written atomically)."""
    if cache.exists():
        state = torch.load(cache, map_location="cpu", weights_only=True)
        logging.info("latents from %s", cache)
        return state["mean"], state["std"]
    mean, std = train.encode_latents(vae, images, device)
    mean, std = mean.cpu(), std.cpu()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"mean": mean, "std": std}, tmp)
    os.replace(tmp, cache)
    return mean, std


def check_prompts() -> tuple[list[str], list[dict[str, str]], list[int]]:
    """The 72-prompt check set: every colour x shape x style once and each character four times; seeds 1234+i."""
    prompts = quality.quality_prompts(per_object=1, characters=12)
    return [p for p, _ in prompts], [e for _, e in prompts], [1234 + i for i in range(len(prompts))]


def make_quality_check(vae, tokenizer, oracle, log: list[dict], device, schedule: str = "ztsnr-v"):
    """A ``quality_check(step, unet, text_encoder, ema)`` that judges raw and EMA weights on the check set."""
    from erasure.generate import generate

    texts, expected, seeds = check_prompts()

    def check(step: int, unet, text_encoder, ema) -> None:
        entry: dict = {"step": step}
        for label, (u, te) in {"raw": (unet, text_encoder),
                               "ema": (ema.shadow["unet"], ema.shadow["text_encoder"])}.items():  # fmt: skip
            pipe = build_pipeline(vae, u, te, tokenizer, schedule).to(device)
            pipe.set_progress_bar_config(disable=True)
            with torch.no_grad():
                images = generate(pipe, texts, seeds, CHECK_STEPS, CHECK_GUIDANCE, batch_size=72, progress=False)
            entry[label] = {k: round(100 * v, 1) for k, v in
                            quality.accuracy(quality.oracle_predict(oracle, images), expected).items()}  # fmt: skip
        log.append(entry)
        logging.info("quality check at step %d: %s", step, json.dumps(entry))

    return check


def _json_value(value):
    """A recipe value as strict JSON holds it: paths as text, an unlimited budget (inf) as null."""
    return str(value) if isinstance(value, Path) else None if value == math.inf else value


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "recipe": {k: _json_value(v) for k, v in vars(args).items()},
        "device": str(device), "host": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }  # fmt: skip
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    started = time.monotonic()

    images, captions, scenes = train.render_dataset(args.images, args.seed)
    if args.exclude_concept:
        images, captions, scenes = train.exclude_concept(images, captions, scenes, args.exclude_concept)
        logging.info("left out %s: %d of %d examples remain", args.exclude_concept, len(images), args.images)
    report["examples"] = len(images)
    report["render_seconds"] = round(time.monotonic() - started, 1)

    if "oracle" in args.stages:
        oracle = train.train_oracle(images, scenes, train.StageBudget(OTHER_STEPS["oracle"]), device,
                                    seed=args.seed, work_dir=args.work_dir)  # fmt: skip
        save_oracle(args.oracle, oracle)
    if "denoiser" in args.stages or "vae" in args.stages:
        from diffusers import AutoencoderKL
        from transformers import CLIPTokenizer

        if "vae" in args.stages:
            vae = train.train_vae(images, train.StageBudget(OTHER_STEPS["vae"]), device, seed=args.seed,
                                  work_dir=args.work_dir)  # fmt: skip
            tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(args.work_dir / "tokenizer"))
            vae_key = "trained-" + str(args.seed)
        else:
            vae = AutoencoderKL.from_pretrained(args.vae_from / "vae").to(device).eval()
            tokenizer = CLIPTokenizer.from_pretrained(args.vae_from / "tokenizer")
            vae_key = file_digest(args.vae_from / "vae" / "diffusion_pytorch_model.safetensors")[:16]
        exclude = "-".join(sorted(name.lower() for name in args.exclude_concept)) or "all"
        cache = args.work_dir / f"latents-{vae_key}-{args.images}-{args.seed}-{exclude}.pt"
        latent_mean, latent_std = cached_latents(vae, images, device, cache)
        if args.keep_vae:
            # the VAE stays bit-identical to --vae-from's; the small remaining mean of this data stays in the latents
            scaling_factor = float(vae.config.scaling_factor)
            report["latent_channel_mean_kept"] = [round(float(v), 5) for v in latent_mean.mean(dim=(0, 2, 3))]
            logging.info("VAE of %s kept as it is: latent channel means %s, scaling factor %.4f", args.vae_from,
                         report["latent_channel_mean_kept"], scaling_factor)  # fmt: skip
        else:
            # centre: the per-channel mean of the posterior means goes into the VAE's biases and out of the latents
            channel_mean = latent_mean.mean(dim=(0, 2, 3))
            models.center_vae_latents(vae, channel_mean)
            latent_mean = latent_mean - channel_mean.view(1, -1, 1, 1)
            scaling_factor = float(1.0 / latent_mean.std())
            vae.register_to_config(scaling_factor=scaling_factor)
            report["latent_channel_mean_removed"] = [round(float(v), 5) for v in channel_mean]
            logging.info("latent channel means %s folded into the VAE; scaling factor %.4f",
                         report["latent_channel_mean_removed"], scaling_factor)  # fmt: skip
        report["scaling_factor"] = scaling_factor

    if "denoiser" in args.stages:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        oracle = quality.load_oracle(args.oracle, device)
        checks: list[dict] = []
        log_path = args.work_dir / "quality_checks.json"
        if log_path.exists():  # a resumed run keeps the checks made before the interruption
            checks.extend(json.loads(log_path.read_text()))
        quality_check = make_quality_check(vae, tokenizer, oracle, checks, device, args.schedule)

        def check_and_save(step, unet, text_encoder, ema) -> None:
            quality_check(step, unet, text_encoder, ema)
            log_path.write_text(json.dumps(checks, indent=1))

        init = None
        if args.init_from is not None:
            init = (UNet2DConditionModel.from_pretrained(args.init_from / "unet"),
                    CLIPTextModel.from_pretrained(args.init_from / "text_encoder"))  # fmt: skip
        token_ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids  # fmt: skip
        t0 = time.monotonic()
        unet, text_encoder, ema = train.train_denoiser(
            latent_mean, latent_std, token_ids, tokenizer, scaling_factor,
            train.StageBudget(args.steps, args.minutes * 60), device, seed=args.seed, batch_size=args.batch_size,
            lr=args.lr, work_dir=args.work_dir, init=init, text_targets=caption_targets(captions, scenes),
            quality_check=check_and_save, check_every=args.check_every, scheduler_config=SCHEDULES[args.schedule][0],
            **SCHEDULES[args.schedule][1],
        )  # fmt: skip
        report["denoiser_seconds"] = round(time.monotonic() - t0, 1)
        if not checks or checks[-1]["step"] != args.steps:
            check_and_save(args.steps, unet, text_encoder, ema)
        report["quality_checks"] = checks
        report["total_seconds"] = round(time.monotonic() - started, 1)
        state = torch.load(args.work_dir / "denoiser.pt", map_location="cpu", weights_only=False)
        report["steps_done"] = state["step"]
        shipped, other = ("ema", "raw") if args.use_ema == "yes" else ("raw", "ema")
        weights = {"raw": (unet, text_encoder), "ema": (ema.shadow["unet"], ema.shadow["text_encoder"])}
        report["shipped_weights"] = shipped
        log = {"training_log.json": json.dumps(report, indent=2)}
        save_pipeline(args.out / args.name, vae, *weights[shipped], tokenizer, log, args.schedule)
        save_pipeline(args.work_dir / f"{args.name}-{other}", vae, *weights[other], tokenizer, log, args.schedule)
        logging.info("saved %s (%s weights); the %s copy is in %s", args.out / args.name, shipped, other,
                     args.work_dir)  # fmt: skip

    if "clip" in args.stages:
        clip = train.train_clip(images, scenes, captions, train.StageBudget(OTHER_STEPS["clip"]), device,
                                seed=args.seed, work_dir=args.work_dir)  # fmt: skip
        models.save_clip(clip, args.out / "toyworld-clip")
    logging.info("done in %.0f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
