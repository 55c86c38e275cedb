"""The models of a generating run: the base pipeline, edit folders and weights files, all as edits of the base.

A weights file (a partial UNet state dict, as the official ESD and UCE scripts save them) becomes an
:class:`erasure.edit.Edit` with :meth:`~erasure.edit.Edit.from_state_dict` (``delta = W_file - W_base``), so every
model other than the base is generated the same way: the edit applied to the base pipeline, then reverted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasure.evaluation.errors import EvaluationError
from erasure.evaluation.jobs import ModelEntry, unique_label

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from erasure.edit import Edit

__all__ = ["DTYPES", "load_models", "load_unet_weights", "resolve_dtype", "weights_edit"]

#: ``--dtype`` choices (``auto``: float16 on CUDA, else float32).
DTYPES = ("auto", "float32", "float16", "bfloat16")


def load_unet_weights(path: str | Path, unet: torch.nn.Module) -> dict[str, Tensor]:
    """Read a partial UNet state dict from ``.safetensors`` and name it in diffusers' terms.

    ESD's and UCE's scripts save the edited UNet tensors with diffusers names (``down_blocks.1.attentions.0...``),
    loaded with ``pipe.unet.load_state_dict(weights, strict=False)``. Keys may also carry a ``unet.`` prefix, or
    be in the original LDM layout under ``model.diffusion_model.`` (CompVis-era ESD checkpoints), which is mapped
    back to diffusers names.

    Args:
        path: The ``.safetensors`` file (pickles are refused).
        unet: The UNet the weights are for (names and shapes are checked against it).

    Returns:
        ``{diffusers parameter name: tensor}``.

    Raises:
        EvaluationError: Not a safetensors file, no UNet keys, an unknown key, or a shape mismatch.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise EvaluationError(
            f"--weights takes a .safetensors file, not {path.name} (pickles can run code when loaded): convert it "
            "with safetensors.torch.save_file(torch.load(f, weights_only=True), 'weights.safetensors')."
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise EvaluationError(f"Could not read {path}: {error}") from error
    if not state:
        raise EvaluationError(f"{path} holds no tensors.")
    own = dict(unet.state_dict())
    ldm_names: dict[str, str] | None = None
    renamed: dict[str, Tensor] = {}
    for key, tensor in state.items():
        name = key
        if name.startswith("unet."):
            name = name[len("unet.") :]
        elif name.startswith("model.diffusion_model."):
            if ldm_names is None:
                ldm_names = _ldm_to_diffusers_names(unet)
            name = ldm_names.get(name[len("model.diffusion_model.") :], name)
        if name not in own:
            raise EvaluationError(
                f"{path.name}: '{key}' is not a UNet parameter of this model; --weights takes a partial UNet state "
                "dict with diffusers names (optionally prefixed 'unet.' or, in the LDM layout, "
                "'model.diffusion_model.'), as ESD's and UCE's scripts save it; check that it was made from this base."
            )
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise EvaluationError(
                f"{path.name}: '{key}' has shape {tuple(tensor.shape)} but the model's {name} has "
                f"{tuple(own[name].shape)}; the weights come from a different base model."
            )
        renamed[name] = tensor
    return renamed


def _ldm_to_diffusers_names(unet: torch.nn.Module) -> dict[str, str]:
    from erasure.convert import ldm_to_diffusers_names

    try:
        return ldm_to_diffusers_names(unet)
    except ValueError as error:
        raise EvaluationError(f"LDM-layout weights are not supported for this UNet ({error}).") from error


def weights_edit(path: str | Path, pipe: Any) -> Edit:
    """A weights file as an edit of ``pipe``: ``delta = W_file - W_base`` for each tensor it holds.

    Applying the edit sets those tensors to the file's values up to float32 rounding (see
    :meth:`erasure.edit.Edit.from_state_dict`); the edit carries the base fingerprint of ``pipe``.

    Raises:
        EvaluationError: As :func:`load_unet_weights`, or for a tensor that is no parameter (a buffer).
    """
    from erasure.edit import Edit

    state = load_unet_weights(path, pipe.unet)
    try:
        return Edit.from_state_dict(state, pipe, component="unet", source=str(path))
    except KeyError as error:  # a buffer: an edit holds parameters only
        raise EvaluationError(f"{Path(path).name}: {error.args[0]} (an edit changes parameters only).") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a ``--dtype`` choice (:data:`DTYPES`) on ``device``."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EvaluationError(f"Unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16.")
    return getattr(torch, dtype)


def load_models(
    model: str,
    edits: Sequence[str | Path],
    weights: Sequence[str | Path],
    device: torch.device,
    dtype: str,
    taken: set[str],
    *,
    base_check: bool = True,
    max_relative_change: float | None = None,
    scales: Sequence[float] | None = None,
    model_config: str | Path | None = None,
) -> tuple[Any, list[ModelEntry]]:
    """Load the base pipeline, and each edit folder and weights file as an edit of it.

    Edit folders are read first (:func:`erasure.methods.load_edit`: a bad folder, or one naming a method erasure
    does not know, fails before the model loads); each edit's base fingerprint is then checked against the pipeline.

    Args:
        model: The base pipeline (hub id, folder or single file).
        edits: Edit folders.
        weights: Weights files (``.safetensors``; see :func:`load_unet_weights`).
        device: Where to load the pipeline.
        dtype: A :data:`DTYPES` choice.
        taken: Labels already used in the run (the new ones are added).
        base_check: Refuse edits without a base fingerprint.
        max_relative_change: Largest accepted ``|delta| / |W0|`` of an edit folder's tensors
            (:data:`erasure.edit.MAX_RELATIVE_CHANGE` when ``None``; weights files are not limited).
        scales: Instead of one model per edit, the single edit at each of these strengths (a sweep).
        model_config: Configs of a single-file ``model`` (:func:`erasure.pipeline.load_pipeline`'s ``config``).

    Returns:
        ``(pipe, entries)``: the base model first, then the edits in order, then the weights files.
    """
    from erasure.edit import MAX_RELATIVE_CHANGE, FingerprintMismatchError, fingerprint
    from erasure.methods import load_edit
    from erasure.pipeline import detect_family, load_pipeline
    from erasure.prompt_sets import file_sha256

    limit = MAX_RELATIVE_CHANGE if max_relative_change is None else float(max_relative_change)
    loaded_edits = []
    for folder in edits:  # cheap checks first: a bad edit folder fails before the model loads
        loaded_edits.append((Path(folder), load_edit(folder, require_fingerprint=base_check)))
    for path in weights:
        if not Path(path).is_file():
            raise EvaluationError(f"No weights file at {path}.")
    torch_dtype = resolve_dtype(dtype, device)
    pipe = load_pipeline(model, device=device, dtype=torch_dtype, config=model_config)
    pipe.set_progress_bar_config(disable=True)
    family = str(detect_family(pipe))
    entries = [ModelEntry(unique_label("base", taken), "base", str(model), info={"family": family})]
    for folder, edit in loaded_edits:
        try:
            edit.check_base(pipe)
        except FingerprintMismatchError as error:
            raise FingerprintMismatchError(f"--edit {folder}: {error}") from None
        info = {
            "family": family,
            "method": edit.config.get("method", ""),
            "edit_fingerprint": fingerprint(edit.deltas),
            "base_fingerprint": edit.config.get("base_fingerprint") or "",
            "base_model": edit.config.get("base_model", ""),
            "base_check": "done" if edit.config.get("base_fingerprint") or edit.config.get("parts") else "skipped",
            # null: the check is off (strict JSON has no infinity)
            "max_relative_change": limit if math.isfinite(limit) else None,
        }
        if edit.config.get("generation_time"):  # a suppression at sampling time: no tensors, no base to check
            info |= {
                "generation_time": True,
                "base_check": "not applicable",
                "suppression": edit.config["suppression"],
            }
        for scale in scales if scales is not None else (None,):
            name = folder.name if scale is None else f"{folder.name}-scale-{scale:g}"
            extra = {} if scale is None else {"scale": float(scale)}
            entries.append(
                ModelEntry(
                    unique_label(name, taken), "edit", str(folder), edit=edit, scale=1.0 if scale is None else scale,
                    max_relative_change=limit, info=info | extra,
                )
            )  # fmt: skip
    for path in weights:
        edit = weights_edit(path, pipe)
        info = {"family": family, "weights_sha256": file_sha256(path), "tensors": len(edit.deltas)}
        label = unique_label(Path(path).stem, taken)
        entries.append(ModelEntry(label, "weights", str(path), edit=edit, info=info))
    return pipe, entries
