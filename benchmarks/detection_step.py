"""Mask R-CNN train-step time under config variants, side by side in one process, on real batches.

Each variant is a set of Hydra overrides on top of the common ones; its model is built from the composed config as
``run.py`` builds it. With ``--ckpt`` every model starts from a run's checkpoint: a trained model proposes and samples
many more positive RoIs than a fresh one, and the RoI heads' share of a step grows with them, so a late-training
step is only measured from trained weights. A step is the forward and backward of the training losses (no
optimizer update: the weights stay as loaded) on the first training batches of the data module, the variants
alternating batch by batch; the report is the median step time of each and its ratio to the first variant. A
variant may set ``channels_last=true`` (the model's layout, as in a run).

    python benchmarks/detection_step.py norm=b0 --ckpt outputs/runs/maskrcnn/b0/<time>/checkpoints/last.ckpt \\
        --variant task.model.roi_sampling_ratio=2 --variant task.model.roi_sampling_ratio=1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from evonorm import norm_act_factory  # noqa: E402
from pipelines.run import apply_channels_last  # noqa: E402
from tasks import build_task  # noqa: E402
from tasks.maskrcnn.data import collate  # noqa: E402

CONF_DIR = str(ROOT / "conf")


def build_model(overrides: list[str], ckpt: str | None):
    """(model in training mode, its data module)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["task=maskrcnn", "logger=none", *overrides])
    torch.manual_seed(cfg.seed)  # without --ckpt, every variant starts from the same weights where it can
    parts = build_task(cfg.task.name, cfg.task, norm_act_factory(cfg.norm.name, **cfg.norm.kwargs))
    if ckpt:
        parts.module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    apply_channels_last(cfg, parts.module)  # as a run does (e.g. --variant channels_last=true)
    return parts.module.model.train(), parts.datamodule


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides common to all variants (e.g. norm=b0)")
    parser.add_argument("--variant", action="append", default=[],
                        help="space-separated overrides of one variant (repeat the flag; none: one variant)")
    parser.add_argument("--ckpt", help="a maskrcnn run's checkpoint to start every variant from")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant, after two warm-up steps")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variant or [""]
    if data_keys := [o for v in variants for o in v.split() if o.lstrip("+~").startswith("task.data.")]:
        parser.error(f"variants share the first variant's batches: give {', '.join(data_keys)} to all, not one")
    built = [build_model(args.overrides + v.split(), args.ckpt) for v in variants]
    data = built[0][1]
    size = data.batch_size
    count = len(data.train_set)  # a small set is reused from the start
    batches = [collate([data.train_set[i % count] for i in range(b * size, (b + 1) * size)])
               for b in range(args.steps + 2)]
    times = {v: [] for v in variants}
    for index, (images, targets) in enumerate(batches):
        targets = [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]
        for variant, (model, _) in zip(variants, built):
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            sum(model(list(images), targets).values()).backward()
            if index >= 2:  # two warm-up steps
                times[variant].append(time.perf_counter() - start)
    medians = {variant: statistics.median(seconds) for variant, seconds in times.items()}
    print(f"{'variant':60} {'step s':>8} {'x first':>8}")
    for variant, median in medians.items():
        print(f"{variant or '(defaults)':60} {median:8.3f} {median / medians[variants[0]]:8.2f}")
    return medians


if __name__ == "__main__":
    main()
