"""Writing an edited model for other tools: a diffusers folder, a single ``.safetensors`` file, or a LoRA.

* :func:`export_edit` applies an :class:`~erasure.edit.Edit` to its base model and writes the result in one of
  :data:`FORMATS`, atomically (nothing is left at ``out`` unless the whole export succeeded).
* :func:`save_single_file` writes the original (LDM) single-file layout that ``from_single_file`` reads back.
* :func:`lora_state_dict` / :func:`save_lora` factor the edit's deltas into a LoRA in the peft / diffusers format,
  which needs no base model to write: ``B A`` is the truncated SVD of each delta (Eckart-Young: the best
  rank-``r`` approximation in the Frobenius norm), exact once ``r`` reaches the delta's rank.

LoRA and biases: peft's ``lora_bias`` is one switch for a whole adapter, and ``fuse_lora`` refuses a layer that
has a LoRA bias but no base bias. An edit that changes the bias of some adapted layers and the weight of bias-less
ones (ESD-x: ``to_out.0.bias`` beside ``to_q/to_k/to_v``) is therefore written as two adapters: the weights in the
folder itself (``lora_bias`` off) and the bias deltas in ``bias/`` (zero rank-1 factors, ``lora_bias`` on, only
layers whose base has a bias -- the edit changed it). Loading both and fusing reproduces the edit.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from erasure.convert import single_file_state_dict
from erasure.edit import MAX_RELATIVE_CHANGE, Edit
from erasure.files import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "LORA_WEIGHTS_NAME",
    "BIAS_ADAPTER",
    "export_edit",
    "lora_state_dict",
    "save_lora",
    "save_single_file",
]

FORMATS = ("diffusers", "single-file", "lora")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(folder) reads
BIAS_ADAPTER = "bias"  # sub-folder of a LoRA export holding the bias deltas, when they need their own adapter


def export_edit(
    edit: Edit,
    out: str | Path,
    format: str,
    *,
    model: str | None = None,
    model_config: str | Path | None = None,
    scale: float = 1.0,
    rank: int = 16,
    device: str | torch.device | None = None,
    max_relative_change: float = MAX_RELATIVE_CHANGE,
) -> tuple[Path, list[str]]:
    """Write ``edit`` applied to its base model (or, for ``lora``, the edit alone) to ``out``.

    Args:
        edit: The edit.
        out: Output folder (``diffusers``, ``lora``) or ``.safetensors`` file (``single-file``); must not exist.
        format: One of :data:`FORMATS`.
        model: Base model (default: the one the edit records); not needed for ``lora``.
        model_config: For a single-file ``model``: the diffusers folder (or hub id) describing it.
        scale: Strength of the edit (``diffusers``, ``single-file``).
        rank: LoRA rank (capped at each layer's own rank).
        device: Where the model is loaded.
        max_relative_change: Passed to :meth:`erasure.edit.Edit.apply_to`.

    Returns:
        ``(out, skipped)``: what was written, and the tensors a LoRA cannot express (empty for other formats).

    Raises:
        FileExistsError: ``out`` exists.
        ValueError: A generation-time edit, an unknown format, a non-finite scale, a single-file ``out`` without
            ``.safetensors``, or no base model.
    """
    from erasure.pipeline import load_pipeline

    out = Path(out)
    if edit.config.get("generation_time"):
        raise ValueError(
            f"{edit.config.get('method')} is a generation-time edit: it changes no weights, so there is nothing to "
            "export; sample with it through erasure (evaluate, grid, probe) or give the pipeline its setting."
        )
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another output path.")
    if not math.isfinite(float(scale)):
        raise ValueError(f"The export scale must be a finite number, got {scale}.")
    if format == "lora":
        return save_lora(edit, out, rank)
    if format == "single-file" and out.suffix != ".safetensors":
        raise ValueError(f"{out} must end in .safetensors for the single-file format.")
    model = model or edit.config.get("base_model")
    if not model:
        raise ValueError("The edit records no base model; name it (--model).")
    pipe = load_pipeline(model, device=device, config=model_config)
    edit.apply_to(pipe, scale=scale, max_relative_change=max_relative_change)
    with atomic_path(out, overwrite=False) as temporary:
        if format == "diffusers":
            pipe.save_pretrained(temporary, safe_serialization=True)
        else:
            _write_single_file(pipe, temporary)
    return out, []


def _write_single_file(pipe: Any, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(single_file_state_dict(pipe), str(path), metadata={"format": "pt"})


def save_single_file(pipe: Any, path: str | Path) -> Path:
    """Write :func:`erasure.convert.single_file_state_dict` to a ``.safetensors`` file, atomically.

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline.
        path: Destination; must end in ``.safetensors``.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} must end in .safetensors.")
    with atomic_path(path) as temporary:
        _write_single_file(pipe, temporary)
    return path


# --------------------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------------------


def _lora_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``B [out, k]``, ``A [k, in]``, ``k = min(rank, out, in)``, with ``B A`` the best rank-``k`` approximation.

    Truncated SVD (Eckart-Young): ``delta = U S V^T``, ``B = U_k S_k^(1/2)``, ``A = S_k^(1/2) V_k^T``. A layer's
    delta has rank at most ``min(out, in)``, so a larger rank would only add zero columns.
    """
    u, singular, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    kept = min(rank, singular.shape[0])
    root = singular[:kept].sqrt()
    return (u[:, :kept] * root).float().contiguous(), (root[:, None] * vh[:kept]).float().contiguous()


def _adapter_config(ranks: dict[str, int], lora_bias: bool) -> dict[str, Any]:
    """Peft's ``LoraConfig`` (as a dict) of a UNet adapter with per-module ranks and ``alpha = rank`` (scale 1)."""
    unet = {module.removeprefix("unet."): r for module, r in ranks.items() if module.startswith("unet.")}
    common = collections.Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {module: r for module, r in unet.items() if r != common}
    return {
        "peft_type": "LORA",
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(unet),
        "lora_bias": lora_bias,
        "use_dora": False,
        "bias": "none",
    }


def lora_state_dict(edit: Edit, rank: int) -> tuple[dict[str, Tensor], dict[str, Any], list[str]]:
    """Factor an edit's weight deltas into a LoRA in the peft / diffusers key format.

    Each weight delta of a linear (2-D) or convolution (4-D, factored as ``[out, in*kh*kw]``) layer becomes
    ``<component>.<module>.lora_A.weight`` / ``lora_B.weight`` (a ``[k, in, kh, kw]`` conv and a 1x1 conv for 4-D),
    ``k = min(rank, out, in*kh*kw)``, so ``B A`` is the best rank-``k`` approximation of the delta. A bias delta
    becomes ``lora_B.bias`` (peft's ``lora_bias``) when *every* adapted layer has one -- then every base layer has
    a bias and ``fuse_lora`` works; otherwise the biases go to :func:`bias_adapter_state_dict`. Other tensors
    (normalisation weights, a bias of a layer whose weight is unchanged) have no LoRA form and are skipped, and so
    are text-encoder deltas (the adapter is the UNet's; export them with the ``diffusers`` or ``single-file``
    format).

    Args:
        edit: The edit.
        rank: The largest LoRA rank ``r`` (``lora_alpha = r`` per module, so the LoRA scale is 1).

    Returns:
        ``(state_dict, adapter_config, skipped_keys)``; the adapter config is peft's ``LoraConfig`` as a dict.
        Bias deltas written by :func:`bias_adapter_state_dict` are not in ``skipped_keys``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}.")
    state: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for key, delta in edit.deltas.items():
        if key.startswith("unet.") and key.endswith(".weight") and delta.ndim in (2, 4):
            module = key.removesuffix(".weight")
            b, a = _lora_factors(delta.reshape(delta.shape[0], -1), rank)
            if delta.ndim == 4:
                a, b = a.reshape(a.shape[0], *delta.shape[1:]), b[:, :, None, None]
            state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = a.contiguous(), b.contiguous()
            ranks[module] = a.shape[0]
    biases = {module: edit.deltas[f"{module}.bias"] for module in ranks if f"{module}.bias" in edit.deltas}
    lora_bias = bool(biases) and len(biases) == len(ranks)
    if lora_bias:
        for module, bias in biases.items():
            state[f"{module}.lora_B.bias"] = bias.contiguous()
    written = {f"{module}.weight" for module in ranks} | {f"{module}.bias" for module in biases}
    skipped = [key for key in edit.deltas if key not in written]
    return state, _adapter_config(ranks, lora_bias), skipped


def bias_adapter_state_dict(edit: Edit) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The bias deltas :func:`lora_state_dict` could not put in its adapter, as a second adapter; else ``None``.

    Each layer whose weight and bias the edit changed gets zero rank-1 factors (they add nothing to the weight) and
    ``lora_B.bias`` = the bias delta, with ``lora_bias`` on: the edit changed that bias, so the base layer has one.
    """
    _, config, _ = lora_state_dict(edit, 1)
    if config["lora_bias"]:
        return None
    state: dict[str, Tensor] = {}
    for key, bias in edit.deltas.items():
        weight = edit.deltas.get(key.removesuffix(".bias") + ".weight")
        if not key.startswith("unet.") or not key.endswith(".bias") or weight is None or weight.ndim not in (2, 4):
            continue
        module = key.removesuffix(".bias")
        shape_a = (1, *weight.shape[1:])
        shape_b = (weight.shape[0], 1) if weight.ndim == 2 else (weight.shape[0], 1, 1, 1)
        state[f"{module}.lora_A.weight"] = torch.zeros(shape_a)
        state[f"{module}.lora_B.weight"] = torch.zeros(shape_b)
        state[f"{module}.lora_B.bias"] = bias.contiguous()
    if not state:
        return None
    modules = {key.rsplit(".lora_", 1)[0]: 1 for key in state}
    return state, _adapter_config(modules, lora_bias=True)


def save_lora(edit: Edit, folder: str | Path, rank: int) -> tuple[Path, list[str]]:
    """Write the edit as a LoRA folder (``pytorch_lora_weights.safetensors`` + ``adapter_config.json``), atomically.

    The folder loads with diffusers' ``pipe.load_lora_weights(folder)`` (needs peft installed). When the bias
    deltas need their own adapter (see the module docstring) they are in ``folder/bias``, loaded the same way under
    another adapter name; ``pipe.fuse_lora(adapter_names=[...])`` with both reproduces the edit.

    Returns:
        ``(folder, skipped_keys)``.
    """
    from safetensors.torch import save_file

    state, config, skipped = lora_state_dict(edit, rank)
    if not state:
        raise ValueError("This edit has no linear or convolution weight deltas, so it has no LoRA form.")
    adapters = {"": (state, config)}
    bias = bias_adapter_state_dict(edit)
    if bias is not None:
        adapters[BIAS_ADAPTER] = bias
    about = {k: edit.config.get(k) for k in ("method", "base_model", "family", "base_fingerprint")}
    metadata = {"format": "pt", "erasure_edit": json.dumps(about, default=str)}
    with atomic_path(folder, overwrite=False) as temporary:
        for sub, (tensors, adapter_config) in adapters.items():
            target = temporary / sub if sub else temporary
            target.mkdir()
            save_file(tensors, str(target / LORA_WEIGHTS_NAME), metadata=metadata)
            text = json.dumps(adapter_config, indent=2) + "\n"
            (target / "adapter_config.json").write_text(text, encoding="utf-8")
    if skipped:
        logger.warning("The LoRA leaves out %d tensor(s) it cannot express, e.g. %s.", len(skipped), skipped[0])
    return Path(folder), skipped
