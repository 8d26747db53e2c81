"""Where the next candidate comes from: aging evolution with Pareto tournaments (Real et al. 2019; the paper's
multi-objective tournament over the K anchor scores), or random search with the same budget.

Every evaluated layer enters the population, with its ``fitness``: its K proxy scores if it passed every protocol,
else the screen accuracies it reached (0 for the anchors it did not reach, all 0 for a finiteness or stability
rejection). (The paper discards rejected layers; with 5000 workers it could. Here some 1-3% of random layers pass,
and a population of passed layers only would take the whole budget to fill: near misses are where evolution starts.)
Until it holds ``population`` layers, evolution draws random ones (its random initial population, optionally seeded
with known layers); then each child is a mutant of a parent drawn from the Pareto front of a random sample of
``tournament`` members, and each layer evaluated pushes the oldest out.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from evonorm.space import Graph
from pipelines.checks import ConfigError
from pipelines.search.mutator import Mutator

STRATEGIES = ("evolution", "random")


@dataclass(frozen=True)
class Member:
    id: int
    graph: Graph
    scores: tuple[float, ...]


def fitness(entry: dict, anchors: int) -> tuple[float, ...] | None:
    """What a recorded candidate brings into the population (None: it stays out: a static rejection, a crash); an
    equivalent of an evaluated layer brings that layer's."""
    if entry["status"] == "failed" or entry["ended_by"] == "static":
        return None
    if entry.get("original_status", entry["status"]) == "passed":
        return tuple(entry["scores"])
    reached = list(entry.get("screen") or [])
    return tuple(reached + [0.0] * (anchors - len(reached)))


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(members: list) -> list:
    """The members no other member dominates (at least as good on every score, better on one)."""
    return [m for m in members if not any(dominates(o.scores, m.scores) for o in members)]


class Strategy:
    """``next(rng)``: the next child as (graph, parent id or None, how it was made); ``add(member)``: an evaluated
    layer. ``seeds``: graphs handed out first (the initial population's known layers)."""

    def __init__(self, kind: str, mutator: Mutator, population: int, tournament: int, seeds: list[Graph] = ()):
        if kind not in STRATEGIES:
            raise ConfigError(f"search.strategy={kind!r}: choose from {', '.join(STRATEGIES)}")
        if not 1 <= tournament <= population:
            raise ConfigError(f"search.tournament={tournament} must be in [1, search.population={population}]")
        self.kind, self.mutator, self.size, self.tournament = kind, mutator, population, tournament
        self.population: deque[Member] = deque()
        self.seeds = list(seeds)

    def add(self, member: Member) -> None:
        self.population.append(member)
        if len(self.population) > self.size:
            self.population.popleft()  # aging: the oldest leaves, however good

    def next(self, rng: random.Random) -> tuple[Graph, int | None, str]:
        if self.seeds:
            return self.seeds.pop(0), None, "seed"
        if self.kind == "random" or len(self.population) < self.size:
            return self.mutator.random_graph(rng), None, "random"
        sample = rng.sample(list(self.population), self.tournament)
        parent = rng.choice(pareto_front(sample))
        child, change = self.mutator.mutate(parent.graph, rng)
        return child, parent.id, f"mutation of {parent.id} ({change})"
