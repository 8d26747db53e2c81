"""What a search leaves for its user, from its ``history.jsonl``: ``leaderboard.md`` / ``.csv`` (the re-ranked best
layers beside the references), ``summary.json`` (what each protocol ended and the time it saved), ``pareto.png``,
``progress.png`` and the norm configs ``norm/evolved_<hash>.yaml`` of the best ``rerank.keep`` layers. A multirun of
searches (``-m search.strategy=evolution,random seed=0,1,2``) ends with ``comparison.md`` and ``progress.png`` in its
sweep dir: evolution and random search side by side.

    python -m pipelines.search.leaderboard <search dir>     # the outputs again, from the history
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from evonorm.space import PAPER_LAYERS, parse
from pipelines.checks import CONF_DIR, ConfigError
from pipelines.search.evaluator import PROTOCOLS, WORKER_PROTOCOLS
from pipelines.search.fingerprint import fingerprint, probe_outputs
from pipelines.search.evolution import pareto_front
from pipelines.search.history import History

log = logging.getLogger(__name__)
TARGET_REFERENCE = {"s": "gn_relu", "b": "bn_relu"}  # the bar for the best layer of each series
SUMMARY_FILE = "summary.json"
PROXY_ONLY_ROWS = 10  # candidates on the leaderboard of a search without re-rank (rerank.top=0)


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def std(values) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def candidates(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e["kind"] == "candidate"]


def evolved_name(entry: dict) -> str:
    return f"evolved_{entry['hash']}"


# --------------------------------------------------------------------------------------------------------------
# progress, as the search goes

def best_so_far(entries: list[dict]) -> list[float | None]:
    """Per candidate finished, in order: the best mean proxy score so far (None before the first that passed)."""
    best, out = None, []
    for entry in candidates(entries):
        if entry["status"] == "passed":
            score = mean(entry["scores"])
            best = score if best is None else max(best, score)
        out.append(best)
    return out


def progress_note(entries: list[dict]) -> str:
    ended = Counter(e["ended_by"] or e["status"] for e in candidates(entries))
    best = (best_so_far(entries) or [None])[-1]
    return (f"best {best:.3f} " if best is not None else "") + " ".join(f"{k}:{v}" for k, v in sorted(ended.items()))


def progress_metrics(entries: list[dict]) -> dict:
    done = candidates(entries)
    ended = Counter(e["ended_by"] or e["status"] for e in done)
    best = best_so_far(entries)[-1]
    return {"candidates": len(done), **({"best_mean_score": best} if best is not None else {}),
            **{f"outcome/{k}": v for k, v in ended.items()}}


# --------------------------------------------------------------------------------------------------------------
# the re-rank

def proxy_ranking(entries: list[dict]) -> list[dict]:
    """The candidates that passed every protocol, best mean proxy score first (equivalents once)."""
    passed = [e for e in candidates(entries) if e["status"] == "passed"]
    return sorted(passed, key=lambda e: (-mean(e["scores"]), e["id"]))


def rerank_jobs(entries: list[dict], references: dict[str, dict], rerank: DictConfig, groups: int) -> list[dict]:
    """The re-rank trainings not yet recorded: ``rerank.seeds`` per top candidate, ``rerank.reference_seeds``
    per reference; none at all with ``rerank.top=0`` (no re-rank)."""
    if rerank.top == 0:
        return []
    done = {(e["name"], e["rerank_seed"]) for e in entries if e["kind"] == "rerank"}
    subjects = [(e["name"], e["hash"], {"norm": "graph", "kwargs": {"graph": e["formula"], "groups": groups}},
                 rerank.seeds) for e in proxy_ranking(entries)[:rerank.top]]
    subjects += [(name, None, layer, rerank.reference_seeds) for name, layer in references.items()]
    return [{"kind": "rerank", "name": name, "hash": hash_, "layer": layer, "rerank": True, "rerank_seed": seed,
             "times": {}} for name, hash_, layer, seeds in subjects for seed in range(seeds) if (name, seed) not in done]


# --------------------------------------------------------------------------------------------------------------
# what each protocol ended and saved

def protocol_summary(entries: list[dict]) -> dict:
    """Per protocol: the candidates it ended, their fraction of all sampled, the worker-seconds it spent on all
    candidates, and the seconds it saved: for a rejection, the mean measured cost of the protocols after it (among
    the candidates that went through them); for a fingerprint hit, its original's whole evaluation."""
    done = candidates(entries)
    passed_through = {p: [e["times"][p] for e in done if p in e["times"] and e["ended_by"] != p and
                          e["status"] != "failed"] for p in WORKER_PROTOCOLS}
    cost = {p: mean(times) or 0.0 for p, times in passed_through.items()}
    by_id = {e["id"]: e for e in done}
    rows = {}
    for i, protocol in enumerate(PROTOCOLS):
        ended = [e for e in done if e["ended_by"] == protocol]
        if protocol == "fingerprint":
            saved = sum(sum(by_id[e["duplicate_of"]]["times"].get(p, 0) for p in WORKER_PROTOCOLS) for e in ended)
        else:
            saved = len(ended) * sum(cost[p] for p in PROTOCOLS[i + 1:] if p in cost)
        rows[protocol] = {"ended": len(ended), "fraction": len(ended) / len(done) if done else 0.0,
                          "spent_s": round(sum(e["times"].get(protocol, 0) for e in done), 1),
                          "saved_s": round(saved, 1)}
    statuses = Counter(e["status"] for e in done)
    return {"sampled": len(done), "passed": statuses["passed"], "failed": statuses["failed"],
            "distinct_layers": len({e["hash"] for e in done}), "protocols": rows,
            "worker_s": round(sum(sum(e["times"].get(p, 0) for p in WORKER_PROTOCOLS) for e in entries), 1)}


def protocol_table(summary: dict) -> list[str]:
    lines = ["| protocol | ended | fraction of sampled | worker-s spent | worker-s saved |", "|---|---|---|---|---|"]
    for protocol, row in summary["protocols"].items():
        lines.append(f"| {protocol} | {row['ended']} | {row['fraction']:.1%} | {row['spent_s']:.1f} | "
                     f"{row['saved_s']:.1f} |")
    lines.append(f"| passed (fully trained) | {summary['passed']} | "
                 f"{summary['passed'] / max(1, summary['sampled']):.1%} | | |")
    if summary["failed"]:
        lines.append(f"| failed (crashed) | {summary['failed']} | {summary['failed'] / summary['sampled']:.1%} | | |")
    return lines


# --------------------------------------------------------------------------------------------------------------
# the leaderboard

def leaderboard_rows(entries: list[dict], keep: int) -> list[dict]:
    """The re-ranked layers (best mean re-rank score first; the first ``keep`` candidates are kept) and the
    references, with per-anchor proxy and re-rank scores (means over re-rank seeds) and the re-rank seed std.
    Without a re-rank (``rerank.top=0``): the best ``PROXY_ONLY_ROWS`` candidates and the references by mean proxy
    score, so that a search run for comparison still shows what it found."""
    reranks: dict[str, list[list[float]]] = {}
    for e in entries:
        if e["kind"] == "rerank" and e["status"] == "passed":
            reranks.setdefault(e["name"], []).append(e["scores"])
    if not reranks:
        reranks = {e["name"]: [] for e in proxy_ranking(entries)[:PROXY_ONLY_ROWS]}
        reranks.update((e["name"], []) for e in entries if e["kind"] == "reference" and e["scores"])
    proxy = {e["name"]: e for e in entries if e["kind"] in ("candidate", "reference")}
    rows = []
    for name, runs in reranks.items():
        source = proxy.get(name, {})
        means = [mean(col) for col in zip(*runs)]
        rows.append({"name": evolved_name(source) if source.get("kind") == "candidate" else name,
                     "reference": source.get("kind") == "reference", "id": source.get("id"),
                     "fingerprint": source.get("fingerprint"),
                     "formula": source.get("formula", ""), "proxy": source.get("scores"),
                     "proxy_mean": mean(source.get("scores") or []), "proxy_status": source.get("status"),
                     "rerank": means, "rerank_mean": mean(means), "rerank_seeds": len(runs),
                     "rerank_std": std([mean(run) for run in runs]),
                     "rerank_anchor_std": [std(list(col)) for col in zip(*runs)]})
    rows.sort(key=lambda r: -(r["proxy_mean"] if r["rerank_mean"] is None else r["rerank_mean"]))
    kept = 0
    for row in rows:
        row["kept"] = not row["reference"] and kept < keep
        kept += row["kept"]
    return rows


def fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def target_lines(rows: list[dict], series: str, anchors: list[str]) -> list[str]:
    """The best layer of the series against the issue's reference (GN-ReLU for s, BN-ReLU for b), per anchor."""
    best = next((r for r in rows if not r["reference"]), None)
    ref = next((r for r in rows if r["name"] == TARGET_REFERENCE[series]), None)
    if best is None or ref is None or not best["rerank"]:
        return []
    deltas = [b - r for b, r in zip(best["rerank"], ref["rerank"])]
    spread = ", ".join(f"{a} {fmt(s)}" for a, s in zip(anchors, ref["rerank_anchor_std"]) if s is not None)
    verdict = "at least as good on every anchor" if min(deltas) >= 0 else "below on " + ", ".join(
        f"{a} by {-d:.3f}" for a, d in zip(anchors, deltas) if d < 0)
    return [f"Best layer {best['name']} against {ref['name']} on the re-rank split: "
            + ", ".join(f"{a} {d:+.3f}" for a, d in zip(anchors, deltas)) + f": {verdict}."
            + (f" Seed std of {ref['name']} ({ref['rerank_seeds']} seeds): {spread}." if spread else "")]


def paper_layer_of(fingerprint_: str | None) -> str | None:
    """The paper layer (b0 ... s2) a fingerprint belongs to, if any: a search that found one again says so."""
    known = {fingerprint(probe_outputs(parse(formula))): name for name, formula in PAPER_LAYERS.items()}
    return known.get(fingerprint_)


def write_leaderboard(search_dir: Path, rows: list[dict], anchors: list[str], summary: dict, series: str) -> None:
    header = ["rank", "layer", "formula", *[f"proxy {a}" for a in anchors], "proxy mean",
              *[f"re-rank {a}" for a in anchors], "re-rank mean", "re-rank seeds", "kept"]
    table = []
    for i, row in enumerate(rows, 1):
        paper = paper_layer_of(row["fingerprint"])
        table.append([i, row["name"] + (" (reference)" if row["reference"] else f" (= {paper})" if paper else ""),
                      row["formula"] or PAPER_LAYERS.get(row["name"], ""),
                      *[fmt(s) for s in (row["proxy"] or [None] * len(anchors))], fmt(row["proxy_mean"]),
                      *[fmt(s) for s in (row["rerank"] or [None] * len(anchors))],
                      fmt(row["rerank_mean"]) + (f" ± {row['rerank_std']:.3f}" if row["rerank_std"] else ""),
                      row["rerank_seeds"], "yes" if row["kept"] else ""])
    with open(search_dir / "leaderboard.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table)
    lines = [f"# Layer search: {search_dir}", "",
             f"Series {series}; {summary['sampled']} candidates sampled ({summary['distinct_layers']} distinct "
             f"layers), {summary['passed']} trained through. Scores: top-1 on held-out training images (proxy: the "
             "scoring split; re-rank: a second split, longer training), per anchor; a formula in `` ` `` is the "
             "layer's graph (evonorm.space), followed by a per-channel affine.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"`{c}`" if j == 2 and c else str(c) for j, c in enumerate(r)) + " |" for r in table]
    lines += ["", *target_lines(rows, series, anchors), "", "## Rejections", "", *protocol_table(summary), ""]
    (search_dir / "leaderboard.md").write_text("\n".join(lines))


def write_norm_configs(search_dir: Path, rows: list[dict]) -> list[str]:
    """``norm/evolved_<hash>.yaml`` per kept layer: the graph layer with its formula, the project's layer defaults
    (32 groups, as every layer of the transfer study), and the name the transfer report shows."""
    folder = search_dir / "norm"
    folder.mkdir(exist_ok=True)
    names = []
    for row in (r for r in rows if r["kept"]):
        if (CONF_DIR / "norm" / f"{row['name']}.yaml").is_file():
            raise ConfigError(f"conf/norm/{row['name']}.yaml exists: the evolved layer's name would exist twice")
        defaults = OmegaConf.load(CONF_DIR / "norm" / "graph.yaml").kwargs
        config = OmegaConf.create({"name": row["name"], "layer": "graph",
                                   "kwargs": {**OmegaConf.to_container(defaults), "graph": row["formula"]}})
        header = (f"# Evolved by the layer search in {search_dir} (#{row['id']}, re-rank mean top-1 "
                  f"{row['rerank_mean']:.3f}):\n#   {row['formula']}\n")
        (folder / f"{row['name']}.yaml").write_text(header + OmegaConf.to_yaml(config))
        names.append(row["name"])
    return names


# --------------------------------------------------------------------------------------------------------------
# pictures

def write_pareto(search_dir: Path, entries: list[dict], anchors: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    class Point:
        def __init__(self, entry):
            self.entry, self.scores = entry, tuple(entry["scores"])

    passed = [Point(e) for e in candidates(entries) if e["status"] == "passed"]
    front = {id(p) for p in pareto_front(passed)}
    references = [e for e in entries if e["kind"] == "reference" and e["scores"]]
    pairs = [(i, j) for i in range(len(anchors)) for j in range(i + 1, len(anchors))] or [(0, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4.2), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        others = [p for p in passed if id(p) not in front]
        ax.scatter([p.scores[i] for p in others], [p.scores[j] for p in others], s=10, c="0.7", label="passed")
        ax.scatter([p.scores[i] for p in passed if id(p) in front], [p.scores[j] for p in passed if id(p) in front],
                   s=22, c="tab:blue", label="Pareto front (all anchors)")
        for ref in references:
            ax.scatter(ref["scores"][i], ref["scores"][j], marker="*", s=140, c="tab:red", zorder=3)
            ax.annotate(ref["name"], (ref["scores"][i], ref["scores"][j]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color="tab:red")
        ax.set_xlabel(f"{anchors[i]} top-1")
        ax.set_ylabel(f"{anchors[j]} top-1")
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(f"Proxy scores of the {len(passed)} layers that passed (references: stars)")
    fig.tight_layout()
    fig.savefig(search_dir / "pareto.png", dpi=110)
    plt.close(fig)


def write_progress(path: Path, runs: dict[str, list[tuple[str, list[float | None]]]],
                   references: dict[str, float]) -> None:
    """Best mean proxy score against candidates evaluated: one panel per strategy, one labelled line per run; a run
    where no candidate passed has no line and is named in its panel; references are dashed, named in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 5), squeeze=False, sharex=True,
                             sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (strategy, curves) in zip(axes[0], runs.items()):
        nothing = []
        for label, curve in curves:
            if all(v is None for v in curve):
                nothing.append(label)
            else:
                ax.plot(range(1, len(curve) + 1), [float("nan") if v is None else v for v in curve], lw=1.2,
                        label=label)
        for (name, score), color in zip(sorted(references.items(), key=lambda kv: -kv[1]), colors[::-1]):
            ax.axhline(score, ls="--", lw=0.9, c=color, alpha=0.7, label=f"{name} (reference) {score:.3f}")
        ax.set_title(f"{strategy} ({len(curves)} run{'s' * (len(curves) > 1)})"
                     + (f"\nno candidate passed: {', '.join(nothing)}" if nothing else ""), fontsize=10)
        ax.set_xlabel("candidates evaluated")
        ax.set_xlim(1, max(len(curve) for _, curve in curves))
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: lines end at the top
    axes[0][0].set_ylabel("best mean proxy top-1 so far")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reference_means(entries: list[dict]) -> dict[str, float]:
    return {e["name"]: mean(e["scores"]) for e in entries if e["kind"] == "reference" and e["scores"]}


# --------------------------------------------------------------------------------------------------------------
# everything at once

def write_outputs(search_dir: Path, entries: list[dict], cfg: DictConfig, wandb_run=None) -> dict:
    anchors = list(cfg.proxy.anchors)
    summary = protocol_summary(entries)
    rows = leaderboard_rows(entries, cfg.rerank.keep)
    write_leaderboard(search_dir, rows, anchors, summary, cfg.search.series)
    evolved = write_norm_configs(search_dir, rows)
    write_pareto(search_dir, entries, anchors)
    progress = best_so_far(entries)
    write_progress(search_dir / "progress.png", {cfg.search.strategy: [(f"seed {cfg.seed}", progress)]},
                   reference_means(entries))
    best = next((r for r in rows if not r["reference"]), None)
    summary.update(strategy=cfg.search.strategy, series=cfg.search.series, seed=cfg.seed, evolved=evolved,
                   best_proxy_mean=(progress or [None])[-1],
                   best=best and {k: best[k] for k in ("name", "formula", "proxy", "rerank", "rerank_mean")},
                   references={r["name"]: {k: r[k] for k in ("proxy", "rerank", "rerank_mean", "rerank_std",
                                                              "rerank_anchor_std")} for r in rows if r["reference"]})
    (search_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    for line in protocol_table(summary):
        log.info("%s", line)
    command = (f"python run.py -m experiment=transfer_demo norm=bn_relu,b0,s0,{','.join(evolved)} "
               f"hydra.searchpath=[file://{search_dir.resolve()}]") if evolved else None
    if command:
        (search_dir / "transfer_command.txt").write_text(command + "\n")
        log.info("evolved layers: %s; into the transfer study with:\n  %s", ", ".join(evolved), command)
    if wandb_run is not None:
        import wandb
        wandb_run.log({"leaderboard": wandb.Table(columns=["layer", "formula", "proxy_mean", "rerank_mean"],
                                                  data=[[r["name"], r["formula"], r["proxy_mean"], r["rerank_mean"]]
                                                        for r in rows])})
        wandb_run.summary.update({f"rejections/{p}": row["ended"] for p, row in summary["protocols"].items()})
    return {"summary": str(search_dir / SUMMARY_FILE), "evolved": evolved, "transfer_command": command}


# --------------------------------------------------------------------------------------------------------------
# a multirun of searches: evolution against random search

def write_comparison(sweep_dir: Path) -> Path | None:
    """``comparison.md`` and ``progress.png`` over the completed searches under ``sweep_dir``: per strategy, the
    best mean proxy score of each run (all runs' candidates counted alike) and their median, runs where nothing
    passed included (ranked lowest)."""
    runs: dict[str, list[tuple[Path, dict, list]]] = {}
    references: dict[str, list[float]] = {}
    for path in sorted(sweep_dir.glob(f"*/{SUMMARY_FILE}")):
        summary = json.loads(path.read_text())
        entries = History(path.parent).entries
        runs.setdefault(summary["strategy"], []).append((path.parent, summary, best_so_far(entries)))
        for name, score in reference_means(entries).items():
            references.setdefault(name, []).append(score)
    if not runs:
        return None
    lines = ["# Evolution against random search", "",
             "Best mean proxy top-1 (over the anchors) among each run's candidates, at equal budgets. A run where no "
             "candidate passed every protocol has no score and ranks lowest; the median is the lower middle run.", "",
             "| strategy | runs | best mean proxy score per run (seed) | median | candidates per run |",
             "|---|---|---|---|---|"]
    for strategy, found in runs.items():
        bests = [s["best_proxy_mean"] for _, s, _ in found]
        per_run = ", ".join(f"{'none passed' if b is None else f'{b:.4f}'} (s{s['seed']})"
                            for b, (_, s, _) in zip(bests, found))
        middle = sorted(bests, key=lambda b: -1.0 if b is None else b)[(len(bests) - 1) // 2]
        lines.append(f"| {strategy} | {len(found)} | {per_run} | {'none passed' if middle is None else f'{middle:.4f}'} | "
                     f"{', '.join(str(s['sampled']) for _, s, _ in found)} |")
    (sweep_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    write_progress(sweep_dir / "progress.png",
                   {k: [(f"seed {s['seed']}", c) for _, s, c in v] for k, v in runs.items()},
                   {name: statistics.fmean(scores) for name, scores in references.items()})
    return sweep_dir / "comparison.md"


class ComparisonCallback(Callback):
    """At the end of a multirun of searches: comparison.md and progress.png in the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        written = write_comparison(Path(config.hydra.sweep.dir))
        if written:
            log.info("evolution against random search: %s", written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a search's outputs again from its history.jsonl")
    parser.add_argument("search_dir", type=Path)
    args = parser.parse_args(argv)
    record = json.loads((args.search_dir / "search.json").read_text())
    write_outputs(args.search_dir, History(args.search_dir).entries, OmegaConf.create(record["config"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
