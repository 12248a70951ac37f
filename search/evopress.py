"""EvoPress: (1+λ) evolution with level-switch mutation and multi-stage selection
(Sieberling et al., 2024)."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from evocomp.errors import EvocompError, choices
from evocomp.registry import StrictModel
from evocomp.search.base import (
    OPTIMIZERS,
    GeneratorOptimizer,
    Measurement,
    Request,
    TrainAware,
    Training,
)
from evocomp.search.baselines import OneShot, Probing
from evocomp.search.racing import Race, RaceParams, look_budgets
from evocomp.search.surrogate import Screening, SurrogateParams
from evocomp.spaces.base import Genome, SearchSpace


def _seed_names() -> list[str]:
    """The baselines that can seed the start: one-shot (from a measurement) or
    probing (from evaluations of their own)."""
    return [n for n in OPTIMIZERS.names() if issubclass(OPTIMIZERS.get(n), (OneShot, Probing))]


class Stage(StrictModel):
    """One selection step: score the pool on ``tokens`` tokens, keep the best ``keep``."""

    tokens: int = Field(gt=0)
    keep: int = Field(gt=0)


def check_sieve(stages: Sequence[Stage]) -> None:
    """Refuse (ValueError) stages that are no sieve: none, token budgets that do not
    grow, or keep counts that do not shrink to 1."""
    if not stages:
        raise ValueError("stages must list at least one {tokens, keep} step")
    keeps = [s.keep for s in stages]
    if keeps[-1] != 1 or any(a < b for a, b in zip(keeps, keeps[1:], strict=False)):
        raise ValueError(f"stage keep counts must shrink to 1, got {keeps}")
    tokens = [s.tokens for s in stages]
    if tokens != sorted(tokens):
        raise ValueError(f"stage token budgets must grow, got {tokens}")


class EvoPressParams(StrictModel):
    """Options of :class:`EvoPress`."""

    generations: int = Field(50, ge=0, description="generations after the start")
    offspring: int = Field(16, ge=1, description="children of the parent per generation")
    max_switches: int = Field(3, ge=1, description="level switches per child, 1..this")
    switches: Literal["uniform", "fewer"] = Field(
        "uniform",
        description="how many switches a child gets: uniform = each count in "
        "1..max_switches equally often; fewer = the smaller of two such draws, as "
        "EvoPress's code does (with 3: one switch 5/9 of the time, three 1/9), which "
        "gained less per evaluation token on SmolLM2 (two seeds)",
    )
    init_samples: int = Field(
        0, ge=0, description="start from the best of uniform + N random feasible genomes"
    )
    start_from: list[str] = Field(
        default_factory=list,
        description="baselines whose genomes also compete for the start, at their default "
        "options: one-shot (e.g. [shortgpt] for depth, [owl] for sparsity) or probing "
        "([sensitivity]: its probes are scored and recorded first)",
    )
    stages: list[Stage] = Field(
        default_factory=lambda: [Stage(tokens=1024, keep=4), Stage(tokens=4096, keep=1)],
        description="selection steps [{tokens, keep}]: token budgets grow, keep shrinks to 1",
    )

    resample: bool = Field(
        False,
        description="score each generation on a fresh draw of the search sequences (as "
        "EvoPress's code samples a minibatch per selection step) rather than always the "
        "first ones, so the search cannot fit a few fixed sequences; the last parent is "
        "then scored on the first sequences too, so its fitness compares with the start's",
    )
    surrogate: SurrogateParams | None = Field(
        None,
        description="pre-screening: {pool, explore, ridge, warmup}: make `pool` children, "
        "score the `offspring` an additive model of the first stage's scores ranks best; "
        "null: every child is scored (EvoPress as published)",
    )
    train: TrainAware | None = Field(
        None,
        description="training-aware selection: {tokens: [one per stage], lr, optimizer, "
        "params: all | lora, loss: kd | lm}; none: candidates are scored as compressed",
    )
    race: RaceParams | None = Field(
        None,
        description="racing: {confidence, warmup}: every stage after the first scores its "
        "candidates one first-stage budget of tokens at a time and stops scoring one once "
        "it is significantly worse than the last kept; null: each stage scores all its "
        "candidates on all its tokens",
    )

    @field_validator("start_from")
    @classmethod
    def _one_shot(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in _seed_names():
                raise ValueError(
                    f"start_from: {name!r} is not a one-shot baseline; "
                    f"choose {choices(_seed_names())}"
                )
        return names

    @model_validator(mode="after")
    def _stages_sieve(self) -> EvoPressParams:
        check_sieve(self.stages)
        if self.resample and self.surrogate is not None:
            # Its model is fitted to first-stage scores as if all were on one text.
            raise ValueError(
                "resample scores each generation on other sequences, which surrogate's "
                "model of first-stage scores cannot mix; set one of them off"
            )
        tokens = [s.tokens for s in self.stages]
        if self.race is not None and self.train is not None:
            # Every look's budget would need its own training.
            raise ValueError(
                "race scores candidates at budgets between the stages', which train "
                "cannot fine-tune for; set one of them off"
            )
        if self.train is not None:
            if len(self.train.tokens) != len(self.stages):
                raise ValueError(
                    f"train.tokens needs one count per stage ({len(self.stages)}), "
                    f"got {self.train.tokens}"
                )
            # A token budget must name one training, so the trial store's
            # (genome, tokens) key stays unambiguous.
            if len(set(tokens)) != len(tokens):
                raise ValueError(f"with train, stage token budgets must all differ, got {tokens}")
        return self


def _record(
    means: dict[Genome, list[tuple[int, float]]], pool: list[Genome], budget: int,
    scores: list[float],
) -> None:
    """Add each genome's score at ``budget`` to its running means (a genome twice in
    the pool, two equal children, once)."""
    for g, score in zip(pool, scores, strict=True):
        if not means[g] or means[g][-1][0] != budget:
            means[g].append((budget, score))


@OPTIMIZERS.register("evopress")
class EvoPress(GeneratorOptimizer[EvoPressParams]):
    """Each generation mutates the parent into ``offspring`` children (each with
    1..``max_switches`` level switches), then sieves parent + children through
    the stages: cheap, few-token stages discard most children, the last stage
    picks the next parent. The parent competes at every stage, so the search
    never gets worse on the sequences it scores, and its scores are reused from the
    trial store. With ``resample`` each generation scores a fresh draw of the
    search sequences (the parent again too), as the reference code does."""

    name = "evopress"

    Params = EvoPressParams

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def resamples(self) -> bool:
        return self.params.resample

    def token_budgets(self) -> dict[str, int]:
        stages = {f"stages[{k}].tokens": s.tokens for k, s in enumerate(self.params.stages)}
        return stages | self._probe_budgets()

    def _probe_budgets(self) -> dict[str, int]:
        return {
            f"start_from.{b.name}.{option}": tokens
            for b in self._baselines
            if isinstance(b, Probing)
            for option, tokens in b.probe_budgets().items()
        }

    def train_budgets(self) -> dict[str, int]:
        return {} if self.params.train is None else self.params.train.budgets()

    def _train(self, stage: int) -> Training | None:
        return None if self.params.train is None else self.params.train.at(stage)

    @property
    def progress(self) -> tuple[int, int]:
        return self.generation, self.params.generations

    def __init__(self, space: SearchSpace[Any], params: EvoPressParams, *, seed: int = 0) -> None:
        super().__init__(space, params, seed=seed)
        self._baselines: list[OneShot[Any] | Probing[Any]] = []
        for name in params.start_from:
            cls = OPTIMIZERS.get(name)
            assert issubclass(cls, (OneShot, Probing))  # the params validator let only these in
            self._baselines.append(cls(space, cls.Params(), seed=0))
        self._seeded: dict[int, Genome] | None = None  # one-shot genomes by index, once prepared
        self._race = None if params.race is None else Race(params.race)
        self._generation = 0
        stage_tokens = {s.tokens for s in params.stages}
        for option, tokens in self._probe_budgets().items():
            # The trial store knows one training per token budget.
            if params.train is not None and tokens in stage_tokens:
                raise EvocompError(
                    f"search.{option}={tokens} equals a stage's tokens, which train first; "
                    "choose stage tokens that differ from it"
                )

    def _raced(
        self, k: int, pool: list[Genome], means: dict[Genome, list[tuple[int, float]]],
        draw: int,
    ) -> Generator[list[Request], list[float], tuple[list[Genome], list[float]]]:
        """Stage ``k`` as a race (:mod:`evocomp.search.racing`): the candidates still in
        it, in pool order, and their scores on the stage's tokens."""
        race, stages = self._race, self.params.stages
        assert race is not None
        keep, final = stages[k].keep, stages[k].tokens
        looks = look_budgets(stages[k - 1].tokens, final, stages[0].tokens)
        alive = list(pool)
        for budget in looks:
            if len(alive) <= keep:
                budget = final  # nothing left to drop: straight to the stage's end
            scores = yield [Request(g, budget, draw=draw) for g in alive]
            _record(means, alive, budget, scores)
            order = sorted(range(len(alive)), key=scores.__getitem__)
            bar = alive[order[min(keep, len(alive)) - 1]]
            if budget == final:
                for g in alive:
                    if g != bar:
                        race.observe(means[g], means[bar])
                return alive, scores
            out = {i for i in order[keep:] if race.worse(means[alive[i]], means[bar])}
            race.dropped += len(out)
            alive = [g for i, g in enumerate(alive) if i not in out]
        raise AssertionError("the last look is the stage's budget")

    def _switches(self) -> int:
        top = self.params.max_switches
        count = self.rng.randint(1, top)
        if self.params.switches == "fewer":  # the reference's bias towards one switch
            count = min(count, self.rng.randint(1, top))
        return count

    def measurement(self) -> Measurement | None:
        """What the ``start_from`` baselines need measured (ShortGPT: importance, OWL:
        outlier ratios), their spans one after another."""
        wanted = [m for b in self._baselines if (m := b.measurement()) is not None]
        if not wanted:
            return None
        if len({replace(m, spans=()) for m in wanted}) > 1:
            raise EvocompError(
                f"search.start_from={self.params.start_from}: these baselines need different "
                "measurements of the model; keep one of them"
            )
        return replace(wanted[0], spans=tuple(span for m in wanted for span in m.spans))

    def prepare(self, measured: Sequence[float] | None) -> None:
        """Compute the one-shot ``start_from`` baselines' genomes, each from its share
        of ``measured`` (probing ones run at the start of the search)."""
        values = list(measured or [])
        self._seeded = {}
        for k, baseline in enumerate(self._baselines):
            m = baseline.measurement()
            n = 0 if m is None else len(m.spans)
            baseline.prepare(values[:n] if m is not None else None)
            values = values[n:]
            if isinstance(baseline, OneShot):
                self._seeded[k] = baseline.genome()

    def run(self) -> Generator[list[Request], list[float], None]:
        p = self.params
        final = p.stages[-1].tokens
        if p.start_from and self._seeded is None:
            raise RuntimeError("start_from needs prepare() first")
        seeded: list[Genome] = []
        for k, baseline in enumerate(self._baselines):
            if isinstance(baseline, Probing):  # its probes go to the store like any request
                seeded.append((yield from baseline.probe()))
            else:
                assert self._seeded is not None
                seeded.append(self._seeded[k])
        seeded = [g for g in seeded if g != self.space.uniform()]
        starts = [self.space.uniform(), *dict.fromkeys(seeded)] + [
            self.space.random(self.rng) for _ in range(p.init_samples)
        ]
        last = len(p.stages) - 1
        scores = yield [Request(g, final, self._train(last)) for g in starts]
        best = min(range(len(starts)), key=scores.__getitem__)
        parent = starts[best]
        self.consider(parent, scores[best])
        screen = None if p.surrogate is None else Screening(self.space, p.surrogate)
        for gen in range(p.generations):
            n = p.offspring if screen is None else screen.size(p.offspring)
            children = [
                self.space.mutate(parent, self.rng, switches=self._switches()) for _ in range(n)
            ]
            if screen is not None:
                children = screen.pick(children, p.offspring, self.rng, exclude=parent)
            pool = [parent, *children]
            draw = gen + 1 if p.resample else 0
            means: dict[Genome, list[tuple[int, float]]] = {g: [] for g in pool}
            for k, stage in enumerate(p.stages):
                if k and self._race is not None:
                    pool, scores = yield from self._raced(k, pool, means, draw)
                else:
                    scores = yield [
                        Request(g, stage.tokens, self._train(k), draw=draw) for g in pool
                    ]
                    _record(means, pool, stage.tokens, scores)
                if k == 0 and screen is not None:
                    screen.observe(pool, scores)  # the first stage scores them all alike
                # sorted() is stable, so the parent (first) wins ties.
                ranked = sorted(range(len(pool)), key=scores.__getitem__)[: stage.keep]
                pool = [pool[i] for i in ranked]
                best_score = scores[ranked[0]]
            parent = pool[0]
            if p.resample:
                # Scores of different draws do not compare: the parent, elitist on each
                # draw, is the search's answer.
                self.best_genome, self.best_fitness = parent, best_score
            else:
                self.consider(parent, best_score)
            self._generation = gen + 1
        if p.resample and p.generations:
            (score,) = yield [Request(parent, final, self._train(last))]
            self.best_genome, self.best_fitness = parent, score
