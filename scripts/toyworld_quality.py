"""Measure the toy world's checkpoints: generator accuracy, oracle accuracy, CLIP accuracy and agreement.

Generator attribute accuracy (judged by the oracle), oracle held-out accuracy,
toy-CLIP zero-shot accuracy and CLIP-oracle agreement, and the time to generate 16 images.

Examples:
    python scripts/toyworld_quality.py --model checkpoints/toyworld-sd --out quality.json   # guidance 7.5
    python scripts/toyworld_quality.py --model OLD NEW --timing-only        # speed ratio, best of three runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from erasure.generate import generate
from erasure.toyworld import quality


def character_breakdown(verdicts: list[dict], expected: list[dict]) -> dict[str, float]:
    """Per named character, the share of its prompts drawn as it; for object prompts, the share without a face."""
    groups: dict[str, list[bool]] = {}
    for verdict, wanted in zip(verdicts, expected, strict=True):
        name = wanted["character"]
        key = name if name != "none" else "objects_without_face"
        groups.setdefault(key, []).append(verdict["character"] == name)
    return {key: round(float(np.mean(hits)), 4) for key, hits in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["checkpoints/toyworld-sd"], help="pipeline folder(s)")
    parser.add_argument("--oracle", default="checkpoints/toyworld-oracle")
    parser.add_argument("--clip", default="checkpoints/toyworld-clip", help="toy CLIP folder ('' to skip)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.5], help="default: diffusers' 7.5")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1234, help="seed of the first image; image i uses seed + i")
    parser.add_argument("--timing", action="store_true", help="also time 16 images at batch 16")
    parser.add_argument("--timing-only", action="store_true", help="only time 16 images per model (a speed ratio)")
    parser.add_argument("--save-grid", type=Path, default=None, help="PNG of the first 100 generated images")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the figures")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_grad_enabled(False)
    oracle = quality.load_oracle(args.oracle, args.device)
    report: dict = {"generators": []}
    if not args.timing_only:
        report["oracle_held_out_accuracy"] = quality.oracle_held_out_accuracy(oracle)
    judge = None
    if args.clip and not args.timing_only:
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.clip}")
        judge = quality.ToyClipJudge(model, preprocess, open_clip.get_tokenizer(f"local-dir:{args.clip}"), args.device)
        images, labels = quality.fresh_renders(2000)
        report["clip_zero_shot_accuracy_on_renders"] = quality.accuracy(judge.predict(images), labels)
    prompts = quality.quality_prompts()
    texts, expected = [p for p, _ in prompts], [e for _, e in prompts]
    seeds = [args.seed + i for i in range(len(texts))]
    for model_path in args.model:
        pipe = StableDiffusionPipeline.from_pretrained(model_path, safety_checker=None).to(args.device)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        for guidance in [] if args.timing_only else args.guidance:
            started = time.monotonic()
            images = generate(pipe, texts, seeds, args.steps, guidance, args.batch_size)
            entry = {"model": str(model_path), "guidance": guidance, "steps": args.steps, "images": len(images),
                     "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
            verdicts = quality.oracle_predict(oracle, images)
            entry["accuracy"] = quality.accuracy(verdicts, expected)
            entry["character_breakdown"] = character_breakdown(verdicts, expected)
            if judge is not None:
                entry["clip_oracle_agreement"] = quality.accuracy(judge.predict(images), verdicts)
            report["generators"].append(entry)
            print(json.dumps(entry))
            if args.save_grid:
                rows = [np.concatenate(list(images[r * 10 : r * 10 + 10]), 1) for r in range(0, 10)]
                from PIL import Image

                name = args.save_grid.with_name(f"{args.save_grid.stem}-{Path(model_path).name}-g{guidance}.png")
                Image.fromarray(np.concatenate(rows, 0)).save(name)
        if args.timing or args.timing_only:
            generate(pipe, texts[:2], seeds[:2], args.steps, 7.5, 2, progress=False)  # warm-up
            timings = []
            for _ in range(3):  # the best of three, so a moment of contention does not decide the ratio
                started = time.monotonic()
                generate(pipe, texts[:16], seeds[:16], args.steps, 7.5, 16, progress=False)
                timings.append(time.monotonic() - started)
            report.setdefault("seconds_for_16_images", {})[str(model_path)] = round(min(timings), 2)
    report["device"] = args.device
    times = report.get("seconds_for_16_images", {})
    if len(times) == 2:
        first, second = times.values()
        report["speed_ratio_first_over_second"] = round(first / second, 2)
    print(json.dumps({k: v for k, v in report.items() if k != "generators"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
