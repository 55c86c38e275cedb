"""The models of a probe: the base pipeline, the model under test as an edit of it, and the reference model.

The model under test is always an :class:`erasure.edit.Edit` of the base pipeline, so every attack runs on one
pipeline with the edit applied and reverted (:class:`~erasure.attacks.context.AttackContext`):

* an edit folder (``erasure erase``'s output), read by :func:`erasure.methods.load_edit`, its base fingerprint
  checked against the base;
* a weights file (a partial UNet state dict, as ESD's and UCE's scripts save it), by
  :func:`erasure.evaluation.models.weights_edit`;
* a peer's full checkpoint of the same architecture (:func:`peer_edit`): the UNet and text-encoder tensors that
  differ from the base become an edit (:meth:`erasure.edit.Edit.from_state_dict`, stacked when both differ). Its
  VAE and tokenizer must equal the base's: an edit cannot carry them.

:func:`load_probe_models` checks the cheap things (one model under test at most, files exist, the edit folder reads)
before loading any pipeline, and names the input that failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from erasure.attacks.base import AttackError

__all__ = ["ProbeModels", "latent_space_mismatch", "load_probe_models", "peer_edit"]


@dataclass
class ProbeModels:
    """What :func:`load_probe_models` returns.

    Attributes:
        pipe: The base pipeline.
        edit: The model under test as an edit of ``pipe`` (``None``: the pipeline as loaded).
        reference: A pipeline that never learned the concept, or ``None``.
        source: What the model under test is, for results: ``{kind, path, tensors}``.
    """

    pipe: Any
    edit: Any
    reference: Any = None
    source: dict[str, Any] = field(default_factory=dict)


def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters())


def _check_same(name: str, base: dict[str, torch.Tensor], peer: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(base) ^ set(peer))
    if missing:
        verb = "lacks" if missing[0] in base else "adds"
        raise AttackError(
            f"{where} is not the architecture of the base model: its {name} {verb} '{missing[0]}' "
            f"({len(missing)} parameter name(s) differ)."
        )
    for key, tensor in base.items():
        if tuple(tensor.shape) != tuple(peer[key].shape):
            raise AttackError(
                f"{where} is not the architecture of the base model: {name}.{key} has shape "
                f"{tuple(peer[key].shape)}, the base's {tuple(tensor.shape)}."
            )


def _equal(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether ``theirs`` holds exactly ``mine``'s values (compared on ``mine``'s device and dtype)."""
    return torch.equal(theirs.detach().to(mine.device, mine.dtype), mine.detach())


def latent_space_mismatch(pipe: Any, other: Any, steps: int) -> str | None:
    """Why a trajectory ``pipe`` started cannot be finished by ``other``, or ``None`` when it can.

    Handing a latent ``x_t`` from one model to another mid-way (trajectory completion) means the same thing to both
    only when they share the latent space and the noise schedule: the same VAE weights and scaling, and the same
    DDIM timesteps, ``alphas_cumprod`` and parameterisation at ``steps`` steps. The shipped never-saw-Pip reference,
    whose VAE was re-centred on its own data, cannot finish the base's trajectories; one trained with
    ``scripts/train_toyworld.py --keep-vae`` can.
    """
    from erasure.sampling import ddim_scheduler

    mine, theirs = _parameters(pipe.vae), _parameters(other.vae)
    if set(mine) != set(theirs) or any(t.shape != mine[k].shape or not _equal(mine[k], t) for k, t in theirs.items()):
        return "its VAE differs from the base model's"
    for key in ("scaling_factor", "shift_factor"):
        if pipe.vae.config.get(key) != other.vae.config.get(key):
            return f"its VAE's {key} differs ({other.vae.config.get(key)} against {pipe.vae.config.get(key)})"
    a, b = ddim_scheduler(pipe, steps), ddim_scheduler(other, steps)
    if a.config.prediction_type != b.config.prediction_type:
        return f"it predicts {b.config.prediction_type}, the base model {a.config.prediction_type}"
    if not torch.equal(a.timesteps.cpu(), b.timesteps.cpu()) or not torch.equal(a.alphas_cumprod, b.alphas_cumprod):
        return "its noise schedule differs from the base model's"
    return None


def peer_edit(pipe: Any, peer: Any, source: str = "") -> Any:
    """The edit that turns ``pipe`` into ``peer`` (same architecture): its UNet and text-encoder tensors that differ.

    Raises:
        AttackError: If the architectures, tokenizers or VAEs differ, or no UNet or text-encoder tensor differs.
    """
    from erasure.edit import Edit, stack

    where = f"--model2 {source}" if source else "the peer model"
    if dict(pipe.tokenizer.get_vocab()) != dict(peer.tokenizer.get_vocab()):
        raise AttackError(f"{where} has another tokenizer vocabulary than the base model; an edit cannot carry it.")
    edits = []
    for component in ("unet", "text_encoder"):
        base, theirs = _parameters(getattr(pipe, component)), _parameters(getattr(peer, component))
        _check_same(component, base, theirs, where)
        changed = {key: tensor.detach().to("cpu") for key, tensor in theirs.items() if not _equal(base[key], tensor)}
        if changed:
            edits.append(Edit.from_state_dict(changed, pipe, component=component, source=str(source)))
    vae, theirs_vae = _parameters(pipe.vae), _parameters(peer.vae)
    _check_same("vae", vae, theirs_vae, where)
    if any(not _equal(vae[k], t) for k, t in theirs_vae.items()):
        raise AttackError(
            f"{where} has another VAE than the base model; a probe's edit covers the UNet and text encoder."
        )
    if not edits:
        raise AttackError(f"{where} has the base model's UNet and text-encoder weights: there is nothing to probe.")
    return edits[0] if len(edits) == 1 else stack(edits)


def load_probe_models(
    model: str | Path,
    *,
    edit: str | Path | None = None,
    weights: str | Path | None = None,
    model2: str | Path | None = None,
    reference: str | Path | None = None,
    model_config: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    require_fingerprint: bool = True,
) -> ProbeModels:
    """Load the base, the model under test (at most one of ``edit``, ``weights``, ``model2``) and the reference.

    Raises:
        AttackError: On more than one model under test, a missing weights file, or a bad peer (see
            :func:`peer_edit`); the loaders' own errors (``EditFormatError``, ``PipelineLoadError``,
            ``EvaluationError``) for bad files, and ``FingerprintMismatchError`` (naming ``--edit``) for an edit of
            another base.
    """
    from erasure.edit import FingerprintMismatchError, fingerprint
    from erasure.methods import load_edit
    from erasure.pipeline import load_pipeline

    given = [name for name, value in (("--edit", edit), ("--weights", weights), ("--model2", model2)) if value]
    if len(given) > 1:
        raise AttackError(f"Give one model under test, not {' and '.join(given)}.")
    loaded_edit = load_edit(edit, require_fingerprint=require_fingerprint) if edit else None
    if weights and not Path(weights).is_file():
        raise AttackError(f"--weights: no file at {weights}.")
    pipe = load_pipeline(model, device=device, dtype=dtype, config=model_config)
    pipe.set_progress_bar_config(disable=True)
    source: dict[str, Any] = {"kind": "base", "path": str(model)}
    if loaded_edit is not None:
        try:
            loaded_edit.check_base(pipe)
        except FingerprintMismatchError as error:
            raise FingerprintMismatchError(f"--edit {edit}: {error}") from None
        source = {"kind": "edit", "path": str(edit), "method": loaded_edit.config.get("method", "")}
    elif weights:
        from erasure.evaluation.models import weights_edit

        loaded_edit = weights_edit(weights, pipe)
        source = {"kind": "weights", "path": str(weights)}
    elif model2:
        peer = load_pipeline(model2, device=device, dtype=dtype)
        loaded_edit = peer_edit(pipe, peer, str(model2))
        del peer
        source = {"kind": "model2", "path": str(model2)}
    if loaded_edit is not None:
        source |= {"tensors": len(loaded_edit.deltas), "edit_fingerprint": fingerprint(loaded_edit.deltas)}
    reference_pipe = None
    if reference:
        reference_pipe = load_pipeline(reference, device=device, dtype=dtype)
        reference_pipe.set_progress_bar_config(disable=True)
        _check_same("unet", _parameters(pipe.unet), _parameters(reference_pipe.unet), f"--reference {reference}")
    return ProbeModels(pipe, loaded_edit, reference_pipe, source)
