"""RECE: Reliable and Efficient Concept Erasure (Gong, Chen, Wei, Chen, Jiang; ECCV 2024; arXiv 2407.12383).

UCE (:mod:`erasure.methods.uce`) maps the concept's token embeddings to the anchor's keys and values, but other
embeddings can still produce the concept's original keys and values through the edited maps. RECE finds the
embedding that does, in closed form, and erases it too, for a few epochs:

1. Start from a UCE edit ``W'`` of every cross-attention key and value projection (this config's UCE fields).
2. Each epoch, for every concept word with full-length token embeddings ``c`` (every position the UNet attends
   to, padding included, as the official code), derive the adversarial embedding (paper Eq. 5, the "regzero" variant
   of the official code, :func:`erasure.methods.closed_form.adversarial_embeddings`)::

       c' = (sum_l W'_l^T W'_l + lambda_reg I)^-1 (sum_l W'_l^T W_l c)

   summed over every edited key and value map ``l`` together, with ``W_l`` the original weights.
3. UCE-edit the current weights once more so that ``c'`` maps, position by position, to the anchor's keys and
   values *under the current weights*, ``W' c_anchor``, while the preserve prompts (and the unconditional prompt,
   which classifier-free guidance subtracts; the official default when no preserve set is given) keep
   ``W' c_p``; the ridge term pulls towards ``W'``. Official weights: erase 1, preserve 0.1, lambda 0.1.

Defaults per concept kind, from the official scripts' defaults: ``lambda_reg`` 0.1 for unsafe content (train.py),
1e-3 for art styles (train_artists.py) and objects (train_object.py's default, its "hard" objects; it passes 0.1
only for a list of "easy" ones); epochs 3 for unsafe content (train.py's nudity default; its I2P run uses 2), 1 for
styles and objects. Characters (named people) follow styles; attributes follow objects. A request with several
kinds takes the largest epoch count; ``lambda_reg`` is per concept.

Two differences from the official pipeline remain: the first edit is this library's UCE at its defaults (the
official starting checkpoints come from the older UCE script, which edits every token from the last subject word
through the padding and always preserves the empty prompt), and the per-kind defaults above. ``c`` is, as in the
official code, the bare concept word (each of ``Concept.concept_words``; its anchor the concept's single anchor, or
the empty prompt for paired anchors); ``adversarial_source = "prompts"`` derives ``c'`` from every erase prompt
instead, which weighs the erase rows by the number of prompts (77 rows each) against the preserve rows.

The official code keeps the epoch whose validation images a classifier (NudeNet, Q16) finds cleanest. This
implementation keeps the last epoch and selects with no judge: a judge chosen for selection would also decide the
numbers it reports. The stats record, per epoch, how close ``W' c'`` comes to ``W c`` before and after that
epoch's edit (``adversarial_residual``: relative error; small before an edit means the attack embedding still
reaches the concept's keys and values).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from erasure.concepts import Concept, EraseRequest
from erasure.methods import register
from erasure.methods.closed_form import RidgeSolver, adversarial_embeddings
from erasure.methods.uce import UCE, UCEConfig, encode_full

logger = logging.getLogger(__name__)

#: lambda_reg per concept kind (official defaults: train.py 0.1; train_artists.py and train_object.py 1e-3).
REGULARISATION_BY_KIND = {"unsafe": 0.1, "object": 1e-3, "attribute": 1e-3, "style": 1e-3, "character": 1e-3}
#: Epochs per concept kind (official defaults: train.py 3 for nudity; train_artists.py and train_object.py 1).
EPOCHS_BY_KIND = {"unsafe": 3, "object": 1, "attribute": 1, "style": 1, "character": 1}


@dataclass
class RECEConfig(UCEConfig):
    """RECE settings: the UCE fields configure the initial edit; the rest are RECE's (official defaults)."""

    epochs: int | None = field(
        default=None, metadata={"help": "adversarial epochs (default per concept kind: 3 unsafe, else 1)"}
    )
    embedding_regularisation: float | None = field(
        default=None,
        metadata={"help": "lambda_reg of the adversarial embedding (default per kind: 0.1 unsafe, else 1e-3)"},
    )
    adversarial_erase_scale: float = field(default=1.0, metadata={"help": "weight of the adversarial erase rows"})
    adversarial_preserve_scale: float = field(default=0.1, metadata={"help": "weight of the preserve rows per epoch"})
    adversarial_lam: float = field(default=0.1, metadata={"help": "ridge strength towards the current weights"})
    adversarial_source: str = field(
        default="word",
        metadata={"help": "what c' is derived from: word (the concept's words, as the official code) or prompts "
                  "(every erase prompt, paired with its anchor)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adversarial_source not in ("word", "prompts"):
            raise ValueError(f"adversarial_source must be word or prompts, got {self.adversarial_source!r}.")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 0):
            raise ValueError(f"epochs must be an integer >= 0, got {self.epochs!r}.")
        if self.embedding_regularisation is not None:
            value = float(self.embedding_regularisation)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"embedding_regularisation must be > 0, got {self.embedding_regularisation}.")
        for name in ("adversarial_erase_scale", "adversarial_preserve_scale", "adversarial_lam"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}.")

    def regularisation_for(self, concept: Concept) -> float:
        """``lambda_reg`` for one concept: the configured value, else its kind's default."""
        if self.embedding_regularisation is not None:
            return float(self.embedding_regularisation)
        return REGULARISATION_BY_KIND[concept.kind]

    def epochs_for(self, request: EraseRequest) -> int:
        """Epochs for a request: the configured value, else the largest default of its concepts' kinds."""
        if self.epochs is not None:
            return self.epochs
        return max(EPOCHS_BY_KIND[concept.kind] for concept in request.concepts)


def _relative_residual(edited: list[Tensor], original: list[Tensor], adversarial: Tensor, clean: Tensor) -> float:
    """``||W' c' - W c|| / ||W c||`` over every map."""
    error = sum(float((adversarial @ a.T - clean @ b.T).pow(2).sum()) for a, b in zip(edited, original, strict=True))
    scale = sum(float((clean @ b.T).pow(2).sum()) for b in original)
    return math.sqrt(error / max(scale, 1e-24))


@register("rece")
class RECE(UCE):
    """RECE: a UCE edit, then epochs of closed-form adversarial embeddings erased in turn."""

    config_class = RECEConfig
    config: RECEConfig

    def _erase(
        self,
        pipe: DiffusionPipeline,
        request: EraseRequest,
        parameters: dict[str, torch.nn.Parameter],
        *,
        images: Any = None,
        progress: bool = True,
        originals: dict[str, Tensor] | None = None,
    ) -> dict[str, Any]:
        """UCE (step 1), then per epoch steps 2 and 3 of the module docstring on ``parameters``."""
        stats: dict[str, Any] = {"uce": super()._erase(pipe, request, parameters, progress=progress)}
        config = self.config
        epochs = config.epochs_for(request)
        device = next(iter(parameters.values())).device
        original = [originals[key].to(device, torch.float64) for key in parameters]
        if config.adversarial_source == "word":  # the official c: the bare concept word, to its anchor word
            erase_pairs = [
                (word, concept.anchor if isinstance(concept.anchor, str) else "", config.regularisation_for(concept))
                for concept in request.concepts
                for word in concept.concept_words
            ]
        else:
            erase_pairs = [
                (prompt, anchor, config.regularisation_for(concept))
                for concept in request.concepts
                for prompt, anchor in zip(concept.erase, concept.erase_anchors, strict=True)
            ]
        preserve = list(dict.fromkeys([*request.preserve_prompts, ""]))
        prompts = list(dict.fromkeys([*(p for p, _, _ in erase_pairs), *(a for _, a, _ in erase_pairs), *preserve]))
        embeddings = {key: value.to(device) for key, value in encode_full(pipe, prompts).items()}
        c_preserve = torch.cat([embeddings[prompt] for prompt in preserve])

        epoch_stats = []
        for _ in range(epochs):
            with torch.no_grad():
                current = [parameter.detach().to(torch.float64) for parameter in parameters.values()]
                adversarial, clean, anchors = [], [], []
                for regularisation in dict.fromkeys(r for _, _, r in erase_pairs):  # one solve per lambda_reg
                    group = [(p, a) for p, a, r in erase_pairs if r == regularisation]
                    c_group = torch.cat([embeddings[p] for p, _ in group])
                    adversarial.append(adversarial_embeddings(current, original, c_group, regularisation))
                    clean.append(c_group)
                    anchors += [embeddings[a] for _, a in group]
                c_adversarial = torch.cat(adversarial).to(device)
                c_clean, c_anchor = torch.cat(clean), torch.cat(anchors)
                before = _relative_residual(current, original, c_adversarial, c_clean)
                solver = RidgeSolver(  # the preserve rows keep W' c_p: kept rows
                    c_adversarial, config.adversarial_erase_scale, config.adversarial_lam,
                    kept=c_preserve, kept_weights=config.adversarial_preserve_scale,
                )  # fmt: skip
                for parameter, w_current in zip(parameters.values(), current, strict=True):
                    targets = c_anchor @ w_current.T  # W' c_anchor
                    parameter.copy_(solver.solve(w_current, targets).to(parameter.dtype))
                after = [parameter.detach().to(torch.float64) for parameter in parameters.values()]
                epoch_stats.append(
                    {
                        "adversarial_residual_before": before,
                        "adversarial_residual_after": _relative_residual(after, original, c_adversarial, c_clean),
                        "adversarial_rows": len(c_adversarial),
                    }
                )
            logger.info(
                "RECE epoch %d: adversarial residual %.4f -> %.4f",
                len(epoch_stats),
                epoch_stats[-1]["adversarial_residual_before"],
                epoch_stats[-1]["adversarial_residual_after"],
            )
        stats |= {"epochs": epochs, "epoch_stats": epoch_stats, "preserve_rows_per_epoch": len(c_preserve)}
        return stats
