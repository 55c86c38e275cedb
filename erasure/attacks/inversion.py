"""Concept inversion: textual inversion of a new token against the edited model, on base-model images.

Pham, Marshall, Cohen, Mittal, Hegde, "Circumventing Concept Erasure Methods for Text-to-Image Generative Models"
(ICLR 2024, arXiv 2308.01508): learn one new word embedding ``v_*`` with the erased weights frozen,

    v_* = argmin_v  E_{x ~ D, y ~ T, t, eps} || eps - eps_theta*(x_t, t, tau(y(v))) ||^2

(textual inversion, Gal et al. ICLR 2023, Eq. 2, on the edited model; :class:`~erasure.attacks.embedding.
DenoiseObjective`, ``token`` parametrisation). ``D``: base-model images of the concept's ``erase`` prompts at seeds
``train_seed + j`` (never the held-out rows' images); ``y``: those prompts with the concept words replaced by the
placeholder. Only the new row is trained (the override supplies it; every other tensor is frozen). Evaluation: the
held-out prompts with the concept words replaced by the placeholder (or the placeholder appended), on the edited
model, after each of ``checkpoints`` steps and after the last: the curve of target rate against steps, the
speed the verdict compares with the reference model's (a concept still in the weights comes back in fewer steps
than one taught from nothing). The vector is exported as ``{placeholder: [1, d]}`` safetensors, the file
``pipe.load_textual_inversion(path, token=...)`` reads (:func:`~erasure.attacks.embedding.save_learned_embeds`).

Textual inversion can teach a model a concept it never knew (that is what it was invented for), so recovery here
proves "still in the weights" only against a reference model that never learned the concept (the suite's
``reference``). ``paper``: 5000 AdamW steps, batch 4 x 4 accumulation, lr 5e-3 x scale_lr = 0.08, weight decay
1e-2, 25 images (``NYU-DICE-Lab/circumventing-concept-erasure`` ``esd/train.sh``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from erasure.attacks import register
from erasure.attacks.base import (
    Attack,
    AttackConfig,
    AttackError,
    AttackResult,
    adversarial_row,
    check_checkpoints,
    mentions,
    replace_words,
)
from erasure.attacks.context import AttackContext
from erasure.attacks.optimise import DenoiseObjective, frozen, make_parametrisation, optimise
from erasure.attacks.override import added_token, placeholder_layout, token_embedding, vocabulary_ids
from erasure.concepts import Concept
from erasure.prompt_sets import PromptRow
from erasure.sampling import images_to_latents

__all__ = ["ConceptInversion", "InversionConfig", "KIND_WORDS"]

#: Initialiser word per concept kind when the config names none.
KIND_WORDS: dict[str, str] = {
    "character": "character",
    "style": "art",
    "object": "object",
    "attribute": "color",
    "unsafe": "person",
}


@dataclass
class InversionConfig(AttackConfig):
    """Concept-inversion settings."""

    token: str = field(default="<concept>", metadata={"help": "the placeholder token added to the tokenizer"})
    init_word: str | None = field(default=None, metadata={"help": "initialiser word (default: by concept kind)"})
    images: int = field(default=32, metadata={"help": "base-model training images"})
    steps: int = field(default=300, metadata={"help": "AdamW steps"})
    lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=16, metadata={"help": "(image, t, eps) samples per step"})
    train_seed: int = field(default=100_000, metadata={"help": "seed of the first training image"})
    checkpoints: tuple[int, ...] = field(
        default=(50, 100),
        metadata={"help": "earlier steps also judged, those below 'steps' (the curve; its last point is 'steps')"},
    )

    PRESETS = {
        "toy": {"images": 32, "steps": 300, "lr": 5e-3, "batch_size": 16, "checkpoints": (50, 100)},
        "paper": {"images": 25, "steps": 5000, "lr": 0.08, "batch_size": 16, "checkpoints": (500, 2000)},
    }
    BUDGETS = ("images", "steps", "batch_size")

    def validate(self) -> None:  # noqa: D102
        check_checkpoints("InversionConfig", self.checkpoints)

    @property
    def curve_steps(self) -> tuple[int, ...]:
        """The steps judged: the checkpoints below ``steps``, then ``steps``."""
        return tuple(int(p) for p in self.checkpoints if p < self.steps) + (int(self.steps),)


def _init_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise AttackError(f"The initialiser word {word!r} encodes to no token.")
    return int(ids[0])


def with_placeholder(prompt: str, words, token: str) -> str:
    """``prompt`` with the concept words replaced by ``token``, or ``token`` appended when it names none."""
    return replace_words(prompt, words, token) if mentions(prompt, words) else f"{prompt}, {token}"


@register("inversion")
class ConceptInversion(Attack):
    """Textual inversion of a new token against the edited model."""

    surface = "embedding"
    config_class = InversionConfig

    def _run(self, ctx: AttackContext, concept: Concept, rows: list[PromptRow]) -> AttackResult:
        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        pipe, words = ctx.pipe, concept.concept_words
        train = [
            PromptRow(j, concept.erase[j % len(concept.erase)], config.train_seed + j) for j in range(config.images)
        ]
        images = ctx.base_images(train)
        latents = images_to_latents(pipe, images, ctx.size, generator, sample=True)
        init_id = _init_id(pipe.tokenizer, config.init_word or KIND_WORDS[concept.kind])
        table = token_embedding(pipe.text_encoder).weight.detach()
        with added_token(pipe, config.token, table[init_id]) as token_id:
            captions = list(dict.fromkeys(with_placeholder(r.prompt, words, config.token) for r in train))
            layouts = [placeholder_layout(pipe.tokenizer, text, token_id) for text in captions]
            caption_of = torch.tensor([captions.index(with_placeholder(r.prompt, words, config.token)) for r in train])
            vocab = vocabulary_ids(pipe.tokenizer)
            param = make_parametrisation(
                "token", token_embedding(pipe.text_encoder).weight.detach(), vocab, 1, [init_id]
            )
            objective = DenoiseObjective(latents, caption_of, config.batch_size)
            earlier = config.curve_steps[:-1]
            found = optimise(
                ctx, layouts, param, objective, steps=config.steps, lr=config.lr, optimizer="adamw",
                weight_decay=config.weight_decay, generator=generator, snapshot_steps=earlier,
            )  # fmt: skip
            vector = found.rows[0]
            prompts = [with_placeholder(r.prompt, words, config.token) for r in rows]
            seeds = [r.evaluation_seed for r in rows]
            curve, records = [], []
            points = [(steps, found.snapshots[steps][0]) for steps in earlier] + [(config.steps, vector)]
            for variant, (steps, row) in enumerate(points):
                with torch.no_grad(), frozen(pipe):
                    token_embedding(pipe.text_encoder).weight[token_id] = row.to(table)
                attacked = ctx.generate("edited", prompts, seeds)
                hits = ctx.judge_images(attacked)
                last = steps == config.steps
                scores = ctx.select_scores(attacked) if last else [None] * len(rows)
                curve.append({"steps": steps, "target_rate": sum(hits) / len(hits), "hits": hits})
                records += [
                    {
                        "attack": self.name, "model": "edited", "case_number": r.case_number, "prompt": p,
                        "seed": r.evaluation_seed, "variant": variant,
                        "params": {"token": config.token, "steps": steps}, "selector_score": s, "selected": last,
                        "shows_target": h,
                    }
                    for r, p, s, h in zip(rows, prompts, scores, hits, strict=True)
                ]  # fmt: skip
        # the placeholder means something only with the learned vector: the row names the file the probe writes
        prompt_rows = [
            adversarial_row(r, p, self.name, embedding=f"embeddings/{self.name}.safetensors", token=config.token)
            for r, p in zip(rows, prompts, strict=True)
        ]
        return self.result(
            rows, hits, records=records, prompts=prompt_rows, images=attacked, embeddings={config.token: vector},
            curve=curve, notes={"losses": found.losses, "init_word": config.init_word or KIND_WORDS[concept.kind]},
        )  # fmt: skip
