r"""Which words does an edit move? Per-token change of the cross-attention keys and values.

A cross-attention edit changes what the UNet reads from the text: for the token embedding ``c`` at each position of
a prompt, the key/value projection ``W0 c`` becomes ``(W0 + dW) c``. This script prints, for every prompt given and
every token position, the relative change ``|dW c| / |W0 c|`` averaged over the edit's ``attn2.to_k`` /
``attn2.to_v`` tensors (an edit that touches neither has nothing to show). The erased word should move a lot; the
words of other prompts ("a picture of" in "a picture of Miro") should not. Positions after the end-of-text token
(padding) are summarised by their mean.

Example (the toy world: UCE's official last-token rows against ``--preserve-tokens all``)::

    erasure erase uce --model checkpoints/toyworld-sd --concept prompts/toyworld/pip.toml --out runs/pip-uce
    python scripts/token_drift.py --model checkpoints/toyworld-sd --edit runs/pip-uce \
        --prompt "an image of Pip" "an image of Miro" "a drawing of Zog"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from erasure.diffusion import encode_prompts
from erasure.edit import Edit
from erasure.methods import load_edit
from erasure.methods.base import select_unet_parameters
from erasure.pipeline import load_pipeline


def token_drift(pipe: torch.nn.Module, edit: Edit, prompts: list[str]) -> torch.Tensor:
    """``[prompts, positions]`` relative change of the keys/values, averaged over the edit's K/V tensors.

    Args:
        pipe: The base pipeline (the edit not applied).
        edit: A cross-attention edit.
        prompts: The prompts to read.

    Returns:
        ``|dW c| / |W0 c|`` per prompt and token position (all encoder positions, padding included).

    Raises:
        ValueError: The edit touches no cross-attention key or value projection.
    """
    projections = select_unet_parameters(pipe.unet, "xattn_kv")  # the K/V weights, keyed as in edits
    keys = [key for key in edit.deltas if key in projections]
    if not keys:
        raise ValueError("The edit changes no cross-attention key/value projection (attn2.to_k / attn2.to_v).")
    with torch.no_grad():
        embeddings = encode_prompts(pipe, prompts).prompt_embeds.double()
        changes = []
        for key in keys:
            weight = projections[key].detach().double()
            delta = edit.deltas[key].double().to(weight.device)
            changes.append((embeddings @ delta.T).norm(dim=-1) / (embeddings @ weight.T).norm(dim=-1).clamp_min(1e-12))
    return torch.stack(changes).mean(dim=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="base pipeline folder or hub id")
    parser.add_argument("--edit", type=Path, required=True, help="run folder written by `erasure erase`")
    parser.add_argument("--prompt", nargs="+", required=True, help="prompts to read")
    args = parser.parse_args(argv)
    try:
        edit = load_edit(args.edit)
        pipe = load_pipeline(args.model)
        drift = token_drift(pipe, edit, args.prompt)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for prompt, row in zip(args.prompt, drift, strict=True):
        ids = pipe.tokenizer(prompt, truncation=True).input_ids
        words = [pipe.tokenizer.decode([token], clean_up_tokenization_spaces=False).strip() for token in ids]
        words[0], words[-1] = "<start>", "<end>"
        cells = [f"{word} {100 * float(value):.0f}%" for word, value in zip(words, row, strict=False)]
        padding = row[len(ids) :]
        if len(padding):
            cells.append(f"(padding {100 * float(padding.mean()):.0f}%)")
        print(f"{prompt!r}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
