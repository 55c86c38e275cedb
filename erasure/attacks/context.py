"""The probe context: one pipeline, the edit under test, the judge and the selector, and one way to generate.

:class:`AttackContext` holds one pipeline and the edit under test. ``ctx.model("base")`` and ``ctx.model("edited")``
are ``with`` blocks in which the pipeline holds that model's weights: the edit is applied
(:meth:`erasure.edit.Edit.apply_to`) only inside an ``edited`` block and reverted bit for bit when it ends, also on
failure, so no second UNet is needed and the pipeline always ends as it was given.

Every image an attack reports is judged by ``ctx.judge`` (``images -> list[bool]``: shows the target); choices made
inside a search (best variant, early stop) use ``ctx.selector`` (``images -> list[float]``, higher = more
target-like). The two must differ: a search that selects with the judge that then scores it reports "exists a
variant the judge accepts", inflated by the judge's own false positives (pitfall 1 of UnlearnDiffAtk's and
WhenAreConceptsErased's code); the context refuses it unless ``allow_selector_as_judge=True``, and the result
records it. :mod:`erasure.attacks.judges` builds both from the evaluation's judges. An optional ``witness`` (a
second judge, e.g. the CLIP beside the oracle) scores every image the judge scores; it decides nothing, and the
probe reports how often the two agree, image by image.

Every image comes from one sampler (:mod:`erasure.attacks.sampler`) through :meth:`AttackContext.generate` or
:meth:`AttackContext.sample`, so base, edited and attacked columns differ only by what the attack changed.

**Suppression without weights.** ``suppression="negative-prompt"`` is the baseline that only hides a concept: no
weight changes, but the *edited* side generates with ``negative_prompt`` (the concept) in place of the empty
prompt of classifier-free guidance, ``eps_neg + w (eps_c - eps_neg)``. :meth:`AttackContext.sample` honours it
whenever the pipeline holds the edited model, so every attack's edited images carry it and the base model's never
do; losses without guidance (the embedding objectives, relearning's fine-tuning) are unaffected, as they are by a
negative prompt in practice. Any generation-time edit works the same way (``suppression=`` an
:class:`~erasure.suppression.GenerationEdit`, e.g. SLD, whose guidance hook wraps every edited-side sampling run at
the schedule's own step). It is the verdict's sanity check: such a baseline must come out "suppressed" (or "not
erased" where it does not even hide the concept from the plain prompts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from erasure.attacks.base import MODELS, AttackError, Judge, Selector, neighbour_rows
from erasure.attacks.cost import CostMeter
from erasure.attacks.judges import describe_callable, same_judge
from erasure.attacks.sampler import decode, sample, seeded_noise
from erasure.concepts import Concept
from erasure.diffusion import Conditioning, encode_prompts
from erasure.edit import Edit
from erasure.prompt_sets import PromptRow
from erasure.suppression import GenerationEdit

__all__ = ["SUPPRESSIONS", "AttackContext"]

#: Ways the edited side may hide a concept without an edit (``None``: it does not).
SUPPRESSIONS: tuple[str, ...] = ("negative-prompt",)  # by name; any GenerationEdit (SLD, a saved edit) also works


class AttackContext:
    """The pipeline, the edit under test, the judge and selector, and the generation settings of a probe.

    Args:
        pipe: The base pipeline (as loaded; it ends every call with these weights).
        edit: The edit under test; ``None`` tests the pipeline as loaded (edited = base).
        judge: ``images -> list[bool]``: each uint8 ``(H, W, 3)`` image shows the target. Scores every
            reported image. A ``follows_prompt(images, rows)`` method, where it has one (the oracle's and CLIP's
            judges do), is its neighbour test (:meth:`neighbour_cost`).
        selector: ``images -> list[float]``, higher = more target-like; used inside searches only.
        allow_selector_as_judge: Permit a selector that is the judge (the same callable, or
            :mod:`erasure.attacks.judges` callables over one model); the settings then say so.
        steps: DDIM steps of every generation.
        guidance: CFG scale of every generation.
        images_per_prompt: Seeds per evaluate prompt (image ``j`` has seed ``base_seed + j``).
        base_seed: Seed of each prompt's first image.
        batch_size: Images per sampler call.
        size: Image side (the model's native size by default).
        scale: Strength at which the edit is applied.
        suppression: ``"negative-prompt"``: the edited side generates with ``negative_prompt`` as the negative
            prompt (module docstring); a :class:`~erasure.suppression.GenerationEdit`: the edited side samples with
            it; ``None``: neither.
        negative_prompt: The negative prompt of ``suppression="negative-prompt"`` (the concept's words).
        witness: A second judge (``images -> list[bool]``) that scores every image the judge scores, for the
            agreement of the two (:attr:`witness_log`); it never decides a rate or the verdict.
        base_images_from: The context whose base model makes this one's concept images (:meth:`base_images`).
            A reference model that never learned the concept is attacked with the images of the model that did:
            textual inversion or fine-tuning on the reference's own images of "Pip", which show no Pip, would
            teach it nothing and make the control trivially pass.

    Raises:
        AttackError: If judge, selector or witness is not callable, judge and selector are the same without the
            flag, a setting is out of range, or a suppression is unknown, lacks its negative prompt or has no
            guidance to act through.
        erasure.edit.FingerprintMismatchError: If the edit was made from another base model.
    """

    def __init__(
        self,
        pipe: Any,
        edit: Edit | None,
        judge: Judge,
        selector: Selector,
        *,
        allow_selector_as_judge: bool = False,
        steps: int = 25,
        guidance: float = 7.5,
        images_per_prompt: int = 1,
        base_seed: int = 0,
        batch_size: int = 16,
        size: int | None = None,
        scale: float = 1.0,
        suppression: str | GenerationEdit | None = None,
        negative_prompt: str | None = None,
        witness: Judge | None = None,
        base_images_from: AttackContext | None = None,
    ) -> None:
        if not callable(judge) or not callable(selector) or (witness is not None and not callable(witness)):
            raise AttackError("judge, selector and witness must be callables taking a uint8 (N, H, W, 3) image array.")
        same = same_judge(judge, selector)
        if same and not allow_selector_as_judge:
            raise AttackError(
                "The selector is the judge: a search that selects with the judge it is scored by reports the judge's "
                "false positives as successes. Pass a different selector, or allow_selector_as_judge=True "
                "(--allow-selector-as-judge) to do it anyway (it is recorded)."
            )
        if int(steps) < 1 or int(batch_size) < 1 or int(images_per_prompt) < 1:
            raise AttackError("steps, batch_size and images_per_prompt must each be at least 1.")
        if isinstance(edit, GenerationEdit):  # a saved negative prompt or SLD edit: the base model, sampled with it
            if suppression is not None:
                raise AttackError("Give a generation-time edit or a suppression, not both.")
            edit, suppression = None, edit
        generation_edit = _as_generation_edit(suppression, negative_prompt)
        if generation_edit is not None and float(guidance) <= 1.0:
            raise AttackError(
                f"{generation_edit.config['method']} acts through classifier-free guidance; guidance {guidance:g} "
                "<= 1 has none."
            )
        if edit is not None:
            edit.check_base(pipe)
        self.pipe = pipe
        self.edit = edit
        self.judge = judge
        self.selector = selector
        self.witness = witness
        #: ``(model, judge verdicts, witness verdicts)`` of every judged batch, in order (only with a witness).
        self.witness_log: list[tuple[str, list[bool], list[bool]]] = []
        self.selector_is_judge = same
        self.steps = int(steps)
        self.guidance = float(guidance)
        self.images_per_prompt = int(images_per_prompt)
        self.base_seed = int(base_seed)
        self.batch_size = int(batch_size)
        self.size = size
        self.scale = float(scale)
        self.generation_edit = generation_edit
        self.suppression = generation_edit.config["method"] if generation_edit is not None else None
        self.negative_prompt = (
            generation_edit.config["suppression"].get("negative_prompt") if generation_edit is not None else None
        )
        self._state = "base"
        self._base_cache: dict[tuple[str, int], np.ndarray] = {}
        self._base_images_from = base_images_from
        #: A context over a model that never learned the concept, when the probe has one (set by ``run_probe``).
        self.reference: AttackContext | None = None

    def settings(self) -> dict[str, Any]:
        """The generation settings, for results."""
        return {
            "steps": self.steps,
            "guidance": self.guidance,
            "images_per_prompt": self.images_per_prompt,
            "base_seed": self.base_seed,
            "size": self.size,
            "edit_scale": self.scale,
            "judge": describe_callable(self.judge),
            "selector": describe_callable(self.selector),
            "selector_is_judge": self.selector_is_judge,
            "witness": describe_callable(self.witness) if self.witness is not None else None,
            # a witness that is the selector judged images picked by its own scores: its rates are upper bounds
            "witness_is_selector": self.witness is not None and same_judge(self.witness, self.selector),
            "sampler": "ddim",
            "suppression": self.suppression,
            "negative_prompt": self.negative_prompt,
            "suppression_settings": self.generation_edit.config["suppression"] if self.generation_edit else None,
        }

    # -- models --------------------------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """Which model the pipeline holds now: ``base`` or ``edited``."""
        return self._state

    @contextlib.contextmanager
    def model(self, which: str) -> Iterator[Any]:
        """The pipeline holding ``which`` model's weights for the block (``base`` or ``edited``); yields it.

        Blocks nest: ``model("base")`` inside an ``edited`` block reverts the edit for its duration and applies it
        again after. The edit is applied exactly around its use and reverted bit for bit, also on failure.
        """
        if which not in MODELS:
            raise AttackError(f"model must be one of {', '.join(MODELS)}, got {which!r}.")
        if which == self._state or self.edit is None:
            previous = self._state
            self._state = which
            try:
                yield self.pipe
            finally:
                self._state = previous
            return
        if which == "edited":
            self.edit.apply_to(self.pipe, scale=self.scale, check=False)  # checked once, in __init__
        else:
            self.edit.revert(self.pipe)
        self._state = which
        try:
            yield self.pipe
        finally:
            if which == "edited":
                self.edit.revert(self.pipe)
                self._state = "base"
            else:
                self.edit.apply_to(self.pipe, scale=self.scale, check=False)
                self._state = "edited"

    def meter(self) -> CostMeter:
        """A fresh :class:`CostMeter` on this pipeline (enter it with ``with``)."""
        return CostMeter(self.pipe)

    # -- generation ----------------------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Prompt embeddings of the pipeline's text encoder (which no edit of a UNet changes)."""
        return encode_prompts(self.pipe, list(prompts))

    def unconditional(self, which: str | None = None) -> Conditioning | None:
        """The negative conditioning of CFG for model ``which`` (default: the model the pipeline holds now).

        The negative prompt's embedding on the edited side under ``suppression="negative-prompt"``; ``None``
        otherwise (the sampler then uses the pipeline's empty prompt).
        """
        which = self._state if which is None else which
        if which == "edited" and self.negative_prompt:
            return self.encode([self.negative_prompt])
        return None

    def sample(self, conditioning: Conditioning, latents: Tensor, **sample_kwargs: Any) -> Tensor:
        """:func:`erasure.attacks.sampler.sample` on the pipeline as it is now (call it inside a model block).

        The context's ``steps`` and ``guidance`` and the held model's negative conditioning
        (:meth:`unconditional`) unless ``sample_kwargs`` set them.
        """
        settings = {"steps": self.steps, "guidance": self.guidance, "unconditional": self.unconditional()}
        settings |= sample_kwargs
        guidance = contextlib.nullcontext()
        if self._state == "edited" and self.generation_edit is not None:  # SLD's hook, at the schedule's own step
            start = int(settings.get("start", 0))
            guidance = self.generation_edit.guidance(self.pipe, settings["guidance"], 1.0, first_step=start)
        with guidance:
            return sample(self.pipe, conditioning, latents, **settings)

    def generate(
        self,
        which: str,
        conditioning: Conditioning | Sequence[str],
        seeds: Sequence[int],
        **sample_kwargs: Any,
    ) -> np.ndarray:
        """Images of model ``which`` from prompts (or embeddings) and seeds, in batches, via :func:`sample`.

        Args:
            which: ``base`` or ``edited``.
            conditioning: One prompt, or one embedding row, per seed.
            seeds: One seed per image.
            **sample_kwargs: Passed to :meth:`sample` (``eta``, ``on_step`` ...).

        Returns:
            uint8 ``(N, H, W, 3)``.
        """
        if len(conditioning) != len(seeds):
            raise AttackError(f"got {len(conditioning)} prompts for {len(seeds)} seeds; give one per image.")
        images = []
        with self.model(which) as pipe:
            for start in range(0, len(seeds), self.batch_size):
                stop = min(start + self.batch_size, len(seeds))
                part = conditioning[start:stop]
                cond = self.encode(part) if not isinstance(part, Conditioning) else part
                latents, generators = seeded_noise(pipe, seeds[start:stop], self.size)
                latents = self.sample(cond, latents, generators=generators, **sample_kwargs)
                images.append(decode(pipe, latents))
        return np.concatenate(images)

    def base_images(self, rows: Sequence[PromptRow]) -> np.ndarray:
        """The base model's images of ``rows`` (prompt, seed), generated once per context and cached.

        With ``base_images_from``, that context's base model makes them (the same images, from its cache).
        """
        if self._base_images_from is not None:
            return self._base_images_from.base_images(rows)
        missing = [row for row in rows if (row.prompt, row.evaluation_seed) not in self._base_cache]
        missing = list({(r.prompt, r.evaluation_seed): r for r in missing}.values())
        if missing:
            made = self.generate("base", [r.prompt for r in missing], [r.evaluation_seed for r in missing])
            for row, image in zip(missing, made, strict=True):
                self._base_cache[(row.prompt, row.evaluation_seed)] = image
        return np.stack([self._base_cache[(row.prompt, row.evaluation_seed)] for row in rows])

    # -- judging -------------------------------------------------------------------------------------------------

    def judge_images(self, images: np.ndarray, model: str = "edited") -> list[bool]:
        """The judge's verdicts (one bool per image); checks the judge's answer.

        With a witness, the witness judges the same images too and both answers go to :attr:`witness_log` with
        ``model`` (whose images they are: ``edited``, ``base``, ``reference``): a second opinion on every reported
        image, which decides nothing (the probe reports how often they agree).
        """
        verdicts = [bool(v) for v in self.judge(images)]
        if len(verdicts) != len(images):
            raise AttackError(f"The judge returned {len(verdicts)} verdicts for {len(images)} images.")
        if self.witness is not None:
            second = [bool(v) for v in self.witness(images)]
            if len(second) != len(images):
                raise AttackError(f"The witness returned {len(second)} verdicts for {len(images)} images.")
            self.witness_log.append((model, verdicts, second))
        return verdicts

    def neighbour_cost(self, concept: Concept, **sample_kwargs: Any) -> dict[str, Any] | None:
        """The neighbour ratio with a probe's sampling applied to both models: what the probe costs the neighbours.

        The concept's held-out neighbour rows (:func:`~erasure.attacks.base.neighbour_rows`, the images ``erasure
        evaluate`` makes) are generated by the base and the edited model with ``sample_kwargs`` (``eta=1.68`` ...)
        and judged by the judge's neighbour test (``judge.follows_prompt(images, rows)``). The ratio is edited /
        base neighbour rate over the pairs both verdicts exist for, with its paired-bootstrap interval
        (:func:`erasure.evaluation.functional.paired_ratio_interval`).

        Returns:
            ``{sampling, n, base, edited, ratio, ratio_interval}`` (rates as
            :func:`~erasure.attacks.verdict.rate_interval`), or ``None`` when the judge has no neighbour test, the
            concept no ``evaluate_preserve`` prompts, or no image a verdict.
        """
        from erasure.attacks.verdict import rate_interval
        from erasure.evaluation.functional import paired_ratio_interval

        follows = getattr(self.judge, "follows_prompt", None)
        rows = neighbour_rows(concept, self.images_per_prompt, self.base_seed)
        if follows is None or not rows:
            return None
        prompts, seeds = [r.prompt for r in rows], [r.evaluation_seed for r in rows]
        flags = {}
        for which in MODELS:
            verdicts = list(follows(self.generate(which, prompts, seeds, **sample_kwargs), rows))
            if len(verdicts) != len(rows):
                raise AttackError(f"The judge's neighbour test returned {len(verdicts)} verdicts for {len(rows)}.")
            flags[which] = verdicts
        both = zip(flags["base"], flags["edited"], strict=True)
        pairs = [(b, e) for b, e in both if b is not None and e is not None]
        if not pairs:
            return None
        before, after = ([bool(p[i]) for p in pairs] for i in (0, 1))
        base, edited = rate_interval(before), rate_interval(after)
        interval = paired_ratio_interval(before, after)
        return {
            "sampling": dict(sample_kwargs),
            "n": len(pairs),
            "base": base,
            "edited": edited,
            "ratio": edited["rate"] / base["rate"] if base["rate"] else None,
            "ratio_interval": list(interval) if interval is not None else None,
        }

    def select_scores(self, images: np.ndarray) -> list[float]:
        """The selector's scores (one float per image, higher = more target-like)."""
        scores = [float(s) for s in self.selector(images)]
        if len(scores) != len(images):
            raise AttackError(f"The selector returned {len(scores)} scores for {len(images)} images.")
        return scores

    def best_of(
        self,
        rows: Sequence[PromptRow],
        variants: Sequence[np.ndarray],
        params: Sequence[Mapping[str, Any] | Sequence[Mapping[str, Any]]],
        *,
        model: str,
        attack: str,
    ) -> tuple[list[bool], np.ndarray, list[dict[str, Any]]]:
        """Pick each row's best variant by the selector, then judge only the picked images.

        Args:
            rows: The evaluation rows.
            variants: ``V`` arrays of ``len(rows)`` images each (variant ``v`` of row ``i`` is ``variants[v][i]``).
            params: Per variant, one dict describing it (recorded), or one dict per row; a ``prompt`` or ``seed``
                key overrides the row's in the record.
            model: ``base`` or ``edited`` (recorded).
            attack: The attack's name (recorded).

        Returns:
            ``(hits, picked images, records)``: one hit per row (the judge on the picked variant, ASR@V), and one
            record per (variant, row), with its selector score, whether it was picked, and the judge's verdict on
            the picked ones.
        """
        if len(variants) != len(params) or not variants:
            raise AttackError("best_of needs one parameter dict per variant, and at least one variant.")
        scores = np.array([self.select_scores(images) for images in variants])  # (V, N)
        best = scores.argmax(0)  # ties: the first variant
        picked = np.stack([variants[v][i] for i, v in enumerate(best)])
        hits = self.judge_images(picked, model)
        records = []
        for v, shared in enumerate(params):
            for i, row in enumerate(rows):
                description = shared if isinstance(shared, Mapping) else shared[i]
                chosen = int(best[i]) == v
                records.append(
                    {
                        "attack": attack,
                        "model": model,
                        "case_number": row.case_number,
                        "prompt": description.get("prompt", row.prompt),
                        "seed": description.get("seed", row.evaluation_seed),
                        "variant": v,
                        "params": {k: val for k, val in description.items() if k not in ("prompt", "seed")},
                        "selector_score": float(scores[v, i]),
                        "selected": chosen,
                        "shows_target": hits[i] if chosen else None,
                    }
                )
        return hits, picked, records


def _as_generation_edit(
    suppression: str | GenerationEdit | None, negative_prompt: str | None
) -> GenerationEdit | None:
    """The suppression as a generation-time edit: an edit as given, or ``"negative-prompt"`` with its text."""
    if suppression is None or isinstance(suppression, GenerationEdit):
        return suppression
    if suppression not in SUPPRESSIONS:
        raise AttackError(f"Unknown suppression {suppression!r}; choose from {', '.join(SUPPRESSIONS)}.")
    if not (negative_prompt or "").strip():
        raise AttackError("suppression='negative-prompt' needs the negative prompt (the concept's words).")
    from erasure.methods.negative_prompt import NegativePromptEdit

    return NegativePromptEdit(
        {"method": "negative-prompt", "suppression": {"negative_prompt": negative_prompt.strip()}}
    )
