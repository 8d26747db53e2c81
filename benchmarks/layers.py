"""Norm-act layer benchmark: forward, forward+backward time and bytes saved for backward, as ratios to BN-ReLU.

All layers of one shape run in one process, interleaved (one call of each layer per round), so load from other
processes hits them alike: compare the ratios, not the absolute times, across runs. Layers: every name of
``evonorm.NORM_ACT_NAMES`` (EvoNorms as ``impl="fast"`` under the torch.compile policy ``--compile``, as
"fast-eager" with compilation off, on CPU as "fast-compiled" with compilation on, on CUDA as "fast-native" with
native Triton launches (evonorm.triton_native), and as ``impl="reference"``) and
timm's EvoNorm2d* when timm is installed, all in training mode. "fwd" is a training forward (autograd graph
recorded), "fwd+bwd" adds the backward of a fixed random output gradient; times are medians over the rounds, each
call timed with the host waiting for the device, so on a GPU they include the host's time per call (Python,
launches). On CUDA two more fwd+bwd times: "stream", calls issued back to back without waiting, as a training loop
issues them (CUDA events around STREAM_CALLS calls, per call: the longer of the host's and the device's time per
call), with "host" the host's time per call in that loop; and "graph", the device time alone (replays of a CUDA
graph of the call), for the baseline and the fast EvoNorms. "saved" is the bytes of the distinct tensor storages
autograd keeps for backward (parameters and buffers excluded) divided by the input's bytes.

On Linux the benchmark stops glibc from handing freed memory back to the OS (``mallopt``; ``--malloc-trim`` keeps
the default): otherwise a loop over one layer pays page faults for all its buffers again each iteration, and which
layer pays depends on the heap layout, which swung ratios by 2x between identical runs. Long-running training
processes and caching allocators (CUDA, jemalloc) keep their memory too.

    python benchmarks/layers.py                                  # default shapes, JSON in benchmarks/results/
    python benchmarks/layers.py --quick                          # tiny smoke run
    python benchmarks/layers.py --shapes 32x64x56x56 --layers bn_relu,b0,s0
    python benchmarks/layers.py --device cuda --shapes gpu --dtype bfloat16   # half input, float32 parameters
    python benchmarks/layers.py --device cuda --shapes 32x256x56x56 --layers b0 --profile   # kernel by kernel
    python benchmarks/layers.py --shapes 128x96x14x14,128x576x2x2 --layers bn_relu,b0,s0 --channels-last
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import evonorm  # noqa: E402
from evonorm import fused, triton_native  # noqa: E402

try:
    import timm
    import timm.layers
except ImportError:
    timm = None

EVONORM_NAMES = ("b0", "b1", "b2", "s0", "s1", "s2")
BASELINE = ("bn_relu", "torch")
SHAPE_PRESETS = {
    # ResNet-50 bottleneck widths per stage (56, 28, 14, 7) at batch 32 and 8.
    "r50": ["32x64x56x56", "32x128x28x28", "32x256x14x14", "32x512x7x7",
            "8x64x56x56", "8x128x28x28", "8x256x14x14", "8x512x7x7"],
    "det": ["2x256x100x152"],  # FPN head on the stride-8 level of an 800x1216 image, batch 2
    "biggan": ["8x192x64x64"],  # BigGAN 128x128 generator (ch 96) at its 64x64 block
    "target": ["32x64x56x56"],
    # the GPU table of issue 9 (ResNet-50 stages at batch 32, detection head at 800x1216, BigGAN-size map)
    "gpu": ["32x64x56x56", "32x256x56x56", "32x512x28x28", "32x2048x7x7", "2x256x200x304", "64x192x64x64"],
    "quick": ["4x32x8x8"],
}
STREAM_CALLS = 10  # fwd+bwd calls per timed stream block (CUDA)
SHAPE_PRESETS["default"] = SHAPE_PRESETS["r50"] + SHAPE_PRESETS["det"] + SHAPE_PRESETS["biggan"]


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of trimming it (False where that is not possible)."""
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (m_mmap_threshold, 32 << 20),  # glibc's maximum: larger blocks are always mapped fresh
        (m_trim_threshold, 2**31 - 1),
        (m_top_pad, 256 << 20),
    ))


def refuse_fallbacks() -> None:
    """Stop where a fast path failed in this process: its rows would time the eager stages under its label."""
    if failed := fused.fallbacks():
        raise SystemExit(f"{' and '.join(failed)} failed (see the warning above): the rows of those paths would "
                         "time the eager stages; nothing reported. Fix the cause, or leave those impls out")


def parse_shapes(spec: str) -> list[tuple[int, ...]]:
    names = []
    for item in spec.split(","):
        names += SHAPE_PRESETS.get(item, [item])
    shapes = [tuple(int(d) for d in name.split("x")) for name in names]
    if any(len(s) != 4 for s in shapes):
        raise SystemExit(f"shapes must be presets {sorted(SHAPE_PRESETS)} or NxCxHxW, got {spec!r}")
    return shapes


CASE_COMPILE = {"fast-eager": "off", "fast-compiled": "on"}  # the other cases run under --compile


def select_paths(impl: str, compile_mode: str) -> None:
    """The torch.compile policy and the Triton launches of a case (the other cases launch from Python)."""
    fused.set_compile(CASE_COMPILE.get(impl, compile_mode))
    triton_native.set_launch("native" if impl == "fast-native" else "python")


def layer_cases(names: list[str], compiled: bool = False, native: bool = False) -> list[tuple[str, str]]:
    """(name, impl) pairs: "fast"/"fast-eager"/"reference" (and "fast-compiled" if ``compiled``, "fast-native" if
    ``native``) for our EvoNorms, "torch" for baselines, "timm"."""
    cases = []
    for name in names:
        if name in EVONORM_NAMES:
            cases += [(name, "fast")] + [(name, "fast-native")] * native + [(name, "fast-eager")] + [
                (name, "fast-compiled")] * compiled + [(name, "reference")]
            if timm is not None:
                cases.append((name, "timm"))
        else:
            cases.append((name, "torch"))
    return cases


def build(name: str, impl: str, channels: int, device: torch.device) -> torch.nn.Module:
    if impl == "timm":
        layer = getattr(timm.layers, f"EvoNorm2d{name.upper()}")(channels)
    elif impl == "torch":
        layer = evonorm.norm_act(name, channels)
    else:
        layer = evonorm.norm_act(name, channels, impl=impl.split("-")[0])
    return layer.to(device).train()


def saved_bytes(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for one forward, without the layer's parameters and buffers."""
    own = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def random_input(shape, device, dtype, memory_format=torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    """(input that requires grad, output gradient), the same for every case and run, in ``memory_format``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device, dtype, memory_format=memory_format).requires_grad_()
    return x, torch.randn(shape, generator=gen).to(device, dtype, memory_format=memory_format)


def graph_ms(layer, x, grad, replays: int = 20) -> float | None:
    """Device time (ms) of one training forward+backward: replays of a CUDA graph of the call, so no host work (Python,
    launches) sits between the kernels. None where the call cannot be captured. On an H200 (torch 2.11) BN-ReLU's
    captures at the first shape failed (cudaErrorStreamCaptureInvalidated) while all later ones worked. A capture
    in the default "global" mode fails when any thread makes an unsafe CUDA call meanwhile, and the backward runs on
    autograd's device thread: the retry captures in "thread_local" mode, and says when that worked."""
    for mode in ("global", "thread_local"):
        try:
            ms = _graph_ms(layer, x, grad, replays, mode)
        except RuntimeError as err:
            print(f"  no CUDA graph of {type(layer).__name__} ({mode} capture): {err}", file=sys.stderr)
            continue
        if mode != "global":
            print(f"  CUDA graph of {type(layer).__name__} captured in {mode} mode", file=sys.stderr)
        return ms
    return None


def warm_up_capture(device, dtype) -> None:
    """One throwaway CUDA-graph capture of the baseline on a tiny input. On the H200 the first captures of a process
    failed (BN-ReLU's at the first shape, in both modes; every later one worked), so without this the first shape's
    baseline had no device time. Whether this is enough is for the next GPU run to show: it prints what happened."""
    print("  a throwaway CUDA-graph capture first:", file=sys.stderr)
    x, grad = random_input((2, 8, 4, 4), device, dtype)
    ms = graph_ms(build(*BASELINE, 8, device), x, grad, replays=1)
    print(f"  {'captured' if ms is not None else 'not captured'}", file=sys.stderr)


def _graph_ms(layer, x, grad, replays: int, capture_error_mode: str) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        x = x.detach().clone().requires_grad_()  # a leaf whose gradient accumulates on this stream
        for _ in range(2):
            layer(x).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    layer.zero_grad(set_to_none=True)  # gradients then live in the graph's memory pool
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        layer(x).backward(grad)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def stream_block(layer, x, grad, calls: int = STREAM_CALLS) -> tuple[float, float]:
    """(ms per call on the stream, host ms per call) of ``calls`` fwd+bwd calls issued back to back (CUDA)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    host_start = time.perf_counter()
    for _ in range(calls):
        x.grad = None
        layer(x).backward(grad)
    host_ms = (time.perf_counter() - host_start) * 1e3 / calls
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls, host_ms


def bench_shape(shape, cases, device, repeats, budget_s, compile_mode, dtype=torch.float32,
                memory_format=torch.contiguous_format):
    """Median fwd and fwd+bwd times (ms) and saved bytes of each case on one shape, rounds interleaved. The input
    (and output gradient) has ``dtype``, the layers float32 parameters: what a layer sees after an autocast conv;
    and ``memory_format``: what a channels-last model's conv hands it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x, grad = random_input(shape, device, dtype, memory_format)
    layers, rows = {}, {}

    for case in cases:
        select_paths(case[1], compile_mode)
        try:  # the first call too: timm's S-series builds with any C but fails on a call when its groups do not divide C
            layer = build(*case, shape[1], device)
            rows[case] = {"fwd": [], "fwd_bwd": [], "stream": [], "host": [], "saved_bytes": saved_bytes(layer, x)}
        except Exception as err:
            print(f"  skip {case[0]}/{case[1]} on {shape}: {type(err).__name__} {err}", file=sys.stderr)
            continue
        layers[case] = layer

    def forward(layer):
        layer(x)

    def forward_backward(layer):
        x.grad = None
        layer(x).backward(grad)

    def timed(fn, case):
        select_paths(case[1], compile_mode)
        sync()
        start = time.perf_counter()
        fn(layers[case])
        sync()
        return (time.perf_counter() - start) * 1e3

    for case in layers:  # warm-up (the first fast call of a kernel may compile it), then time one round
        timed(forward_backward, case)
    refuse_fallbacks()
    round_s = sum(timed(forward_backward, case) for case in layers) / 1e3
    streamed = device.type == "cuda"
    calls_per_round = 2 + (STREAM_CALLS if streamed else 0)  # fwd + fwd_bwd (< 2 fwd_bwd) + a stream block
    rounds = max(3, min(repeats, int(budget_s / max(calls_per_round * round_s, 1e-9))))
    for _ in range(rounds):
        for case in layers:
            rows[case]["fwd"].append(timed(forward, case))
            rows[case]["fwd_bwd"].append(timed(forward_backward, case))
            if streamed:
                stream_ms, host_ms = stream_block(layers[case], x, grad)
                rows[case]["stream"].append(stream_ms)
                rows[case]["host"].append(host_ms)
    for case in layers:  # the rows above wait for the host between calls; this is the kernels' time alone
        select_paths(case[1], compile_mode)
        rows[case]["graph"] = graph_ms(layers[case], x, grad) if device.type == "cuda" and case[1] in (
            "torch", "fast", "fast-native") else None
    input_bytes = x.numel() * x.element_size()
    results = []
    for (name, impl), row in rows.items():
        results.append({
            "layer": name, "impl": impl, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
            "channels_last": memory_format == torch.channels_last, "rounds": rounds,
            "fwd_ms": statistics.median(row["fwd"]), "fwd_bwd_ms": statistics.median(row["fwd_bwd"]),
            "stream_fwd_bwd_ms": statistics.median(row["stream"]) if row["stream"] else None,
            "host_fwd_bwd_ms": statistics.median(row["host"]) if row["host"] else None,
            "graph_fwd_bwd_ms": row["graph"],
            "saved_bytes": row["saved_bytes"], "saved_ratio": row["saved_bytes"] / input_bytes,
        })
    base = next((r for r in results if (r["layer"], r["impl"]) == BASELINE), None)
    for r in results:
        r["fwd_ratio"] = r["fwd_ms"] / base["fwd_ms"] if base else None
        r["fwd_bwd_ratio"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"] if base else None
        for kind in ("stream", "graph"):
            key = f"{kind}_fwd_bwd_ms"
            known = base and base[key] and r[key]
            r[f"{kind}_fwd_bwd_ratio"] = r[key] / base[key] if known else None
    return results


def profile_shape(shape, cases, device, compile_mode, dtype, calls=5):
    """Prints the kernels of ``calls`` forward+backward calls of each case with their device time (torch.profiler):
    where a layer's time goes, launch by launch."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    x, grad = random_input(shape, device, dtype)
    for name, impl in cases:
        if impl in ("reference", "timm"):
            continue
        select_paths(impl, compile_mode)
        layer = build(name, impl, shape[1], device)
        layer(x).backward(grad)  # warm-up: compilation stays out of the profile
        with profile(activities=activities) as prof:
            for _ in range(calls):
                x.grad = None  # as in the timed rounds: no accumulation kernel into x.grad
                layer(x).backward(grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"--- profile {name}/{impl} {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}, "
              f"{calls} fwd+bwd calls")
        print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=60))


def print_table(results):
    """fwd / fwd+bwd: wall time of a call with the host waiting for the device after it; stream (with the host's
    time per call) and graph: fwd+bwd issued back to back, and the device time from CUDA-graph replays (CUDA only)."""
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    print(f"{'layer':8} {'impl':13} {'shape':>15} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x bn_relu':>9} "
          f"{'stream ms':>9} {'x':>6} {'host ms':>8} {'graph ms':>9} {'x':>6} {'saved/in':>8}")
    for r in results:
        print(f"{r['layer']:8} {r['impl']:13} {'x'.join(map(str, r['shape'])):>15} {r['fwd_ms']:9.2f} "
              f"{r['fwd_bwd_ms']:11.2f} {fmt(r['fwd_bwd_ratio'], '.2f'):>9} "
              f"{fmt(r['stream_fwd_bwd_ms'], '.3f'):>9} {fmt(r['stream_fwd_bwd_ratio'], '.2f'):>6} "
              f"{fmt(r['host_fwd_bwd_ms'], '.3f'):>8} "
              f"{fmt(r['graph_fwd_bwd_ms'], '.3f'):>9} {fmt(r['graph_fwd_bwd_ratio'], '.2f'):>6} "
              f"{r['saved_ratio']:8.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="default",
                        help=f"comma-separated presets ({', '.join(SHAPE_PRESETS)}) or NxCxHxW shapes")
    parser.add_argument("--layers", default=",".join(evonorm.NORM_ACT_NAMES),
                        help="comma-separated layer names (bn_relu is always added as the baseline)")
    parser.add_argument("--repeats", type=int, default=20, help="most timed rounds per shape")
    parser.add_argument("--budget", type=float, default=12.0,
                        help="seconds of timed rounds per shape; large shapes get fewer rounds (at least 3)")
    parser.add_argument("--compile", default="auto", choices=fused.COMPILE_MODES,
                        help="torch.compile policy of the impl=fast rows (evonorm.fused.set_compile)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="input dtype (parameters stay float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None,
                        help="output path (default benchmarks/results/layers-<device>.json)")
    parser.add_argument("--malloc-trim", action="store_true",
                        help="leave glibc's trimming of freed memory on (see above)")
    parser.add_argument("--channels-last", action="store_true",
                        help="inputs and output gradients channels-last (BN-ReLU then runs its channels-last kernels)")
    parser.add_argument("--quick", action="store_true", help="tiny shape, 3 rounds: a smoke run of a few seconds")
    parser.add_argument("--no-native", action="store_true", help="on CUDA, no fast-native rows")
    parser.add_argument("--profile", action="store_true",
                        help="also print each fast/torch case's kernels and their times (torch.profiler)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats, args.budget = "quick", 3, 0.0
    if args.threads:
        torch.set_num_threads(args.threads)
    kept_memory = not args.malloc_trim and keep_freed_memory()
    device = torch.device(args.device)
    names = args.layers.split(",")
    unknown = set(names) - set(evonorm.NORM_ACT_NAMES)
    if unknown:
        raise SystemExit(f"unknown layers {sorted(unknown)}; valid: {', '.join(evonorm.NORM_ACT_NAMES)}")
    # compiled rows on CPU (on CUDA "on" is the Triton path of "fast"); --quick skips them: each compiles for seconds
    cases = layer_cases([BASELINE[0]] + [n for n in names if n != BASELINE[0]],
                        compiled=device.type == "cpu" and not args.quick,
                        native=device.type == "cuda" and not args.no_native)

    if device.type == "cuda":
        warm_up_capture(device, getattr(torch, args.dtype))
    results = []
    for shape in parse_shapes(args.shapes):
        print(f"shape {shape} ...", file=sys.stderr, flush=True)
        results += bench_shape(shape, cases, device, args.repeats, args.budget, args.compile,
                               getattr(torch, args.dtype),
                               torch.channels_last if args.channels_last else torch.contiguous_format)
        if args.profile:
            profile_shape(shape, cases, device, args.compile, getattr(torch, args.dtype))
    print_table(results)

    suffix = ("" if args.dtype == "float32" else f"-{args.dtype}") + ("-channels-last" if args.channels_last else "")
    path = args.json or Path(__file__).resolve().parent / "results" / f"layers-{device.type}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": getattr(timm, "__version__", None),
        "python": platform.python_version(), "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "baseline": "/".join(BASELINE), "compile": args.compile, "dtype": args.dtype,
        "channels_last": args.channels_last,
        "malloc_keeps_freed_memory": kept_memory,
    }
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
