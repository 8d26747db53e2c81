"""Memory of a converted model against the same model with the project's layers built in directly.

torchvision's MobileNetV2 converted to each layer (``evonorm.convert``, as ``task.model.arch=torchvision:mobilenet_v2``
builds it) against the project's own MobileNetV2 (``tasks/classification/models.py``: torchvision's widths, the
norm-act factory at every norm position, ``apply_act=False`` in the linear bottlenecks, where the conversion puts it
too): one training step each, every case in its own child process of ``benchmarks/models.py`` (peak memory: the
rise of the peak resident set size, or CUDA's ``max_memory_allocated``; saved: the bytes autograd keeps for
backward), the cases interleaved over ``--passes``, medians reported. On CPU the children's glibc maps every block
of 64 KiB or more on its own (``MALLOC_MMAP_THRESHOLD_``), so that a freed tensor leaves the resident set and its
peak follows the live tensors, not what the allocator kept from the warm-up step. Prints, per layer, converted / built-in for
peak memory, saved bytes and step time, and both parameter counts (no parameter duplicated, none left behind).

    python benchmarks/convert_memory.py                         # bn_relu,gn_relu,b0,s0, batch 32 x 64 px, CPU
    python benchmarks/convert_memory.py --layers b0,s0 --batch 64 --size 112 --passes 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
import evonorm  # noqa: E402
from benchmarks.layers import EVONORM_NAMES  # noqa: E402
from tasks.classification.models import build_model  # noqa: E402

MODELS = {"converted": "torchvision:mobilenet_v2", "built-in": "mobilenet_v2"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="bn_relu,gn_relu,b0,s0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per child, after one warm-up step")
    parser.add_argument("--passes", type=int, default=2, help="passes over all cases, interleaved")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    layers = args.layers.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.passes):
        for layer in layers:
            for kind, arch in MODELS.items():
                spec = dict(arch=arch, layer=layer, impl="fast" if layer in EVONORM_NAMES else "torch",
                            batch=args.batch, size=args.size, steps=args.steps, device=args.device)
                print(f"{layer} {kind} ...", file=sys.stderr, flush=True)
                out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "models.py"), "--child",
                                      json.dumps(spec)], stdout=subprocess.PIPE, text=True, check=True,
                                     env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)})
                runs.setdefault((layer, kind), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    median = {case: {k: statistics.median(r[k] for r in rs) for k in ("step_ms", "peak_bytes", "saved_bytes")}
              for case, rs in runs.items()}
    print(f"MobileNetV2 (1000 classes), batch {args.batch} x {args.size}px, {args.device}, {args.passes} passes: "
          f"{MODELS['converted']} converted / {MODELS['built-in']} built with the layer")
    print(f"{'layer':8} {'params conv.':>12} {'built-in':>9} {'peak MB':>8} {'built-in':>9} {'x':>5} "
          f"{'saved MB':>8} {'built-in':>9} {'x':>5} {'step ms':>8} {'built-in':>9} {'x':>5}")
    for layer in layers:
        params = {kind: sum(p.numel() for p in build_model(arch, evonorm.norm_act_factory(layer), 1000).parameters())
                  for kind, arch in MODELS.items()}
        conv, ours = median[(layer, "converted")], median[(layer, "built-in")]
        cells = []
        for key, scale, spec in (("peak_bytes", 2**20, ".1f"), ("saved_bytes", 2**20, ".1f"), ("step_ms", 1, ".0f")):
            cells += [format(conv[key] / scale, spec), format(ours[key] / scale, spec),
                      f"{conv[key] / ours[key]:.2f}" if ours[key] else ""]
        print(f"{layer:8} {params['converted']:12d} {params['built-in']:9d} {cells[0]:>8} {cells[1]:>9} "
              f"{cells[2]:>5} {cells[3]:>8} {cells[4]:>9} {cells[5]:>5} {cells[6]:>8} {cells[7]:>9} {cells[8]:>5}")


if __name__ == "__main__":
    main()
