"""Fine-tune the toy CLIP on renders under generator-like corruptions, so that it judges generated images robustly.

Starts from a shipped toy CLIP (``checkpoints/toyworld-clip``) and continues its contrastive training
(``toyworld_train.train.train_clip``) on freshly rendered images (a seed of their own) with their captions. By
default only the image tower trains: the text tower and the logit scale stay frozen, so the zero-shot class
embeddings the judge uses do not move (``--train-text`` trains everything). Two kinds of corruption, neither of which
changes what an image shows:

* ``--augment strong``: a share (``--strong-fraction``) of every batch gets ``train.degrade_strong`` (similarity
  warps up to ``--max-scale``, colour mixing, low-frequency blotches inside the figure, background tint, stronger
  blur and noise), the rest the original mild ``train.degrade``; ``--augment mild`` is ``degrade`` alone.
* ``--vae-images N``: N of the renders are replaced by their round trip through the generator's own VAE
  (``checkpoints/toyworld-sd/vae``) with noise on the latents (``train.vae_roundtrip``), so that the model sees
  exactly the decoder's artefacts.

Only renders and their captions are used: no generated image and no oracle verdict enters training. The script
prints (and writes to ``OUT/finetune_report.json``) the zero-shot accuracy on 2,000 fresh renders of the held-out seed.

Example (about 11 minutes on one CPU thread):
    OMP_NUM_THREADS=1 python scripts/finetune_toyworld_clip.py --out /tmp/clip-ft --steps 300 --batch-size 256 \
        --lr 1e-4 --strong-fraction 0.5 --vae-images 1500 --vae-cache /tmp/vae1500.npz
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch


def vae_images(renders: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """The VAE round trips of ``renders`` (cached in ``args.vae_cache`` when given).

    Args:
        renders: uint8 renders to send through the VAE.
        args: Parsed arguments (``vae``, ``latent_noise``, ``seed``, ``vae_cache``).

    Returns:
        uint8 decodes of the same shape.
    """
    from diffusers import AutoencoderKL

    from toyworld_train.train import vae_roundtrip

    key = f"{args.vae}|{args.data_seed}|{len(renders)}|{args.latent_noise}|{args.seed}"
    if args.vae_cache and args.vae_cache.exists():
        cached = np.load(args.vae_cache)
        if str(cached["key"]) == key:
            return cached["images"]
    vae = AutoencoderKL.from_pretrained(args.vae).to(args.device).eval()
    generator = torch.Generator(args.device).manual_seed(args.seed)
    decoded = vae_roundtrip(renders, vae, generator, latent_noise=args.latent_noise)
    if args.vae_cache:  # written beside the cache and renamed: an interrupted run leaves no truncated cache
        partial = args.vae_cache.with_name(args.vae_cache.name + ".partial")
        with open(partial, "wb") as handle:
            np.savez(handle, images=decoded, key=np.array(key))
        os.replace(partial, args.vae_cache)
    return decoded


def mixed_augment(strong_fraction: float, max_scale: float = 1.45):
    """A batch corruption mixing ``train.degrade_strong`` (a random share of the images) and ``train.degrade``.

    The mildly corrupted rest keeps clean renders in the training distribution, so zero-shot accuracy on them is kept.

    Args:
        strong_fraction: Probability that an image gets the strong corruption.
        max_scale: Largest figure scale of the strong corruption's warp.

    Returns:
        ``augment(images, generator)`` for ``train.train_clip``.
    """
    from toyworld_train import train

    def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        strong = train.degrade_strong(images, generator, max_scale)
        mild = train.degrade(images, generator)
        pick = torch.rand(len(images), 1, 1, 1, generator=generator, device=images.device) < strong_fraction
        return torch.where(pick, strong, mild)

    return augment


def main() -> None:
    """Parse arguments, fine-tune, save the model and print its zero-shot accuracy on fresh renders."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="checkpoints/toyworld-clip", help="toy CLIP folder to start from")
    parser.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned model")
    parser.add_argument("--vae", default="checkpoints/toyworld-sd/vae", help="VAE folder for the round trips")
    parser.add_argument("--renders", type=int, default=20_000, help="rendered training images")
    parser.add_argument("--data-seed", type=int, default=7, help="seed of the renders (the shipped CLIP used 0)")
    parser.add_argument("--vae-images", type=int, default=0, help="renders replaced by their VAE round trip")
    parser.add_argument("--latent-noise", type=float, default=1.0, help="largest latent noise of a round trip")
    parser.add_argument("--vae-cache", type=Path, default=None, help="npz file caching the VAE round trips")
    parser.add_argument("--augment", choices=("mild", "strong"), default="strong", help="per-batch corruption")
    parser.add_argument(
        "--strong-fraction",
        type=float,
        default=0.5,
        help="with --augment strong: share of each batch given degrade_strong (the rest: degrade)",
    )
    parser.add_argument("--max-scale", type=float, default=1.45, help="largest figure scale of degrade_strong")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warm-up, then cosine to 0)")
    parser.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    parser.add_argument("--train-text", action="store_true", help="also train the text tower and logit scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of batches, augmentation and latent noise")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    import open_clip

    from erasure.toyworld import models, quality
    from toyworld_train import train

    started = time.monotonic()
    images, captions, scenes = train.render_dataset(args.renders, args.data_seed, workers=1)
    if args.vae_images:
        images = images.copy()
        images[: args.vae_images] = vae_images(images[: args.vae_images], args)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.init}")
    augment = mixed_augment(args.strong_fraction, args.max_scale) if args.augment == "strong" else train.degrade
    model = train.train_clip(images, scenes, captions, train.StageBudget(args.steps), args.device, seed=args.seed,
                             batch_size=args.batch_size, lr=args.lr, init=model, augment=augment,
                             warmup_steps=args.warmup, train_text=args.train_text)  # fmt: skip
    models.save_clip(model, args.out)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{args.out}")
    judge = quality.ToyClipJudge(model, preprocess, tokenizer, args.device)
    renders, labels = quality.fresh_renders(2000)
    report = {"args": {k: str(v) for k, v in vars(args).items()},
              "zero_shot_accuracy_on_renders": quality.accuracy(judge.predict(renders), labels),
              "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    (args.out / "finetune_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
