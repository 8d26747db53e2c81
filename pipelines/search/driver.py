"""The layer search, from its config (conf/search.yaml) to its outputs: ``python search.py``.

The driver samples candidates (``evolution``), runs the static check and the fingerprint itself (``fingerprint``),
sends the rest to Ray (``engine``, ``evaluator``), keeps as many evaluations in flight as there are workers and
starts one new candidate per finished one, records each in ``history.jsonl`` as it finishes (``history``), then
re-ranks the best and writes the leaderboard, the pictures and the evolved layers' norm configs
(``leaderboard``). A search started again in its dir (``+resume=<dir>``) rebuilds its population and fingerprint
cache from the history and evaluates no recorded candidate again.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import random
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from evonorm.factory import NORM_ACT_LAYERS
from evonorm.space import PAPER_LAYERS, Graph, ParseError, GraphError, parse
from pipelines.checks import CONF_DIR, ConfigError
from pipelines.loggers import start_wandb, wandb_mode
from pipelines.records import config_changes, describe_changes, pid_exists, process_identity
from pipelines.search import leaderboard
from pipelines.search.engine import Failure, RayEngine
from pipelines.search.evolution import Member, Strategy, fitness
from pipelines.search.fingerprint import fingerprint, probe_outputs, static_problem
from pipelines.search.history import History
from pipelines.search.mutator import Mutator, series_problem
from pipelines.search.proxy import load_proxy_data

log = logging.getLogger(__name__)
SEARCH_FILE = "search.json"  # the search's config and who runs it
# may change when a search is resumed: how it runs, not what it computes
RUN_KEYS = ("search.workers", "search.ray_address", "search.max_retries", "search.object_store_memory",
            "search.progress_bar", "logger", "output_dir", "resume")


def seed_of(key: str) -> int:
    """An evaluation's seed from what it evaluates (a candidate's canonical hash, a reference's name)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


# --------------------------------------------------------------------------------------------------------------
# config checks: refused before anything starts

def layer_kwargs(name: str, kwargs: dict, groups: int) -> dict:
    """A reference layer's kwargs for the proxy: its config's, with ``groups`` where the layer has groups, and its
    plain-ops implementation where it has fused kernels (``impl=reference``: the same arithmetic, in torch ops as
    the candidates', and differentiable twice, as the stress test needs)."""
    takes = inspect.signature(NORM_ACT_LAYERS[name]).parameters
    return {**kwargs, **({"groups": groups} if "groups" in takes else {}),
            **({"impl": "reference"} if "impl" in takes else {})}


def reference_layers(names, groups: int) -> dict[str, dict]:
    """The references as layer specs, from their conf/norm files; a name given twice or unknown is refused."""
    names = list(names)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"references: {', '.join(twice)} given twice; each layer name once")
    specs = {}
    for name in names:
        path = CONF_DIR / "norm" / f"{name}.yaml"
        if name not in NORM_ACT_LAYERS or name == "graph" or not path.is_file():
            known = sorted(p.stem for p in (CONF_DIR / "norm").glob("*.yaml") if p.stem != "graph")
            raise ConfigError(f"references: no layer {name!r}; choose from {', '.join(known)}")
        kwargs = OmegaConf.to_container(OmegaConf.load(path).kwargs or {}, resolve=True)
        specs[name] = {"norm": name, "kwargs": layer_kwargs(name, kwargs, groups)}
    return specs


def seed_graphs(entries, series: str) -> list[Graph]:
    """``search.seed_layers``: paper layer names or formulas, parsed, of the series, each once."""
    graphs, hashes = [], {}
    for i, entry in enumerate(entries):
        text = PAPER_LAYERS.get(entry, entry)
        try:
            graph = parse(text)
        except (ParseError, GraphError) as e:
            raise ConfigError(f"search.seed_layers[{i}] = {entry!r} is no layer formula: {e}") from None
        problem = series_problem(graph, series)
        if problem:
            raise ConfigError(f"search.seed_layers[{i}] = {entry!r}: {problem}")
        if graph.canonical_hash() in hashes:
            raise ConfigError(f"search.seed_layers[{i}] = {entry!r} is the layer of search.seed_layers"
                             f"[{hashes[graph.canonical_hash()]}] again; each layer once")
        hashes[graph.canonical_hash()] = i
        graphs.append(graph)
    return graphs


def check_search_config(cfg: DictConfig) -> None:
    s = cfg.search
    for key in ("budget", "population", "tournament", "workers"):
        value = s[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"search.{key}={value!r}: a whole number >= 1")
    if s.strategy == "evolution" and s.budget < s.population:
        raise ConfigError(f"search.budget={s.budget} is smaller than search.population={s.population}: evolution "
                         "would never leave its random initial population; raise the budget or lower the population")
    if cfg.protocols.screen.steps > cfg.proxy.steps:
        raise ConfigError(f"protocols.screen.steps={cfg.protocols.screen.steps} is beyond proxy.steps="
                         f"{cfg.proxy.steps}: the screen is the start of the proxy training")
    if not cfg.proxy.anchors:
        raise ConfigError("proxy.anchors is empty: the search scores layers on its anchors")
    if not 0 <= cfg.rerank.keep <= cfg.rerank.top:
        raise ConfigError(f"rerank.keep={cfg.rerank.keep} must be in [0, rerank.top={cfg.rerank.top}] (rerank.top=0: "
                         "no re-rank)")
    if cfg.logger.name not in ("wandb", "none"):
        raise ConfigError(f"logger={cfg.logger.name}: the search logs to wandb or not at all (logger=none); its "
                         "record is history.jsonl and summary.json either way")


def check_search_dir(search_dir: Path, cfg: DictConfig, history: History) -> None:
    """A dir with a history is resumed, with the same config (up to how it runs) and not while another driver
    works there; ``+resume=`` needs a history."""
    record_path = search_dir / SEARCH_FILE
    if cfg.get("resume") and not history.entries:
        raise ConfigError(f"+resume={cfg.resume}: no search recorded there to go on with ({history.path} is "
                         "missing or empty); to start a search in that dir, give hydra.run.dir instead")
    if not record_path.is_file():
        return
    record = json.loads(record_path.read_text())
    changed, _ = config_changes(strip_run_keys(record["config"]), strip_run_keys(search_config(cfg)))
    if changed:
        raise ConfigError(f"{search_dir} holds a search of another configuration (differs in "
                         f"{describe_changes(changed)}); resume it with its own config, or use a new dir")
    owner = record.get("driver", {})
    if owner.get("pid") not in (None, process_identity()["pid"]) and owner.get("host") == process_identity()[
            "host"] and pid_exists(owner["pid"]) and record.get("status") == "running":
        raise ConfigError(f"{search_dir} is being searched right now by pid {owner['pid']}; not starting a second "
                         "driver there")


def search_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def strip_run_keys(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    for key in RUN_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = config.get(parent, {}) if parent else config
        node.pop(leaf, None)
    return config


# --------------------------------------------------------------------------------------------------------------
# the search

class Search:
    def __init__(self, cfg: DictConfig, history: History):
        self.cfg, self.history = cfg, history
        self.wandb, self.progress = None, None
        self.series, self.budget = cfg.search.series, cfg.search.budget
        self.groups = cfg.proxy.groups
        self.settings = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("proxy", "protocols", "rerank")}
        self.references = reference_layers(cfg.references, self.groups)
        self.strategy = Strategy(cfg.search.strategy, Mutator(self.series, cfg.search.min_ops, cfg.search.max_ops),
                                 cfg.search.population, cfg.search.tournament,
                                 seed_graphs(cfg.search.seed_layers, self.series))
        self.cache: dict[str, dict] = {}  # fingerprint -> the entry that was evaluated
        self.in_flight: dict[str, dict] = {}  # fingerprint -> the job evaluating it
        self.waiting: dict[str, list[dict]] = {}  # fingerprint -> candidates equal to one in flight
        self.started = time.time()
        self.replay()

    # ---------------------------------------------------------------- state from the history

    def replay(self) -> None:
        """The population, cache and counters of the recorded candidates (a resumed search)."""
        candidates = self.history.of_kind("candidate")
        for entry in candidates:
            self.remember(entry)
        self.sampled = len(candidates)
        self.next_id = max((e["id"] for e in candidates), default=-1) + 1
        # ids of candidates in flight when the driver was killed (never recorded): given to the next ones sampled,
        # so the ids stay 0 .. budget-1 (ages are insertion order, not ids)
        self.free_ids = sorted(set(range(self.next_id)) - {e["id"] for e in candidates})
        self.strategy.seeds = self.strategy.seeds[sum(e["origin"] == "seed" for e in candidates):]
        self.rng = random.Random(f"{self.cfg.seed}/{len(self.history.entries)}")
        if candidates:
            log.info("resumed from %s: %d candidates recorded, population %d, fingerprint cache %d",
                     self.history.path, len(candidates), len(self.strategy.population), len(self.cache))

    def remember(self, entry: dict) -> None:
        if entry["status"] in ("passed", "rejected") and entry.get("ended_by") != "static" and \
                entry["fingerprint"] not in self.cache:
            self.cache[entry["fingerprint"]] = entry
        scores = fitness(entry, len(self.cfg.proxy.anchors))
        if scores is not None:
            self.strategy.add(Member(entry["id"], Graph([tuple(n) for n in entry["genome"]], check=False), scores))

    # ---------------------------------------------------------------- candidates

    def sample(self) -> dict | None:
        """The next candidate: finished here if the static check or the fingerprint ends it (None), else its job."""
        started = time.perf_counter()
        graph, parent, origin = self.strategy.next(self.rng)
        if self.free_ids:
            number = self.free_ids.pop(0)
        else:
            number, self.next_id = self.next_id, self.next_id + 1
        entry = {"kind": "candidate", "id": number, "name": f"#{number}", "formula": graph.formula(),
                 "genome": [[op, list(inputs)] for op, inputs in graph.nodes], "hash": graph.canonical_hash(),
                 "parent": parent, "origin": origin, "series": self.series, "times": {}}
        self.sampled += 1
        outputs = probe_outputs(graph)
        problem = static_problem(graph, self.series, outputs)
        entry["times"]["static"] = round(time.perf_counter() - started, 4)
        entry["fingerprint"] = None if problem else fingerprint(outputs)
        if problem:
            self.record({**entry, "status": "rejected", "ended_by": "static", "reason": problem, "scores": None})
            return None
        entry["times"]["fingerprint"] = round(time.perf_counter() - started - entry["times"]["static"], 4)
        fp = entry["fingerprint"]
        if fp in self.cache:
            self.record(self.duplicate(entry, self.cache[fp]))
            return None
        if fp in self.in_flight:
            self.waiting.setdefault(fp, []).append(entry)
            return None
        job = {**entry, "layer": {"norm": "graph", "kwargs": {"graph": entry["formula"], "groups": self.groups}},
               "seed": seed_of(entry["hash"])}
        self.in_flight[fp] = job
        return job

    @staticmethod
    def duplicate(entry: dict, original: dict) -> dict:
        """A candidate equivalent to an evaluated one: its outcome, not trained again."""
        return {**entry, "status": "duplicate", "ended_by": "fingerprint", "duplicate_of": original["id"],
                "original_status": original["status"], "scores": original.get("scores"),
                "screen": original.get("screen"),
                "reason": f"computes what #{original['id']} computes ({original['formula']}, {original['status']})"}

    def reference_jobs(self) -> list[dict]:
        done = {e["name"] for e in self.history.of_kind("reference")}
        return [{"kind": "reference", "name": name, "layer": layer, "seed": seed_of(name), "times": {}}
                for name, layer in self.references.items() if name not in done]

    # ---------------------------------------------------------------- outcomes

    def record(self, entry: dict) -> None:
        entry = {k: v for k, v in entry.items() if k not in ("layer", "rerank")}
        entry["finished_s"] = round(time.time() - self.started, 2)
        self.history.append(entry)
        if entry["kind"] == "candidate":
            self.remember(entry)
            self.progress.update(1)
            self.progress.set_postfix_str(leaderboard.progress_note(self.history.entries))
            if self.wandb is not None:
                self.wandb.log(leaderboard.progress_metrics(self.history.entries))

    def finish(self, job: dict, outcome: dict | Failure) -> None:
        if isinstance(outcome, Failure):
            entry = {**job, "status": "failed", "ended_by": None, "reason": outcome.error, "scores": None}
        else:
            entry = {**job, **outcome, "times": {**job.get("times", {}), **outcome["times"]}}
        self.record(entry)
        if job["kind"] != "candidate":
            return
        fp = job["fingerprint"]
        self.in_flight.pop(fp, None)
        for waiter in self.waiting.pop(fp, []):
            if entry["status"] == "failed":
                self.record({**waiter, "status": "failed", "ended_by": None, "scores": None,
                             "reason": f"equivalent of #{entry['id']}, which crashed: {entry['reason']}"})
            else:
                self.record(self.duplicate(waiter, entry))

    # ---------------------------------------------------------------- phases

    def rerank_jobs(self) -> list[dict]:
        jobs = leaderboard.rerank_jobs(self.history.entries, self.references, self.cfg.rerank, self.groups)
        for job in jobs:
            job["seed"] = seed_of(f"{job['hash'] or job['name']}/rerank{job['rerank_seed']}")
        return jobs

    @property
    def done(self) -> bool:
        """Nothing left to evaluate (a finished search, resumed: no Ray needed)."""
        return self.sampled >= self.budget and not self.reference_jobs() and not self.rerank_jobs()

    def run(self, engine: RayEngine, data_ref) -> None:
        self.progress = tqdm(total=self.budget, initial=self.sampled, desc="candidates", unit="cand",
                             disable=not self.cfg.search.progress_bar, dynamic_ncols=True)
        references = self.reference_jobs()
        while True:
            while engine.has_room and (references or self.sampled < self.budget):
                job = references.pop(0) if references else self.sample()
                if job is not None:
                    engine.submit(job, data_ref, self.settings)
            if not engine.pending:
                break
            self.finish(*engine.next_finished())
        self.progress.close()
        jobs = self.rerank_jobs()
        if jobs:
            log.info("re-ranking the best %d candidates and %d references on the re-rank split: %d trainings",
                     self.cfg.rerank.top, len(self.references), len(jobs))
        while jobs or engine.pending:
            while jobs and engine.has_room:
                engine.submit(jobs.pop(0), data_ref, self.settings)
            self.finish(*engine.next_finished())


def run_search(cfg: DictConfig) -> Path:
    """Run (or resume) the search configured by ``cfg`` into ``cfg.output_dir``; returns the dir."""
    search_dir = Path(cfg.output_dir)
    search_dir.mkdir(parents=True, exist_ok=True)
    check_search_config(cfg)
    history = History(search_dir)
    check_search_dir(search_dir, cfg, history)
    search = Search(cfg, history)  # refuses bad references and seed layers
    record = {"status": "running", "config": search_config(cfg), "driver": process_identity(),
              "started_at": time.time()}
    (search_dir / SEARCH_FILE).write_text(json.dumps(record, indent=2))
    if cfg.logger.name == "wandb":
        search.wandb = start_wandb(wandb_mode(cfg.logger.mode), dir=str(search_dir), project=cfg.logger.project,
                                   entity=cfg.logger.entity, group=cfg.logger.group or "layer-search",
                                   name=f"search-{cfg.search.series}-{cfg.search.strategy}-s{cfg.seed}",
                                   tags=["search", cfg.search.series, cfg.search.strategy, *cfg.logger.tags],
                                   config=search_config(cfg))
    if not search.done:
        data = load_proxy_data(cfg.proxy.dataset, cfg.proxy.root, cfg.proxy.image_size, cfg.proxy.score_size,
                               cfg.proxy.rerank_size, cfg.proxy.split_seed)
        engine = RayEngine(cfg.search.workers, cfg.search.ray_address, cfg.search.max_retries,
                           cfg.search.object_store_memory)
        try:
            search.run(engine, engine.put(data))
        finally:
            engine.shutdown()
    outputs = leaderboard.write_outputs(search_dir, history.entries, cfg, search.wandb)
    record.update(status="completed", finished_at=time.time(), **outputs)
    (search_dir / SEARCH_FILE).write_text(json.dumps(record, indent=2, default=str))
    if search.wandb is not None:
        search.wandb.finish()
    return search_dir
