"""Host time of a fast EvoNorm call on the CUDA code path, measurable without a GPU.

On a GPU a layer call of the fast EvoNorms is host-bound at most sizes: the device finishes its four Triton
kernels before the host has issued the next call. This benchmark runs the CUDA code path (``evonorm.triton_kernels``)
on tiny CPU tensors with the kernel launches stubbed out, so what it times is the host's work per forward+backward
apart from the launches: Python, the autograd function, allocations. Beside it, in the same rounds: BN-ReLU (whose
CPU kernels are included, tiny at this size) and an empty autograd function with the same signature, which only
allocates its outputs: the floor of any Python autograd function. Medians of interleaved rounds, one thread.

    python benchmarks/host_overhead.py                 # b0 and s0, 3000 calls per round
    python benchmarks/host_overhead.py --layers b0,b1,s2 --calls 500 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import evonorm  # noqa: E402
from evonorm import fused  # noqa: E402


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
    """Microseconds per forward+backward."""
    start = time.perf_counter()
    for _ in range(calls):
        x.grad = None
        layer(x).backward(grad)
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="b0,s0", help="fast EvoNorms to time (comma-separated)")
    parser.add_argument("--calls", type=int, default=3000, help="forward+backward calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    from evonorm import triton_kernels  # needs triton; the kernels themselves never run

    torch.set_num_threads(1)
    saved_state, saved_launch = dict(fused._triton_state), triton_kernels._launch
    fused._triton_state.update(force=True, failed=False)
    triton_kernels._launch = lambda *args, **meta: None
    try:
        return _measure(args)
    finally:
        fused._triton_state.update(saved_state)
        triton_kernels._launch = saved_launch


def _measure(args) -> dict[str, float]:
    channels = 8
    x = torch.randn(2, channels, 2, 2, requires_grad=True)
    grad = torch.randn_like(x)
    layers = {"bn_relu": evonorm.norm_act("bn_relu", channels), "empty function": EmptyLayer(channels),
              **{name: evonorm.norm_act(name, channels, impl="fast") for name in args.layers.split(",")}}
    times: dict[str, list[float]] = {name: [] for name in layers}
    for layer in layers.values():
        time_calls(layer.train(), x, grad, max(args.calls // 10, 1))  # warm-up
    for _ in range(args.rounds):
        for name, layer in layers.items():
            times[name].append(time_calls(layer, x, grad, args.calls))
    if fused._triton_state["failed"]:  # the eager stages ran instead: not what this measures
        raise SystemExit("the Triton code path failed (see the warning above); nothing measured")
    medians = {name: statistics.median(t) for name, t in times.items()}
    floor = medians["empty function"]
    print(f"{'layer':16} {'us per fwd+bwd':>15} {'over the empty function':>24}")
    for name, us in medians.items():
        print(f"{name:16} {us:15.1f} {us - floor:24.1f}")
    return medians


if __name__ == "__main__":
    main()
