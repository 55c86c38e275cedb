"""The accumulating evaluator: embeds images with an injected CLIP, stores them, computes every metric at once.

As in torchmetrics, the class only accumulates (``update`` / ``compute`` / ``reset``); the maths is the pure
functions of :mod:`erasure.evaluation.functional`, so any split into batches gives the numbers of one call.

How zero-shot classes are formed
--------------------------------
A row's true class is its ``concept``; its candidates are its ``classes``, or, when empty, every distinct concept
accumulated. Each class text is embedded with every template (``{}`` replaced by the class), the normalised
embeddings averaged and renormalised. Rows built from a concept file
(:func:`erasure.prompt_sets.rows_from_request`) get the concept's name, its ``preserve`` prompts and its anchor
(``"a photo"`` for the unconditional anchor and for paired anchors) as classes: the target against its
neighbours. Rows without a concept get no zero-shot verdict.

Metric names of :meth:`Evaluator.compute`: ``n_images``, ``clip_score`` and ``clip_score_<role>``,
``zero_shot_top1``, ``zero_shot_target_prob``, ``efficacy``, ``generality``, ``specificity`` (each with ``_n``, its
image count, and ``_ci95_low`` / ``_ci95_high``, a percentile-bootstrap interval), ``harmonic_mean``,
``target_vs_anchor``, ``paired_preservation`` and ``paired_preservation_<role>``, ``cmmd`` and ``cmmd_<role>``,
with the roles of :data:`erasure.prompt_sets.ROLES`; ``None`` where a metric has no images to stand on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from erasure.evaluation.clip import DEFAULT_TEMPLATES
from erasure.evaluation.functional import (
    bootstrap_interval,
    clip_score,
    cmmd,
    efficacy,
    generality,
    harmonic_mean,
    paired_preservation,
    specificity,
    target_vs_anchor,
    zero_shot,
)
from erasure.files import to_pil
from erasure.prompt_sets import ROLES, role_of

__all__ = ["Evaluator"]


def _is_features(value: Any) -> bool:
    return isinstance(value, Tensor) and value.ndim == 2 and value.is_floating_point()


@dataclass
class _Rows:
    prompts: list[str] = field(default_factory=list)
    concepts: list[str] = field(default_factory=list)
    classes: list[tuple[str, ...]] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    anchors: list[str] = field(default_factory=list)


class Evaluator:
    """Accumulates image embeddings and their prompts, then computes every metric of the module at once.

    The CLIP model is injected (tests pass a tiny one). ``update`` embeds images (or takes embeddings) and stores
    them; ``compute`` runs the pure metric functions on everything stored, so any split into batches gives the
    same numbers as one call.

    Example:
        >>> evaluator = Evaluator(*load_clip())
        >>> evaluator.update(images, prompts, concepts=concepts, roles=roles, reference=base_features)
        >>> evaluator.compute()["clip_score"]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable,
        tokenizer: Callable,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        logit_scale: float | None = None,
    ) -> None:
        """Create an evaluator.

        Args:
            model: An open_clip model (anything with ``encode_image``, ``encode_text`` and ``logit_scale``).
            preprocess: PIL image -> ``(3, H, W)`` tensor.
            tokenizer: List of texts -> token ids.
            templates: Zero-shot templates, each with one ``{}``.
            device: Where to run CLIP (default: the model's device).
            batch_size: Images / texts per CLIP forward.
            logit_scale: Zero-shot temperature; default ``model.logit_scale.exp()``.
        """
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(f"each template needs exactly one '{{}}' for the class text; got {bad or 'none'}")
        self.model = model.eval()
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.templates = tuple(templates)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batch_size = batch_size
        if logit_scale is None:
            logit_scale = float(model.logit_scale.detach().float().exp()) if hasattr(model, "logit_scale") else 100.0
        self.logit_scale = float(logit_scale)
        self._text_cache: dict[str, Tensor] = {}
        self.reset()

    # -- embedding -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def embed_images(self, images: Any) -> Tensor:
        """L2-normalised ``(N, D)`` float32 CPU embeddings of uint8 ``(N, H, W, 3)`` images or PIL images."""
        images = list(images)
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(to_pil(im)) for im in images[start : start + self.batch_size]])
            features = self.model.encode_image(batch.to(self.device, self._dtype()))
            out.append(F.normalize(features.float(), dim=-1).cpu())
        if not out:
            return torch.zeros(0, self._width())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised ``(N, D)`` float32 CPU text embeddings (cached per text)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            features = self.model.encode_text(self.tokenizer(chunk).to(self.device))
            for text, row in zip(chunk, F.normalize(features.float(), dim=-1).cpu(), strict=True):
                self._text_cache[text] = row
        if not texts:
            return torch.zeros(0, self._width())
        return torch.stack([self._text_cache[t] for t in texts])

    def class_features(self, classes: Sequence[str]) -> Tensor:
        """``(C, D)`` class embeddings: each template's normalised embedding, averaged, renormalised."""
        texts = [template.replace("{}", name) for name in classes for template in self.templates]
        features = self.embed_texts(texts).view(len(classes), len(self.templates), -1)
        return F.normalize(features.mean(1), dim=-1)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _width(self) -> int:
        projection = getattr(self.model, "text_projection", None)
        if isinstance(projection, Tensor):
            return projection.shape[-1]
        return int(getattr(self.model, "embed_dim", 0) or self.embed_texts(["a"]).shape[-1])

    def _features(self, value: Any) -> Tensor:
        return F.normalize(value.detach().float().cpu(), dim=-1) if _is_features(value) else self.embed_images(value)

    # -- accumulation --------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every accumulated image (the text-embedding cache is kept)."""
        self._features_list: list[Tensor] = []
        self._reference_list: list[Tensor | None] = []
        self._rows = _Rows()

    def update(
        self,
        images_or_features: Any,
        prompts: Sequence[str],
        *,
        concepts: Sequence[str] | None = None,
        classes: Sequence[Sequence[str]] | None = None,
        roles: Sequence[str] | None = None,
        anchors: Sequence[str] | None = None,
        reference: Any = None,
    ) -> None:
        """Add a batch of images.

        Args:
            images_or_features: uint8 ``(N, H, W, 3)`` images (array or list, or PIL images), or ``(N, D)`` float
                embeddings from :meth:`embed_images`.
            prompts: Each image's prompt.
            concepts: Each image's true class (``""``: none).
            classes: Each image's candidate classes (empty: every distinct concept seen).
            roles: Each image's role (:data:`erasure.prompt_sets.ROLES`, or a ``type`` value such as
                ``"others"``); default ``"other"``.
            anchors: Each image's anchor class for :func:`target_vs_anchor` (``""``: none).
            reference: The base model's images (or embeddings) of the same prompts and seeds, for the paired
                metrics; ``None`` if there are none.
        """
        features = self._features(images_or_features)
        n = len(features)

        def column(values: Sequence[Any] | None, default: Any, name: str) -> list[Any]:
            if values is None:
                return [default] * n
            if len(values) != n:
                raise ValueError(f"got {n} images but {len(values)} {name}")
            return list(values)

        prompts = column(prompts, "", "prompts")
        roles_ = [role if role in ROLES else role_of(role) for role in column(roles, "other", "roles")]
        if reference is not None:
            reference = self._features(reference)
            if reference.shape != features.shape:
                raise ValueError(
                    f"reference has shape {tuple(reference.shape)} but the images {tuple(features.shape)}"
                )
        self._features_list.append(features)
        self._reference_list.append(reference)
        self._rows.prompts += prompts
        self._rows.concepts += [c or "" for c in column(concepts, "", "concepts")]
        self._rows.classes += [tuple(c) for c in column(classes, (), "class lists")]
        self._rows.roles += roles_
        self._rows.anchors += [a or "" for a in column(anchors, "", "anchors")]

    @property
    def features(self) -> Tensor:
        """All accumulated image embeddings ``(N, D)``."""
        if not self._features_list:
            return torch.zeros(0, 0)
        return torch.cat(self._features_list)

    def _reference(self) -> Tensor | None:
        if not self._reference_list or any(r is None for r in self._reference_list):
            return None
        return torch.cat(self._reference_list)  # type: ignore[arg-type]

    # -- computation ---------------------------------------------------------------------------------------------

    def _per_image(self) -> dict[str, Tensor | list[Any]]:
        """Per-image scores of everything accumulated."""
        features, rows = self.features, self._rows
        n = len(rows.prompts)
        nan = torch.full((n,), float("nan"), dtype=torch.float64)
        scores = clip_score(features, self.embed_texts(rows.prompts), reduction="none") if n else nan
        all_concepts = tuple(dict.fromkeys(c for c in rows.concepts if c))
        predicted: list[str] = [""] * n
        correct, target_prob, versus = nan.clone(), nan.clone(), nan.clone()
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, concept in enumerate(rows.concepts):
            if concept:
                candidates = rows.classes[i] or all_concepts
                if concept not in candidates:
                    candidates = (*candidates, concept)
                groups.setdefault(tuple(candidates), []).append(i)
        for candidates, indices in groups.items():
            index = torch.tensor(indices)
            targets = torch.tensor([candidates.index(rows.concepts[i]) for i in indices])
            result = zero_shot(features[index], self.class_features(candidates), targets, self.logit_scale)
            correct[index] = result.correct.double()
            target_prob[index] = result.target_probability
            for i, k in zip(indices, result.predicted.tolist(), strict=True):
                predicted[i] = candidates[k]
        with_anchor = [i for i in range(n) if rows.concepts[i] and rows.anchors[i] and rows.roles[i] == "erased"]
        if with_anchor:
            index = torch.tensor(with_anchor)
            texts = list(
                dict.fromkeys([rows.concepts[i] for i in with_anchor] + [rows.anchors[i] for i in with_anchor])
            )
            table = dict(zip(texts, self.class_features(texts), strict=True))
            target = torch.stack([table[rows.concepts[i]] for i in with_anchor])
            anchor = torch.stack([table[rows.anchors[i]] for i in with_anchor])
            versus[index] = target_vs_anchor(features[index], target, anchor, reduction="none")
        reference = self._reference()
        paired = paired_preservation(reference, features, reduction="none") if reference is not None and n else nan
        return {
            "clip_score": scores,
            "predicted": predicted,
            "correct": correct,
            "target_prob": target_prob,
            "target_vs_anchor": versus,
            "paired_cosine": paired,
        }

    def compute(self) -> dict[str, float | int | None]:
        """Every metric of the module docstring over all accumulated images (``None`` where undefined)."""
        per = self._per_image()
        roles = np.array(self._rows.roles)
        features, reference = self.features, self._reference()
        n = len(roles)

        def mean(values: Tensor, mask: np.ndarray | None = None) -> float | None:
            selected = values if mask is None else values[torch.from_numpy(mask)]
            selected = selected[~torch.isnan(selected)]
            return None if selected.numel() == 0 else float(selected.mean())

        has_concept = np.array([bool(c) for c in self._rows.concepts], dtype=bool)
        correct = per["correct"]
        assert isinstance(correct, Tensor)

        def flags(role: str) -> Tensor:
            mask = torch.from_numpy((roles == role) & has_concept) if n else torch.zeros(0, dtype=torch.bool)
            return correct[mask] if n else correct

        metrics: dict[str, float | int | None] = {"n_images": n}
        metrics["clip_score"] = mean(per["clip_score"]) if n else None  # type: ignore[arg-type]
        for role in ROLES:
            metrics[f"clip_score_{role}"] = mean(per["clip_score"], roles == role) if n else None  # type: ignore[arg-type]
        metrics["zero_shot_top1"] = mean(correct) if n else None
        metrics["zero_shot_target_prob"] = mean(per["target_prob"]) if n else None  # type: ignore[arg-type]
        metrics["efficacy"] = efficacy(flags("erased"))
        metrics["generality"] = generality(flags("generality"))
        metrics["specificity"] = specificity(flags("preserved"))
        for name, role, good in (
            ("efficacy", "erased", 0),
            ("generality", "generality", 0),
            ("specificity", "preserved", 1),
        ):
            hits = [bool(int(flag) == good) for flag in flags(role).tolist()]  # images counted in the rate's favour
            interval = bootstrap_interval(hits)
            metrics[f"{name}_n"] = len(hits)
            metrics[f"{name}_ci95_low"], metrics[f"{name}_ci95_high"] = interval if interval else (None, None)
        metrics["harmonic_mean"] = harmonic_mean([metrics["efficacy"], metrics["specificity"], metrics["generality"]])
        metrics["target_vs_anchor"] = mean(per["target_vs_anchor"]) if n else None  # type: ignore[arg-type]
        metrics["paired_preservation"] = mean(per["paired_cosine"]) if n else None  # type: ignore[arg-type]
        for role in ROLES:
            value = mean(per["paired_cosine"], roles == role) if n else None  # type: ignore[arg-type]
            metrics[f"paired_preservation_{role}"] = value
        metrics["cmmd"] = cmmd(features, reference) if reference is not None and n else None
        for role in ROLES:
            mask = torch.from_numpy(roles == role) if n else None
            defined = reference is not None and mask is not None and bool(mask.any())
            metrics[f"cmmd_{role}"] = cmmd(features[mask], reference[mask]) if defined else None  # type: ignore[index]
        return metrics

    def per_image(self) -> list[dict[str, Any]]:
        """Per-image scores of everything accumulated, one dict per image.

        Keys: ``clip_score, predicted, correct`` (0/1), ``target_prob, target_vs_anchor`` (0/1, erased images),
        ``paired_cosine``; ``None`` where undefined.
        """
        per = self._per_image()

        def value(key: str, i: int) -> Any:
            item = per[key][i]
            if isinstance(item, Tensor):
                item = float(item)
                if math.isnan(item):
                    return None
                return int(item) if key in ("correct", "target_vs_anchor") else item
            return item or None

        return [{key: value(key, i) for key in per} for i in range(len(self._rows.prompts))]
