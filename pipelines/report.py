"""The transfer report: how each norm-act layer does on every task, from the ``results.json`` records of sweeps.

    python -m pipelines.report <sweep dir> [<sweep dir> ...] [--reference bn_relu] [--out DIR] [--wandb]

Writes ``transfer.md``, ``transfer.csv`` and ``transfer.png`` (also at the end of every multirun, see
pipelines/sweep.py). A task's headline is ``test/<its monitor without "val/">`` (top-1, mask AP, FID, ...) with the
task's mode (higher or lower is better), read from the records, so a new task needs nothing here. Architecture is a
dimension: a task whose records ran several architectures (``task.model.arch=a,b``, and its ``task.model.kwargs``)
gets a column per architecture ("classification @ torchvision:mobilenet_v2"), each ranked on its own, so one table
says which layer wins on which network. The newest record wins per task, architecture, layer and seed; failed, dead
(killed), running and missing runs are shown, never dropped.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.records import RESULTS_FILE, config_changes, describe_changes, effective_status, read_record
from tasks.common.checks import first_of
from tasks.common.library_models import model_name

log = logging.getLogger(__name__)
NOT_COMPLETED = ("failed", "dead", "running", "missing", "no metric", "non-finite")
NOISE_MARK, UNKNOWN_SPREAD_MARK = "≈", "?"
SPIKE_MARK = "†"  # a run of the cell had a training-loss spike (results.json "divergence"): not a smooth run
ERROR_CHARS = 300  # an unfinished run's error in transfer.md, cut to this (its results.json has it whole)
NOISE_WASH = 0.7  # how far a within-noise cell's colour is blended to white: a noise difference should not glow


@dataclass
class Headline:
    """A column of the report: a task (on one architecture, where its records ran several)."""
    task: str
    metric: str | None  # e.g. test/acc1; None when no record of the task names its monitor
    mode: str = "max"
    arch: str | None = None  # task.model.arch (with its kwargs) of the column's records
    several_archs: bool = False  # the task has a column per architecture: the name says which

    @property
    def name(self) -> str:
        return f"{self.task} @ {self.arch}" if self.several_archs else self.task

    @property
    def direction(self) -> str:
        return "higher is better" if self.mode == "max" else "lower is better"


@dataclass
class Cell:
    """One layer on one task: the headline of each completed seed and what happened to the other seeds."""
    values: list[float] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    delta: float | None = None  # mean - reference mean, in the metric's units
    within_noise: bool | None = None  # None: fewer than two seeds on one side, spread unknown
    relative_gain_pct: float | None = None  # change vs the reference in %, positive = better (mode-aware)
    rank: int | None = None
    spiked: list[dict] = field(default_factory=list)  # the records of its completed runs with a loss spike

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def outcome_text(self) -> str:
        return ", ".join(f"{self.outcomes[k]} {k}" for k in ("completed", *NOT_COMPLETED) if self.outcomes[k])


@dataclass
class TransferReport:
    headlines: list[Headline]
    norms: list[str]
    cells: dict[tuple[str, str], Cell]  # (norm, column name)
    reference: str
    seeds: list
    messages: list[str]
    runs: dict[str, dict]  # column name -> mean steps, epochs, wall time of its completed runs
    unfinished: list[dict]  # the records of failed, dead and running runs, in grid order

    def cell(self, norm: str, column: str) -> Cell:
        """The cell of a layer in a column (a task's name, or "<task> @ <arch>" where it ran several)."""
        return self.cells[(norm, column)]

    def mean_rank(self, norm: str) -> tuple[float | None, int]:
        ranks = [self.cell(norm, h.name).rank for h in self.headlines if self.cell(norm, h.name).rank is not None]
        return (statistics.fmean(ranks) if ranks else None), len(ranks)

    def unfinished_count(self) -> int:
        return sum(c.outcomes[k] for c in self.cells.values() for k in NOT_COMPLETED)


def architecture(record: dict) -> str | None:
    """The architecture a record's config asked for (``task.model.arch`` with its ``kwargs``; None for a task
    without one, or a record without its config): known also for a run that failed before building its model."""
    model = ((record.get("config") or {}).get("task") or {}).get("model") or {}
    return model_name(model["arch"], model.get("kwargs")) if "arch" in model else None


def collect_records(dirs: list[Path]) -> list[dict]:
    """Every record under ``dirs``, the newest per (task, architecture, layer, seed), with its effective status;
    each lists in ``_superseded`` the older records of its key that ran another configuration (a sweep over another
    key)."""
    by_key: dict[tuple, list[dict]] = {}
    for root in dirs:
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{root} is not a directory; pass sweep dirs (e.g. outputs/multirun/<time>)")
        for path in sorted(Path(root).rglob(RESULTS_FILE)):
            record = read_record(path.parent)
            if not record or "task" not in record or "norm" not in record:
                continue
            record["_status"] = effective_status(record)
            record["_dir"] = str(path.parent)
            record["_time"] = record.get("started_at") or path.stat().st_mtime
            record["_arch"] = architecture(record)
            key = (record["task"], record["_arch"], record["norm"]["name"], record.get("seed"))
            by_key.setdefault(key, []).append(record)
    newest = []
    for records in by_key.values():
        *older, latest = sorted(records, key=lambda r: r["_time"])  # stable: of equal times, the later path
        latest["_superseded"] = [(r, changed) for r in older if (changed := config_differences(r, latest))]
        newest.append(latest)
    return newest


def config_differences(old: dict, new: dict) -> dict:
    if old.get("config") is None or new.get("config") is None:
        return {}
    return config_changes(old["config"], new["config"])[0]


def superseded_note(records: list[dict]) -> str | None:
    left_out = [f"`{r['_dir']}` for `{latest['_dir']}` (differs in {describe_changes(changed)})"
                for latest in records for r, changed in latest["_superseded"]]
    if not left_out:
        return None
    return (f"{len(left_out)} record(s) left out for a newer one of the same task, architecture, layer and seed "
            f"that ran another configuration: {first_of(left_out, sep='; ')}. The table has a row per layer and a "
            "column per task and architecture: to compare the values of another key, report each value's runs apart "
            "(python -m pipelines.report <their run dirs>)")


def in_order_of_first_run(records: list[dict], key) -> list[str]:
    """Values in a sweep's grid order (its job numbers, then start times), not alphabetically."""
    first: dict[str, tuple] = {}
    for record in records:
        job = record.get("sweep_job")
        order = (float("inf") if job is None else job, record["_time"])
        first[key(record)] = min(first.get(key(record), order), order)
    return sorted(first, key=first.get)


def report_columns(records: list[dict]) -> list[Headline]:
    """A column per task, in grid order, or per task and architecture where the task's records ran several."""
    tasks = in_order_of_first_run(records, lambda r: r["task"])
    archs = in_order_of_first_run(records, lambda r: (r["task"], r["_arch"]))
    headlines = []
    for task in tasks:
        named = [r for r in records if r["task"] == task and r.get("monitor")]
        latest = max(named, key=lambda r: r["_time"]) if named else None
        metric = "test/" + latest["monitor"].removeprefix("val/") if latest else None
        mode = (latest.get("mode") if latest else None) or "max"
        task_archs = [arch for t, arch in archs if t == task]
        headlines += [Headline(task, metric, mode, arch, len(task_archs) > 1) for arch in task_archs]
    return headlines


def rank_cells(cells: list[Cell], mode: str) -> None:
    """Competition ranking (1 = best; ties share the better rank) over the cells that have a value."""
    scored = [c for c in cells if c.mean is not None]
    for c in scored:
        c.rank = 1 + sum((o.mean > c.mean) if mode == "max" else (o.mean < c.mean) for o in scored)


def compare_to_reference(cell: Cell, ref: Cell, mode: str) -> None:
    if cell.mean is None or ref.mean is None:
        return
    cell.delta = cell.mean - ref.mean
    if cell.std is not None and ref.std is not None:
        cell.within_noise = abs(cell.delta) < max(cell.std, ref.std)
    if ref.mean != 0:
        cell.relative_gain_pct = 100 * cell.delta / abs(ref.mean) * (1 if mode == "max" else -1)


def build_report(records: list[dict], reference: str = "bn_relu") -> TransferReport:
    norms = sorted(in_order_of_first_run(records, lambda r: r["norm"]["name"]), key=lambda n: n != reference)
    seeds = sorted({r.get("seed") for r in records}, key=str)
    headlines = report_columns(records)
    cells = {(n, h.name): Cell() for n in norms for h in headlines}
    by_key = {(r["norm"]["name"], r["task"], r["_arch"], r.get("seed")): r for r in records}
    messages = []
    for h in headlines:
        if h.metric is None:
            messages.append(f"task {h.name}: no record names its monitor metric (every run failed before its task "
                            "was built, or records from before monitor/mode were recorded), so it has no headline; "
                            "see the runs that did not complete, or re-run it with the current code")
        for n in norms:
            cell = cells[(n, h.name)]
            for seed in seeds:
                record = by_key.get((n, h.task, h.arch, seed))
                if record is None:
                    cell.outcomes["missing"] += 1
                elif record["_status"] != "completed":
                    cell.outcomes[record["_status"]] += 1
                elif h.metric is None or h.metric not in record.get("test", {}):
                    cell.outcomes["no metric"] += 1
                elif not math.isfinite(float(record["test"][h.metric])):
                    cell.outcomes["non-finite"] += 1
                else:
                    cell.outcomes["completed"] += 1
                    cell.values.append(float(record["test"][h.metric]))
                    if spike_count(record):
                        cell.spiked.append(record)
        column = [cells[(n, h.name)] for n in norms]
        rank_cells(column, h.mode)
        if reference in norms:
            for cell in column:
                compare_to_reference(cell, cells[(reference, h.name)], h.mode)
    with_values = [n for n in norms if any(cells[(n, h.name)].values for h in headlines)]
    if reference not in with_values:
        messages.append(f"reference layer {reference!r} has no completed run here, so there are no differences "
                        f"to it; layers with results: {', '.join(with_values) or 'none'}. Pick one with "
                        "--reference <layer> (or report.reference=<layer> in a sweep)")
    else:
        messages += [f"task {h.name}: the reference {reference!r} has no completed run, no differences shown"
                     for h in headlines if h.metric and not cells[(reference, h.name)].values]
    messages += filter(None, [superseded_note(records)])
    unfinished = sorted((r for r in records if r["_status"] != "completed"),
                        key=lambda r: (float("inf") if r.get("sweep_job") is None else r["sweep_job"], r["_time"]))
    return TransferReport(headlines, norms, cells, reference, seeds, messages, runs_summary(records, headlines),
                          unfinished)


def runs_summary(records: list[dict], headlines: list[Headline]) -> dict[str, dict]:
    """The budget each column had, as run: mean steps, epochs and wall time of its completed records."""
    summary = {}
    for h in headlines:
        done = [r for r in records if (r["task"], r["_arch"]) == (h.task, h.arch) and r["_status"] == "completed"]
        if done:
            summary[h.name] = {k: statistics.fmean(float(r.get(k) or 0) for r in done)
                               for k in ("steps", "epochs", "wall_time_s")}
    return summary


def spike_count(record: dict) -> int:
    return int((record.get("divergence") or {}).get("spikes") or 0)


def spike_text(record: dict) -> str:
    """A run's loss spikes in one line: how many, and the worst."""
    divergence = record["divergence"]
    worst = max(divergence["events"], key=lambda e: e["ratio"])
    return (f"{divergence['spikes']} spike(s), worst at step {worst['peak_step']}: {worst['loss']} = "
            f"{worst['value']:.4g}, {worst['ratio']:.1f}x its running median {worst['level']:.4g}")


def fmt(value: float | None, spec: str = ".4g") -> str:
    return "" if value is None else format(value, spec)


def noise_mark(cell: Cell) -> str:
    return UNKNOWN_SPREAD_MARK if cell.within_noise is None else NOISE_MARK if cell.within_noise else ""


def delta_text(report: TransferReport, norm: str, cell: Cell) -> str:
    if norm == report.reference:
        return "ref"
    return "n/a" if cell.delta is None else f"{cell.delta:+.3g}{noise_mark(cell)}"


def heat_map_text(report: TransferReport, norm: str, cell: Cell) -> str:
    if cell.mean is None:
        return cell.outcome_text() or "missing"
    spikes = SPIKE_MARK if cell.spiked else ""
    if norm == report.reference:
        return "reference" + spikes
    return "n/a" if cell.relative_gain_pct is None else \
        f"{cell.relative_gain_pct:+.1f}% {noise_mark(cell)}".strip() + spikes


def mean_rank_text(report: TransferReport, norm: str) -> str:
    mean_rank, ranked = report.mean_rank(norm)
    if mean_rank is None:
        return ""
    return f"{mean_rank:.2f}" + ("" if ranked == len(report.headlines) else f" ({ranked} columns)")


def value_text(cell: Cell) -> str:
    if cell.mean is None:
        return cell.outcome_text() or "missing"
    text = f"{cell.mean:.4g}" + (f" ± {cell.std:.2g}" if cell.std is not None else "") + f" (n={len(cell.values)})" \
        + (f" {SPIKE_MARK}{len(cell.spiked)}" if cell.spiked else "")
    problems = ", ".join(f"{cell.outcomes[k]} {k}" for k in NOT_COMPLETED if cell.outcomes[k])
    return text + (f"; {problems}" if problems else "")


def column_name(report: TransferReport, record: dict) -> str:
    return next(h.name for h in report.headlines if (h.task, h.arch) == (record["task"], record["_arch"]))


def unfinished_text(record: dict) -> str:
    status = record["_status"]
    if status == "dead":
        return (f"dead (killed: its process is gone or its heartbeat stopped) at step {record.get('steps')}; "
                "a re-run into its dir resumes it")
    if status == "running":
        return f"running (pid {record.get('pid')} on {record.get('host')})"
    error = " ".join(str(record.get("error") or "no error recorded").split())
    return f"{status}: {error[:ERROR_CHARS]}" + ("..." if len(error) > ERROR_CHARS else "")


def markdown(report: TransferReport) -> str:
    header = ["layer"]
    for h in report.headlines:
        header += [f"{h.name}: {h.metric or 'no headline'} ({h.direction})", f"Δ vs {report.reference}", "rank"]
    header.append("mean rank")
    lines = ["# Transfer report", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for norm in report.norms:
        row = [norm]
        for h in report.headlines:
            cell = report.cell(norm, h.name)
            row += [value_text(cell), delta_text(report, norm, cell), fmt(cell.rank, "d")]
        row.append(mean_rank_text(report, norm))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Mean ± sample std over seeds (n = completed seeds of {len(report.seeds)}: "
                  f"{', '.join(map(str, report.seeds))}); rank 1 = best per task; Δ in the metric's units.",
              f"{NOISE_MARK}: |Δ| is smaller than the larger seed std of the two layers: noise, not transfer. "
              f"{UNKNOWN_SPREAD_MARK}: fewer than two seeds on one side, the seed spread is unknown. "
              f"{SPIKE_MARK}n: n of the cell's runs had a training-loss spike (they diverged, and may have recovered): "
              "their values are not those of smooth runs, see below.", ""]
    for task, runs in report.runs.items():
        lines.append(f"- {task}: {runs['steps']:.0f} steps, {runs['epochs']:.3g} epochs, "
                     f"{runs['wall_time_s']:.0f} s per completed run (mean)")
    spiked = [(h.name, n, r) for n in report.norms for h in report.headlines for r in report.cell(n, h.name).spiked]
    if spiked:
        lines += ["", f"Runs with a training-loss spike ({SPIKE_MARK}):"]
        lines += [f"- {task} / {norm} / seed {r.get('seed')}: {spike_text(r)} (`{r['_dir']}`)" for task, norm, r in spiked]
    if report.unfinished:
        lines += ["", "Runs that did not complete:"]
        lines += [f"- {column_name(report, r)} / {r['norm']['name']} / seed {r.get('seed')}: {unfinished_text(r)} "
                  f"(`{r['_dir']}`)" for r in report.unfinished]
    lines += [f"\n**Note:** {m}" for m in report.messages]
    return "\n".join(lines) + "\n"


def table_rows(report: TransferReport) -> tuple[list[str], list[list]]:
    columns = ["layer"]
    for h in report.headlines:
        columns += [f"{h.name}.{k}" for k in ("metric", "mode", "mean", "std", "n", "delta", "within_noise",
                                                "relative_gain_pct", "rank", "outcomes", "spiked_runs")]
    columns += ["mean_rank", "tasks_ranked"]
    rows = []
    for norm in report.norms:
        row = [norm]
        for h in report.headlines:
            c = report.cell(norm, h.name)
            row += [h.metric, h.mode, c.mean, c.std, len(c.values), c.delta, c.within_noise, c.relative_gain_pct,
                    c.rank, c.outcome_text(), len(c.spiked)]
        rows.append(row + list(report.mean_rank(norm)))
    return columns, rows


def write_csv(report: TransferReport, path: Path) -> None:
    columns, rows = table_rows(report)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def heat_map_colours(report: TransferReport):
    """RGBA per (layer, task) cell and the colour scale: green = better than the reference, red = worse; a cell
    within seed noise is washed towards white, one without a value is light grey."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import SymLogNorm

    cells = [[report.cell(n, h.name) for h in report.headlines] for n in report.norms]
    gains = np.array([[c.relative_gain_pct for c in row] for row in cells], dtype=float)
    limit = max(1.0, float(np.nanmax(np.abs(gains))) if np.isfinite(gains).any() else 1.0)
    # symmetric log colour scale: a 0.5% change in top-1 stays visible beside a 20% change in FID
    colour_scale = SymLogNorm(linthresh=1.0, vmin=-limit, vmax=limit)
    rgba = matplotlib.colormaps["RdYlGn"](colour_scale(np.nan_to_num(gains)))
    noise = np.array([[c.within_noise is True for c in row] for row in cells], dtype=bool)
    rgba[noise, :3] += NOISE_WASH * (1.0 - rgba[noise, :3])
    rgba[~np.isfinite(gains)] = (0.85, 0.85, 0.85, 1.0)
    return rgba, colour_scale


def write_png(report: TransferReport, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.cm import ScalarMappable

    tasks, norms = report.headlines, report.norms
    fig = plt.figure(figsize=(max(7.0, 3.4 * len(tasks)), 3.2 + 0.45 * len(norms) + 3.4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0 + 0.14 * len(norms), 1.3])
    rgba, colour_scale = heat_map_colours(report)
    ax = top.subplots()
    ax.imshow(rgba, aspect="auto")
    # an architecture column's name goes on a line of its own: side by side, long names would run into each other
    ax.set_xticks(range(len(tasks)), [f"{h.name.replace(' @ ', chr(10) + '@ ')}\n{h.metric or 'no headline'} "
                                      f"({h.direction})" for h in tasks])
    ax.set_yticks(range(len(norms)), norms)
    for i, norm in enumerate(norms):
        for j, h in enumerate(tasks):
            dark = rgba[i, j, :3].mean() < 0.45
            ax.text(j, i, heat_map_text(report, norm, report.cell(norm, h.name)), ha="center", va="center",
                    fontsize=9, color="white" if dark else "black")
    top.colorbar(ScalarMappable(colour_scale, "RdYlGn"), ax=ax,
                 label=f"change vs {report.reference} (%, symlog), green = better")
    ax.set_title(f"Relative change vs {report.reference} per task ({NOISE_MARK} within seed spread: pale, "
                 f"{UNKNOWN_SPREAD_MARK} one seed, {SPIKE_MARK} a run had a loss spike)")
    for ax, h in zip(np.atleast_1d(bottom.subplots(1, len(tasks))), tasks):
        cells = [report.cell(n, h.name) for n in norms]
        means = [c.mean if c.mean is not None else np.nan for c in cells]
        errors = [np.nan if c.std is None else c.std for c in cells]  # one seed: no bar, not a zero spread
        colors = ["0.55" if n == report.reference else "tab:blue" for n in norms]
        ax.bar(range(len(norms)), np.nan_to_num(means), yerr=errors, color=colors, capsize=4)
        finite = [m for m in means if np.isfinite(m)]
        if finite:  # zoom on the values: the differences are what matters
            low, high = min(finite), max(finite)
            pad = max(0.15 * (high - low), np.nanmax(errors + [0.0]) * 1.5, 0.02 * abs(high) or 0.01)
            ax.set_ylim(low - pad, high + pad)
        for x, (cell, mean) in enumerate(zip(cells, means)):
            if not np.isfinite(mean):
                ax.text(x, 0.02, cell.outcome_text() or "missing", rotation=90, ha="center", va="bottom",
                        transform=ax.get_xaxis_transform(), fontsize=8, color="tab:red")
        ax.set_xticks(range(len(norms)), norms, rotation=30)
        ax.set_title(f"{h.name}: {h.metric or 'no headline'}\n({h.direction}; mean ± std over seeds)", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_wandb(report: TransferReport, out_dir: Path, logger_cfg) -> None:
    """The table and the picture as one wandb run (job type ``report``) in the sweep's group."""
    import wandb

    from pipelines.loggers import start_wandb, wandb_mode

    columns, rows = table_rows(report)
    run = start_wandb(wandb_mode(logger_cfg.get("mode")), project=logger_cfg.get("project"),
                      entity=logger_cfg.get("entity"), group=logger_cfg.get("group") or out_dir.name,
                      name="transfer-report", job_type="report", dir=str(out_dir))
    try:
        run.log({"transfer/table": wandb.Table(columns=columns, data=[[str(v) for v in r] for r in rows]),
                 "transfer/chart": wandb.Image(str(out_dir / "transfer.png"))})
    finally:
        run.finish()


def write_report(dirs: list[Path], out_dir: Path, reference: str = "bn_relu", wandb_logger=None) -> TransferReport:
    records = collect_records([Path(d) for d in dirs])
    if not records:
        raise FileNotFoundError(f"no run records ({RESULTS_FILE}) under {', '.join(map(str, dirs))}; pass sweep or "
                                "run dirs")
    report = build_report(records, reference)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "transfer.md").write_text(markdown(report))
    write_csv(report, out_dir / "transfer.csv")
    if report.headlines:
        write_png(report, out_dir / "transfer.png")
        if wandb_logger is not None:
            log_to_wandb(report, out_dir, wandb_logger)
    for message in report.messages:
        log.warning(message)
    log.info("transfer report: %s", out_dir / "transfer.md")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep (or run) dirs; every results.json below counts")
    parser.add_argument("--reference", default="bn_relu", help="layer the others are compared to (bn_relu)")
    parser.add_argument("--out", type=Path, help="where to write transfer.{md,csv,png} (default: the dir, when one "
                        "is given)")
    parser.add_argument("--wandb", action="store_true", help="also log the table to wandb (offline unless logged in)")
    args = parser.parse_args(argv)
    if len(args.dirs) > 1 and args.out is None:  # the first sweep's own report would be replaced
        parser.error("several dirs: give --out DIR for the report over them")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = write_report(args.dirs, args.out or args.dirs[0], args.reference,
                              {"project": "evonorm-transfer"} if args.wandb else None)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
