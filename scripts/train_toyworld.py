"""Train the toy world's checkpoints from scratch: oracle, VAE, UNet + text encoder, CLIP.

Writes ``checkpoints/toyworld-sd`` (a diffusers StableDiffusionPipeline folder), ``checkpoints/toyworld-clip`` (an
open_clip model) and ``checkpoints/toyworld-oracle`` (the attribute classifier that judges generated images).
Each stage is seeded, bounded by steps and minutes, resumable from ``--work-dir``, and logs its loss curve.

Examples:
    python scripts/train_toyworld.py --out checkpoints                       # the shipped recipe
    python scripts/train_toyworld.py --out /tmp/ck --scale 0.01 --images 4000   # a smoke run in a minute
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from erasure.toyworld import models, train
from erasure.toyworld.tokenizer import write_tokenizer_files

STAGES = ("oracle", "vae", "denoiser", "clip")
# The shipped recipe: optimizer steps per stage (each stage also stops at its share of --minutes).
RECIPE_STEPS = {"oracle": 2000, "vae": 4000, "denoiser": 4000, "clip": 3000}
RECIPE_SHARE = {"oracle": 0.06, "vae": 0.2, "denoiser": 0.6, "clip": 0.14}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("checkpoints"), help="where the three folders go")
    parser.add_argument("--work-dir", type=Path, default=Path("work-train"), help="resumable stage states")
    parser.add_argument("--images", type=int, default=200_000, help="training images rendered (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=float("inf"), help="wall-clock budget for all stages")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue from a pipeline folder: its VAE is kept, its UNet and text encoder train on",
    )
    parser.add_argument(
        "--fresh-denoiser",
        action="store_true",
        help="with --init-from: keep only its VAE and tokenizer; train a new UNet and text encoder from scratch",
    )
    parser.add_argument("--use-ema", choices=["yes", "no"], default="yes", help="ship EMA or raw UNet weights")
    return parser.parse_args()


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


def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer, scaling_factor: float) -> None:
    """Assemble and save a stock diffusers StableDiffusionPipeline folder atomically."""
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionPipeline(
        vae=vae.to("cpu", torch.float32),
        text_encoder=text_encoder.to("cpu", torch.float32),
        tokenizer=tokenizer,
        unet=unet.to("cpu", torch.float32),
        scheduler=models.build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_slow_tokenizer_files(tmp / "tokenizer")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def save_oracle(out: Path, oracle) -> None:
    """Save the oracle's weights (safetensors) and label spaces."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in oracle.state_dict().items()}
    save_file(state, out / "oracle.safetensors")
    (out / "oracle_config.json").write_text(json.dumps({"heads": models.ORACLE_HEADS, "width": 32}, indent=2))


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    report: dict = {"device": str(device), "host": platform.node(), "images": args.images, "seed": args.seed}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)

    def budget(stage: str) -> train.StageBudget:
        return train.StageBudget(
            max(1, int(RECIPE_STEPS[stage] * args.scale)), args.minutes * 60 * RECIPE_SHARE[stage]
        )

    started = time.monotonic()
    images, captions, scenes = train.render_dataset(args.images, args.seed)
    report["render_seconds"] = round(time.monotonic() - started, 1)
    logging.info("rendered %d images in %.0f s", len(images), report["render_seconds"])

    if "oracle" in args.stages:
        t0 = time.monotonic()
        oracle = train.train_oracle(images, scenes, budget("oracle"), device, seed=args.seed, work_dir=args.work_dir)
        save_oracle(args.out / "toyworld-oracle", oracle)
        report["oracle_seconds"] = round(time.monotonic() - t0, 1)

    tokenizer_dir = write_tokenizer_files(args.work_dir / "tokenizer")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if "vae" in args.stages or "denoiser" in args.stages:
        t0 = time.monotonic()
        init = None
        if args.init_from is not None:
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextModel

            vae = AutoencoderKL.from_pretrained(args.init_from / "vae").to(device).eval()
            tokenizer = CLIPTokenizer.from_pretrained(args.init_from / "tokenizer")
            if not args.fresh_denoiser:
                init = (UNet2DConditionModel.from_pretrained(args.init_from / "unet"),
                        CLIPTextModel.from_pretrained(args.init_from / "text_encoder"))  # fmt: skip
            report["init_from"] = str(args.init_from)
        else:
            vae = train.train_vae(images, budget("vae"), device, seed=args.seed, work_dir=args.work_dir)
        report["vae_seconds"] = round(time.monotonic() - t0, 1)
        latent_mean, latent_std = train.encode_latents(vae, images, device)
        scaling_factor = float(vae.config.scaling_factor if args.init_from else 1.0 / latent_mean.std())
        report["scaling_factor"] = scaling_factor
        if "denoiser" in args.stages:
            t0 = time.monotonic()
            token_ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids  # fmt: skip
            unet, text_encoder, ema = train.train_denoiser(
                latent_mean, latent_std, token_ids, tokenizer, scaling_factor, budget("denoiser"), device,
                seed=args.seed, work_dir=args.work_dir, init=init, text_targets=caption_targets(captions, scenes),
            )  # fmt: skip
            report["denoiser_seconds"] = round(time.monotonic() - t0, 1)
            if args.use_ema == "yes":
                unet, text_encoder = ema.shadow["unet"], ema.shadow["text_encoder"]
            save_pipeline(args.out / "toyworld-sd", vae, unet, text_encoder, tokenizer, scaling_factor)
            if args.use_ema == "yes":  # keep the raw weights beside, for the EMA-vs-raw comparison
                raw_unet, raw_text = ema.modules["unet"], ema.modules["text_encoder"]
                save_pipeline(args.work_dir / "toyworld-sd-raw", vae, raw_unet, raw_text, tokenizer, scaling_factor)

    if "clip" in args.stages:
        t0 = time.monotonic()
        clip = train.train_clip(images, scenes, captions, budget("clip"), device, seed=args.seed,
                                work_dir=args.work_dir)  # fmt: skip
        models.save_clip(clip, args.out / "toyworld-clip")
        report["clip_seconds"] = round(time.monotonic() - t0, 1)

    report["total_seconds"] = round(time.monotonic() - started, 1)
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2))
    logging.info("done: %s", json.dumps(report))


if __name__ == "__main__":
    main()
