"""Model benchmark: one training step (forward, backward, SGD step) of a model per norm-act layer.

Models: a classification model (``--arch preact_resnet50`` ...) on random images and labels, or Mask R-CNN
(``--arch maskrcnn_r50_fpn`` / ``maskrcnn_r18_fpn``: our pre-activation ResNet-FPN with the layer at every norm
position) on random images with three random objects each; for Mask R-CNN torchvision's stock models run too:
``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` as ``torchvision/stock`` (BatchNorm backbone,
TwoMLPHead box head, no norm in FPN or heads) and ``maskrcnn_resnet50_fpn_v2`` as ``torchvision/stock_v2`` (BatchNorm
at every position and a 4conv1fc box head, the design of ours). ``--box-head 2fc`` builds ours with the stock
TwoMLPHead's shape (no convs, two FCs) to isolate the box head's share.

Reports the median step time, peak memory of the step and the bytes autograd saves for backward, each as a ratio
to BN-ReLU measured in the same invocation. On CUDA also where a step's time goes: "host", the time to issue the
step (the host's work: Python, autograd, launches), and "device", the sum of its kernels' durations (torch.profiler):
a step takes about the longer of the two, so the two say whether a layer's cost is in its kernels or on the host.
Every case runs in its own child process, so that its peak memory is its own: CUDA ``max_memory_allocated``, or on
CPU the rise of the peak resident set size over the process's size before the first step. Children run one after
another in ``--passes`` interleaved passes; the median is reported.

    python benchmarks/models.py                                   # ResNet-50, bn_relu/gn_relu/b0/s0, batch 16
    python benchmarks/models.py --layers bn_relu,s0 --batch 8 --size 160
    python benchmarks/models.py --quick                           # tiny smoke run
    python benchmarks/models.py --arch maskrcnn_r50_fpn --batch 2 --size 320 --impls fast
    python benchmarks/models.py --arch maskrcnn_r50_fpn --batch 2 --size 320 --layers bn_relu --box-head 2fc
    python benchmarks/models.py --device cuda --batch 64 --layers bn_relu,b0,s0 --impls fast --autocast bfloat16
    python benchmarks/models.py --device cuda --batch 64 --layers bn_relu,b0,s0 --impls fast --compile
    python benchmarks/models.py --device cuda --batch 64 --layers bn_relu,b0,s0 --impls fast,fast-native

``--impls fast-native``: ``impl="fast"`` with native Triton launches (evonorm.triton_native, CUDA: the layers' default);
``fast`` rows launch from Python.

``--memory-formats contiguous,channels_last``: every case in each memory format of the model's weights and input
(``channels_last=`` of the pipeline), side by side; ratios stay to BN-ReLU in the first format. Library classifiers
too (``--arch torchvision:mobilenet_v2``), e.g. the classification task's default shapes (28 px, 1 channel):

    python benchmarks/models.py --arch torchvision:mobilenet_v2 --layers bn_relu,s0 --impls fast --batch 128 \
        --size 28 --in-chans 1 --memory-formats contiguous,channels_last --steps 6 --passes 2
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
import evonorm  # noqa: E402
from evonorm import triton_native  # noqa: E402
from benchmarks.layers import BASELINE, EVONORM_NAMES, refuse_fallbacks, saved_bytes  # noqa: E402
from tasks.classification.models import build_model  # noqa: E402
from tasks.maskrcnn.model import build_maskrcnn  # noqa: E402

DETECTORS = {"maskrcnn_r50_fpn": "preact_resnet50", "maskrcnn_r18_fpn": "preact_resnet18"}
STOCK = {("torchvision", "stock"): "maskrcnn_resnet50_fpn", ("torchvision", "stock_v2"): "maskrcnn_resnet50_fpn_v2"}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
BOX_HEADS = {"4conv1fc": {"box_head_convs": 4, "box_head_fcs": 1}, "2fc": {"box_head_convs": 0, "box_head_fcs": 2}}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_rss_peak() -> None:
    """Linux: the process's peak resident size (VmHWM) restarts from its current size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def classifier_case(arch: str, layer: str, impl: str, batch: int, size: int, dev: torch.device, in_chans: int = 3):
    """(model, input, loss of the model's output)."""
    kwargs = {"impl": impl} if impl != "torch" else {}
    model = build_model(arch, evonorm.norm_act_factory(layer, **kwargs), 1000, in_chans=in_chans)
    x = torch.randn(batch, in_chans, size, size, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    return model, x, lambda out: torch.nn.functional.cross_entropy(out, y)


def detector_case(arch: str, layer: str, impl: str, batch: int, size: int, dev: torch.device,
                  box_head: str = "4conv1fc"):
    """(model, [images, targets], summed losses); the COCO defaults of our model at ``size`` px, 81 classes."""
    if (layer, impl) in STOCK:
        from torchvision.models import detection
        model = getattr(detection, STOCK[layer, impl])(weights=None, weights_backbone=None, min_size=size,
                                                       max_size=size)
    else:
        kwargs = {"impl": impl} if impl != "torch" else {}
        model = build_maskrcnn(evonorm.norm_act_factory(layer, **kwargs), 81, DETECTORS[arch],
                               train_sizes=(size,), test_size=size, max_size=size, **BOX_HEADS[box_head])
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=gen).to(dev) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        corner = torch.rand(3, 2, generator=gen) * size * 0.6
        boxes = torch.cat([corner, corner + size * (0.1 + 0.3 * torch.rand(3, 2, generator=gen))], 1).round()
        masks = torch.zeros(3, size, size, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            m[y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes.to(dev), "labels": torch.randint(1, 81, (3,), generator=gen).to(dev),
                        "masks": masks.to(dev)})
    return model, [images, targets], lambda losses: sum(losses.values())


def measure(arch: str, layer: str, impl: str, batch: int, size: int, steps: int, device: str,
            autocast: str | None = None, box_head: str = "4conv1fc", host_profile: bool = False,
            compile: bool = False, memory_format: str = "contiguous", in_chans: int = 3) -> dict:
    """Runs in the child: build, one warm-up step, ``steps`` timed steps; times in ms, memory in bytes. ``autocast``
    names the dtype of a ``torch.autocast`` region around the forward and the loss (mixed precision);
    ``host_profile`` prints where the host's time of one more step goes; ``compile`` compiles the model in place
    (``nn.Module.compile``; Mask R-CNN: its backbone and FPN, as ``compile=true`` does in the pipeline), and the
    warm-up step's time, which includes compiling, is reported as ``compile_s``; ``memory_format=channels_last``: the
    model's 4-d weights and a classifier's input channels-last. Saved bytes and peak memory are the
    model's as timed (compiled, in its precision), the peak over the timed steps only."""
    dev = torch.device(device)
    torch.manual_seed(0)
    triton_native.set_launch("native" if impl == "fast-native" else "python")  # "fast": launches from Python
    impl = "fast" if impl == "fast-native" else impl
    detector = arch in DETECTORS
    if detector:
        model, x, loss_of = detector_case(arch, layer, impl, batch, size, dev, box_head)
    else:
        model, x, loss_of = classifier_case(arch, layer, impl, batch, size, dev, in_chans)
    layout = MEMORY_FORMATS[memory_format]
    model = model.to(dev, memory_format=layout).train()
    if not detector:
        x = x.contiguous(memory_format=layout)
    optimizer = torch.optim.SGD(evonorm.param_groups_weight_decay(model, 1e-4), lr=0.01, momentum=0.9)
    args = x if isinstance(x, list) else [x]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def mixed_precision():
        return torch.autocast(dev.type, dtype=getattr(torch, autocast or "float32"), enabled=autocast is not None)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with mixed_precision():
            loss = loss_of(model(*args))
        loss.backward()
        optimizer.step()

    if compile:
        (model.backbone if detector else model).compile()
    cuda = dev.type == "cuda"
    sync()
    start = time.perf_counter()
    step()  # warms up (and compiles)
    sync()
    warm_up_s = time.perf_counter() - start
    refuse_fallbacks()
    with mixed_precision():  # what the model as measured keeps: compiled, in the step's precision
        saved = 0 if detector else saved_bytes(model, x)  # detection: RoI sampling varies per call
    # peaks from here on: not the warm-up's (compiling takes far more host memory than a step)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)
    else:
        reset_rss_peak()
        base_rss = rss_bytes()
    times, host_times = [], []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        issued = time.perf_counter()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        host_times.append((issued - start) * 1e3)
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev) - base_cuda
    else:
        peak = max(0, rss_peak_bytes() - base_rss)
    if host_profile:
        print_host_profile(step, f"{layer}/{impl}", cuda)
    return {"step_ms": statistics.median(times), "host_ms": statistics.median(host_times) if cuda else None,
            "device_ms": device_ms(step) if cuda else None, "peak_bytes": peak, "saved_bytes": saved,
            "compile_s": warm_up_s if compile else None}


def device_ms(step) -> float:
    """Device time of one CUDA step: the sum of its kernels' durations, without the gaps between them."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e3


def print_host_profile(step, label: str, cuda: bool) -> None:
    """Prints (to stderr) one step's operators, and on CUDA its runtime calls (launches, allocations,
    synchronisations), by the host's own time in them: where a host-bound step's time goes."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    print(f"--- host profile of one step, {label}", file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50),
          file=sys.stderr)


def cases(layers: list[str], impls: list[str], detector: bool = False) -> list[tuple[str, str]]:
    out = [BASELINE]
    for name in layers:
        if name in EVONORM_NAMES:
            out += [(name, impl) for impl in impls]
        elif (name, "torch") != BASELINE:
            out.append((name, "torch"))
    return out + list(STOCK) if detector else out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="preact_resnet50")
    parser.add_argument("--layers", default="bn_relu,gn_relu,b0,s0")
    parser.add_argument("--impls", default="fast,reference", help="EvoNorm implementations to run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per child, after one warm-up step")
    parser.add_argument("--passes", type=int, default=1, help="passes over all cases, interleaved")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], default=None,
                        help="mixed precision: forward and loss under torch.autocast with this dtype")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (Mask R-CNN: backbone and FPN); compile_s: the first step")
    parser.add_argument("--host-profile", action="store_true",
                        help="print each case's operators (and CUDA runtime calls) by host time, one step")
    parser.add_argument("--box-head", choices=list(BOX_HEADS), default="4conv1fc",
                        help="box head of our Mask R-CNN (the stock models keep theirs)")
    parser.add_argument("--json", type=Path, default=None,
                        help="output path (default benchmarks/results/models-<arch>-<device>.json)")
    parser.add_argument("--memory-formats", default="contiguous",
                        help="contiguous, channels_last or both (every case in each, side by side)")
    parser.add_argument("--in-chans", type=int, default=3, help="classifiers: input channels")
    parser.add_argument("--quick", action="store_true", help="tiny model input, a smoke run of a few seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return None
    if args.quick:
        args.arch, args.batch, args.size, args.steps = "preact_resnet_cifar", 4, 32, 1
    unknown = set(args.layers.split(",")) - set(evonorm.NORM_ACT_NAMES)
    if unknown:
        raise SystemExit(f"unknown layers {sorted(unknown)}; valid: {', '.join(evonorm.NORM_ACT_NAMES)}")

    formats = args.memory_formats.split(",")
    if set(formats) - set(MEMORY_FORMATS):
        raise SystemExit(f"--memory-formats {args.memory_formats}: choose from contiguous, channels_last")
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for _ in range(args.passes):
        for layer, impl in cases(args.layers.split(","), args.impls.split(","), args.arch in DETECTORS):
            for memory_format in formats:
                spec = dict(arch=args.arch, layer=layer, impl=impl, batch=args.batch, size=args.size,
                            steps=args.steps, device=args.device, autocast=args.autocast, box_head=args.box_head,
                            host_profile=args.host_profile, compile=args.compile, memory_format=memory_format,
                            in_chans=args.in_chans)
                print(f"{layer}/{impl}/{memory_format} ...", file=sys.stderr, flush=True)
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                                     text=True, check=True)  # the child's warnings (a fallback, say) reach stderr
                runs.setdefault((layer, impl, memory_format), []).append(
                    json.loads(out.stdout.strip().splitlines()[-1]))

    results = [{"layer": layer, "impl": impl, "memory_format": memory_format,
                **{k: None if rs[0][k] is None else statistics.median(r[k] for r in rs) for k in rs[0]}}
               for (layer, impl, memory_format), rs in runs.items()]
    base = results[0]
    for r in results:
        for key in ("step_ms", "device_ms", "peak_bytes", "saved_bytes"):
            r[key.split("_")[0] + "_ratio"] = r[key] / base[key] if base[key] else None
    precision = f"autocast {args.autocast}" if args.autocast else "float32"
    compiled = ", compiled" if args.compile else ""
    print(f"{args.arch}, batch {args.batch} x {args.size}px, {args.device}, {precision}{compiled}, ratios to bn_relu"
          f" ({formats[0]}):")
    print(f"{'layer':11} {'impl':9} {'format':13} {'step ms':>9} {'x':>6} {'host ms':>8} {'device ms':>9} {'x':>6} "
          f"{'peak MB':>9} {'x':>6} {'saved MB':>9} {'x':>6} {'compile s':>9}")
    for r in results:
        fmt = lambda v, spec=".2f": "" if v is None else format(v, spec)  # noqa: E731
        print(f"{r['layer']:11} {r['impl']:9} {r['memory_format']:13} {r['step_ms']:9.1f} {fmt(r['step_ratio']):>6} "
              f"{fmt(r['host_ms'], '.1f'):>8} {fmt(r['device_ms'], '.1f'):>9} {fmt(r['device_ratio']):>6} "
              f"{r['peak_bytes'] / 2**20:9.1f} {fmt(r['peak_ratio']):>6} {r['saved_bytes'] / 2**20:9.1f} "
              f"{fmt(r['saved_ratio']):>6} {fmt(r['compile_s'], '.1f'):>9}")
    suffix = ("-compiled" if args.compile else "") + (f"-{args.autocast}" if args.autocast else "")
    path = args.json or ROOT / "benchmarks" / "results" / f"models-{args.arch}-{args.device}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"arch": args.arch, "batch": args.batch, "size": args.size, "device": args.device,
            "autocast": args.autocast, "compile": args.compile, "memory_formats": formats, "in_chans": args.in_chans,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
