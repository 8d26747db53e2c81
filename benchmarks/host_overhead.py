"""Host time of a fast EvoNorm call on the CUDA code path, measurable without a GPU.

On a GPU a layer call of the fast EvoNorms is host-bound at most sizes: the device finishes its Triton kernels
before the host has issued the next call. This benchmark runs the CUDA code path on tiny CPU tensors over a
stand-in CUDA driver (``benchmarks/fake_cuda.py``): Triton's real compiler, driver and C launcher, and the native
launches, run as on a GPU up to the driver's launch call, which records and returns. So what it times is the host's
work per forward+backward apart from the driver's own launch cost: Python, autograd, allocations, the launches'
argument handling. Each layer runs four ways: as by default (direct launches from Python,
``evonorm.triton_kernels._launch``; on this tiny input each row set fits one tile, so a call is two launches for the
B-series and three for the S-series), with native launches (the whole call in C++, ``evonorm.triton_native``), with
every launch through ``kernel[grid]``, and in tiles (four launches). Beside them, in the same rounds: BN-ReLU (whose
CPU kernels are included, tiny at this size) and an empty autograd function with the same signature, which only
allocates its outputs: the floor of any Python autograd function. Medians of interleaved rounds, one thread. With
``--device cuda`` the same cases run for real on a GPU, on tensors so small that each call takes the host's time
(the device waits for the host). The stand-in changes the process for good: run this in a process of its own.

    python benchmarks/host_overhead.py                 # b0 and s0, 3000 calls per round
    python benchmarks/host_overhead.py --layers b0,b1,s2 --calls 500 --rounds 3
    python benchmarks/host_overhead.py --device cuda   # real launches
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import evonorm  # noqa: E402
from evonorm import fused, triton_native  # noqa: E402


class EmptyFn(torch.autograd.Function):
    """An autograd function with EvoNormBatchFn's signature that only allocates its outputs."""

    @staticmethod
    def forward(ctx, x, weight, bias, v, running_var, variant, eps, momentum, training):
        ctx.save_for_backward(x, weight, v)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, v = ctx.saved_tensors
        return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight), torch.empty_like(v),
                None, None, None, None, None)


class EmptyLayer(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.inner = evonorm.norm_act("b0", channels)

    def forward(self, x):
        m = self.inner
        return EmptyFn.apply(x, m.weight, m.bias, m.v, m.running_var, "b0", m.eps, m.momentum, self.training)


def time_calls(layer, x, grad, calls: int) -> float:
    """Microseconds per forward+backward (calls issued back to back; on CUDA until the device is done)."""
    start = time.perf_counter()
    for _ in range(calls):
        x.grad = None
        layer(x).backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="b0,s0", help="fast EvoNorms to time (comma-separated)")
    parser.add_argument("--calls", type=int, default=3000, help="forward+backward calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: a stand-in CUDA driver, launches do nothing; cuda: real launches on a GPU")
    parser.add_argument("--no-native", action="store_true", help="leave out the native launches")
    args = parser.parse_args(argv)
    from evonorm import triton_kernels  # needs triton

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        if args.device == "cpu":
            from benchmarks.fake_cuda import activate

            activate(folder)
        return _measure(args, triton_kernels)


def _measure(args, triton_kernels) -> dict[str, float]:
    channels = 8
    x = torch.randn(2, channels, 2, 2, device=args.device, requires_grad=True)
    grad = torch.randn_like(x)
    default = triton_kernels.DIRECT_LAUNCH, triton_kernels.WHOLE_SET_TILE, "python"
    # name: (layer, direct launches, largest whole row set, launch mode): this tiny input's row sets are taken whole
    # by default
    layers = {"bn_relu": (evonorm.norm_act("bn_relu", channels).to(args.device), *default),
              "empty function": (EmptyLayer(channels).to(args.device), *default)}
    for name in args.layers.split(","):
        layer = evonorm.norm_act(name, channels, impl="fast").to(args.device)
        layers[name] = layer, *default
        if not args.no_native:
            layers[f"{name} native"] = layer, *default[:2], "native"
        layers[f"{name} via kernel[grid]"] = layer, False, *default[1:]
        layers[f"{name} in tiles (4 launches)"] = layer, default[0], 0, default[2]
    times: dict[str, list[float]] = {name: [] for name in layers}

    def timed(name, calls):
        layer, triton_kernels.DIRECT_LAUNCH, triton_kernels.WHOLE_SET_TILE, launch = layers[name]
        triton_native.set_launch(launch)
        triton_kernels._plan.cache_clear()
        try:
            return time_calls(layer.train(), x, grad, calls)
        finally:
            triton_kernels.DIRECT_LAUNCH, triton_kernels.WHOLE_SET_TILE, _ = default
            triton_native.set_launch("python")
            triton_kernels._plan.cache_clear()

    for name in layers:
        timed(name, max(args.calls // 10, 1))  # warm-up (and the first launch of each kernel, which "compiles")
    for _ in range(args.rounds):
        for name in layers:
            times[name].append(timed(name, args.calls))
    if fused._triton_state["failed"] or triton_native._state["failed"]:  # not what this measures
        raise SystemExit("the Triton code path or its native launches failed (see the warning above); "
                         "nothing measured")
    medians = {name: statistics.median(t) for name, t in times.items()}
    floor = medians["empty function"]
    print(f"{'layer':28} {'us per fwd+bwd':>15} {'over the empty function':>24}")
    for name, us in medians.items():
        print(f"{name:28} {us:15.1f} {us - floor:24.1f}")
    return medians


if __name__ == "__main__":
    main()
