"""Ring-A-Bell: the prompt embedding pushed along the concept's direction, and the discrete prompts that reach it.

Tsai, Hsu, Xie, Lin, Chen, Li, Chen, Yu, Huang, "Ring-A-Bell! How Reliable are Concept Removal Methods for
Diffusion Models?" (ICLR 2024, arXiv 2310.10012). The concept vector is the mean difference of the full (``77 x d``)
text-encoder outputs of paired prompts with and without the concept (their Eq. 2)::

    c_hat = (1 / N) sum_i [ tau(p_i^+) - tau(p_i^-) ]

with ``p^+`` the concept's ``erase`` prompts and ``p^-`` their anchors (paired anchors are exactly ``p^-``), or, for
the unconditional anchor, the prompt with the concept words removed. The attacked conditioning of a held-out
prompt ``P`` is ``tau(P) + eta * c_hat`` (Eq. 3's target), fed straight to the UNet as RECE's re-implementation does
(``CharlesGong12/RECE`` ``attack_methods/RingABell.py``) instead of searching tokens that reach it (the paper's
genetic algorithm): an embedding-space attack, an upper bound on what that search can find. It never queries the
edited UNet, so it cannot adapt to the edit, and transfers. Best ``eta`` per row by the selector; ``paper``:
``eta = 3`` (nudity in the paper and RECE).

**Discrete** (``ring_a_bell_discrete``, the paper's own attack, ``InversePrompt.ipynb``): a genetic algorithm
searches ``K`` vocabulary tokens whose text embedding reaches the target (Eq. 3)::

    min_{P~ in V^K} || tau([SOT, P~, EOT, pad...]) - (tau(P) + eta c_hat) ||_F^2

Population of random token strings; each generation keeps the best half, crosses each survivor with a random
partner at a random cut with probability ``crossover`` (two children), mutates each individual with probability
``mutation`` (one position to a random token), and refills the population with mutated survivors. The best string,
decoded, is a prompt a user can type: it is generated from its *text* on the edited model (a text attack) and
saved for replay. ``paper``: K 16, population 200, 3000 generations, mutation 0.25, crossover 0.5, eta 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from erasure.attacks import register
from erasure.attacks.base import Attack, AttackConfig, AttackError, AttackResult, adversarial_row, replace_words
from erasure.attacks.context import AttackContext
from erasure.attacks.override import check_family, encode_ids, vocabulary_ids
from erasure.concepts import Concept
from erasure.diffusion import Conditioning
from erasure.prompt_sets import PromptRow

__all__ = [
    "RingABell",
    "RingABellConfig",
    "RingABellDiscrete",
    "RingABellDiscreteConfig",
    "concept_vector",
    "genetic_search",
]


def concept_vector(ctx: AttackContext, concept: Concept) -> torch.Tensor:
    """``c_hat``: mean ``tau(p+) - tau(p-)`` over the concept's erase prompts (``[77, d]``)."""
    positives = list(concept.erase)
    negatives = [
        anchor if anchor or isinstance(concept.anchor, tuple) else replace_words(p, concept.concept_words, "")
        for p, anchor in zip(positives, concept.erase_anchors, strict=True)
    ]
    with torch.no_grad():
        difference = ctx.encode(positives).prompt_embeds - ctx.encode(negatives).prompt_embeds
    return difference.mean(0)


@dataclass
class RingABellConfig(AttackConfig):
    """Ring-A-Bell (continuous) settings."""

    etas: tuple[float, ...] = field(default=(1.0, 3.0, 5.0), metadata={"help": "strengths eta of the concept vector"})

    PRESETS = {"toy": {"etas": (1.0, 3.0, 5.0)}, "paper": {"etas": (3.0,)}}

    def validate(self) -> None:  # noqa: D102
        if not self.etas:
            raise AttackError("RingABellConfig: etas must list at least one strength.")


@register("ring_a_bell")
class RingABell(Attack):
    """``tau(P) + eta c_hat`` on the edited model; best eta per row by the selector."""

    surface = "embedding"
    config_class = RingABellConfig

    def _run(self, ctx: AttackContext, concept: Concept, rows: list[PromptRow]) -> AttackResult:
        direction = concept_vector(ctx, concept)
        with torch.no_grad():
            plain = ctx.encode([r.prompt for r in rows]).prompt_embeds
        seeds = [r.evaluation_seed for r in rows]
        variants = [
            ctx.generate("edited", Conditioning(plain + float(eta) * direction), seeds) for eta in self.config.etas
        ]
        params = [{"eta": float(eta)} for eta in self.config.etas]
        hits, picked, records = ctx.best_of(rows, variants, params, model="edited", attack=self.name)
        notes = {"concept_vector_norm": float(direction.norm())}
        return self.result(
            rows, hits, records=records, images=picked, embeddings={"concept_vector": direction}, notes=notes
        )


@dataclass
class RingABellDiscreteConfig(AttackConfig):
    """Ring-A-Bell (discrete) settings: the genetic search of the paper's notebook."""

    tokens: int = field(default=8, metadata={"help": "K, tokens of the searched prompt"})
    population: int = field(default=48, metadata={"help": "token strings per generation"})
    generations: int = field(default=60, metadata={"help": "generations of the genetic search"})
    mutation: float = field(default=0.25, metadata={"help": "probability that an individual mutates"})
    crossover: float = field(default=0.5, metadata={"help": "probability that a survivor crosses with a partner"})
    eta: float = field(default=3.0, metadata={"help": "strength of the concept vector in the target"})

    PRESETS = {
        "toy": {"tokens": 8, "population": 48, "generations": 60, "eta": 3.0},
        "paper": {"tokens": 16, "population": 200, "generations": 3000, "eta": 3.0},
    }
    BUDGETS = ("tokens", "population", "generations")

    def validate(self) -> None:  # noqa: D102
        if self.population < 2:
            raise AttackError("RingABellDiscreteConfig: population must be at least 2.")
        if not (0 <= self.mutation <= 1 and 0 <= self.crossover <= 1):
            raise AttackError("RingABellDiscreteConfig: mutation and crossover are probabilities in [0, 1].")


def _ids(tokenizer, strings: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` ids ``[SOT, tokens, EOT, pad...]`` of ``[B, K]`` token strings."""
    length = int(tokenizer.model_max_length)
    count, k = strings.shape
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((count, length), pad, dtype=torch.long)
    ids[:, 0], ids[:, 1 : 1 + k], ids[:, 1 + k] = tokenizer.bos_token_id, strings, tokenizer.eos_token_id
    return ids


def genetic_search(
    fitness, vocabulary: torch.Tensor, config: RingABellDiscreteConfig, generator: torch.Generator
) -> tuple[torch.Tensor, list[float]]:
    """The genetic algorithm: the best ``[K]`` token string under ``fitness`` (higher is better) and its history.

    Args:
        fitness: ``[B, K]`` token strings -> ``[B]`` scores.
        vocabulary: The ids a string may hold.
        config: Population, generations, mutation and crossover probabilities, ``K``.
        generator: Seeds every random choice.
    """
    k, size = config.tokens, config.population

    def random_ids(*shape: int) -> torch.Tensor:
        return vocabulary[torch.randint(len(vocabulary), shape, generator=generator)]

    population = random_ids(size, k)
    best_score, best, history = -float("inf"), population[0], []
    for _ in range(config.generations):
        scores = fitness(population)
        order = torch.argsort(scores, descending=True)
        if float(scores[order[0]]) > best_score:
            best_score, best = float(scores[order[0]]), population[order[0]].clone()
        history.append(best_score)
        survivors = population[order[: max(1, size // 2)]]
        children = []
        for i in range(len(survivors)):
            if float(torch.rand((), generator=generator)) < config.crossover and k > 1:
                partner = survivors[int(torch.randint(len(survivors), (1,), generator=generator))]
                cut = int(torch.randint(1, k, (1,), generator=generator))
                children += [
                    torch.cat([survivors[i][:cut], partner[cut:]]),
                    torch.cat([partner[:cut], survivors[i][cut:]]),
                ]
        pool = torch.cat([survivors, torch.stack(children)]) if children else survivors.clone()
        while len(pool) < size:  # refill with copies of survivors, which the mutation below varies
            pool = torch.cat([pool, survivors[: size - len(pool)]])
        pool = pool[:size].clone()
        mutate = torch.rand(size, generator=generator) < config.mutation
        positions = torch.randint(k, (size,), generator=generator)
        pool[mutate, positions[mutate]] = random_ids(int(mutate.sum()))
        population = pool
    return best, history


@register("ring_a_bell_discrete")
class RingABellDiscrete(Attack):
    """Ring-A-Bell's genetic search for typed prompts whose embedding reaches ``tau(P) + eta c_hat``."""

    surface = "text"
    config_class = RingABellDiscreteConfig

    def _run(self, ctx: AttackContext, concept: Concept, rows: list[PromptRow]) -> AttackResult:
        check_family(ctx.pipe)
        config = self.config
        tokenizer = ctx.pipe.tokenizer
        if config.tokens > int(tokenizer.model_max_length) - 2:
            raise AttackError(f"ring_a_bell_discrete: {config.tokens} tokens do not fit the tokenizer's length.")
        direction = concept_vector(ctx, concept)
        vocabulary = vocabulary_ids(tokenizer)
        generator = torch.Generator().manual_seed(config.seed)
        found, histories = {}, {}
        for prompt in dict.fromkeys(r.prompt for r in rows):  # one search per distinct held-out prompt
            with torch.no_grad():
                target = ctx.encode([prompt]).prompt_embeds[0] + config.eta * direction

                def fitness(strings: torch.Tensor, target=target) -> torch.Tensor:
                    embeds = encode_ids(ctx.pipe, _ids(tokenizer, strings))
                    return -(embeds.float() - target.float()).pow(2).sum(dim=(1, 2)).cpu()

                best, histories[prompt] = genetic_search(fitness, vocabulary, config, generator)
            ids = [int(i) for i in best]
            text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            found[prompt] = " ".join(text.replace("</w>", " ").split())
        attacked = [found[r.prompt] for r in rows]
        images = ctx.generate("edited", attacked, [r.evaluation_seed for r in rows])
        hits = ctx.judge_images(images)
        records = [
            {
                "attack": self.name, "model": "edited", "case_number": r.case_number, "prompt": text,
                "seed": r.evaluation_seed, "variant": 0, "params": {"target_prompt": r.prompt}, "selector_score": None,
                "selected": True, "shows_target": hit,
            }
            for r, text, hit in zip(rows, attacked, hits, strict=True)
        ]  # fmt: skip
        prompts = [adversarial_row(r, text, self.name) for r, text in zip(rows, attacked, strict=True)]
        notes = {"found": found, "fitness_last": {p: h[-1] for p, h in histories.items()}}
        return self.result(rows, hits, records=records, prompts=prompts, images=images, notes=notes)
