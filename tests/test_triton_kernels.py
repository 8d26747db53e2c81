"""Triton stages (evonorm.triton_kernels) against their plain twins in evonorm.fused, and the fast layers on them
against impl="reference".

Every test runs on two devices: "cuda" (skipped without a GPU) and "interp", CPU tensors under the Triton
interpreter. The interpreter must be switched on (TRITON_INTERPRET=1) before the kernels are decorated, and torch
may already have imported triton in this process, so test_interpreter_run runs the "interp" cases in a fresh pytest
process with the variable set; in this process they are skipped.
"""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evonorm import fused
from test_fast_layers import CASES, make_pair, run, sample

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", id="interp", marks=pytest.mark.skipif(not INTERPRETED, reason="run by test_interpreter_run")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
# (R, L) rows: one element per row, a tail tile, rows longer than one tile (loop + mask), many short rows
ROW_SHAPES = [(6, 1), (13, 35), (3, 1100), (300, 7)]
# layer inputs: groups 20 with 7x5 maps, 1x1 maps, rows longer than one tile
LAYER_SHAPES = [(4, 40, 7, 5), (2, 8, 1, 1), (2, 6, 20, 55)]


@pytest.fixture
def triton_stages(monkeypatch):
    """Names of the plain stages whose Triton twins ran; Triton forced for CPU tensors (interpreter)."""
    pytest.importorskip("triton")
    called = []
    run_triton = fused._run_triton

    def spy(stage, *args):
        called.append(stage.__name__)
        return run_triton(stage, *args)

    monkeypatch.setattr(fused, "_run_triton", spy)
    monkeypatch.setitem(fused._triton_state, "force", True)
    monkeypatch.setitem(fused._triton_state, "failed", False)
    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    return called


def assert_close(got, want, tol=1e-5):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert (got - want).abs().max() <= tol * max(1.0, want.abs().max().item())


def stage_cases(shape, device):
    """(plain stage, argument factory) for every stage; fresh output buffers per call."""
    gen = torch.Generator().manual_seed(sum(shape))

    def rand(*size):
        return torch.rand(*size, generator=gen).to(device)

    x, gy = ((torch.randn(shape, generator=gen) * 2 + 0.5).to(device) for _ in range(2))
    rows = shape[0], 1
    a, b = rand(*rows) * 2 - 1, rand(*rows) * 1.5  # a of both signs: r = max(a x + b, 1) takes both branches
    scale, bias, v, k1, center, k0 = (rand(*rows) * 2 - 1 for _ in range(6))
    branch = (a * x + b > 1).double().mean().item()
    assert shape[1] == 1 or 0.05 < branch < 0.95
    return [
        (fused._batch_forward_plain, lambda: (torch.empty_like(x), x, a, b, scale, bias)),
        (fused._batch_sums_plain, lambda: (x, gy, a, b)),
        (fused._batch_grad_x_plain, lambda: (x, gy, a, b, scale, k1, center, k0)),
        (fused._sample_forward_plain, lambda: (torch.empty_like(x), x, v, scale, bias)),
        (fused._sample_sums_plain, lambda: (x, gy, v)),
        (fused._sample_grad_x_plain, lambda: (x, gy, v, scale, k1, center, k0)),
    ]


@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreter run")
def test_interpreter_run():
    """The "interp" cases of this file in a fresh process under TRITON_INTERPRET=1 (CPU, no GPU needed)."""
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-k", "interp and not test_interpreter_run"],
        cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_stages_match_plain_twins(shape, device):
    from evonorm import triton_kernels

    for plain, make_args in stage_cases(shape, device):
        want = plain(*make_args())
        got = getattr(triton_kernels, fused._TRITON_TWINS[plain])(*make_args())
        want, got = (w if isinstance(w, tuple) else (w,) for w in (want, got))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_close(g, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", LAYER_SHAPES)
@pytest.mark.parametrize("name, training", CASES)
def test_fast_layers_on_triton_match_reference(name, training, shape, device, triton_stages):
    fast, ref = (layer.to(device) for layer in make_pair(name, shape[1], training))
    x, grad_y = sample(shape).to(device), sample(shape, seed=2).to(device)
    for got, want in zip(run(fast, x, grad_y), run(ref, x, grad_y)):  # y, x.grad, parameter grads, running var
        assert_close(got, want)
    kind = "batch" if name[0] == "b" else "sample"
    assert triton_stages == [f"_{kind}_{stage}_plain" for stage in ("forward", "sums", "grad_x")]
    assert not fused._triton_state["failed"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["b0", "b2", "s0", "s2"])
def test_autocast_half_on_triton(name, dtype, device, triton_stages):
    conv = torch.nn.Conv2d(3, 32, 3).to(device)
    x = sample((4, 3, 9, 8)).to(device)
    outputs = []
    for layer in make_pair(name, 32):
        layer.to(device)
        with torch.autocast(device, dtype=dtype):
            y = layer(conv(x))
        y.float().square().sum().backward()
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        outputs.append(y.float())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)
    assert triton_stages and not fused._triton_state["failed"]


def test_only_float32_cuda_or_forced_inputs_use_triton(monkeypatch):
    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    monkeypatch.setitem(fused._triton_state, "failed", False)
    x = torch.zeros(2, 8, 4, 4)
    assert fused._stage_runner(x) is None  # CPU: unchanged (eager below COMPILE_MIN_NUMEL)
    monkeypatch.setitem(fused._triton_state, "force", True)
    assert fused._stage_runner(x) is fused._run_triton
    assert fused._stage_runner(x.double()) is None  # float64 keeps its precision in the eager stages
    fused.set_compile("off")  # off: eager stages on every device
    assert fused._stage_runner(x) is None


def test_failed_triton_launch_warns_once_and_falls_back(triton_stages, monkeypatch, caplog):
    from evonorm import triton_kernels

    def broken(*args):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(triton_kernels, "batch_forward", broken)
    fast, ref = make_pair("b0", 16)
    x, grad_y = sample((4, 16, 5, 5)), sample((4, 16, 5, 5), seed=2)
    with caplog.at_level(logging.WARNING, logger="evonorm.fused"):
        got = run(fast, x, grad_y)
        run(make_pair("b0", 16)[0], x, grad_y)
    assert fused._triton_state["failed"] and caplog.text.count("Triton stages failed") == 1
    assert triton_stages == ["_batch_forward_plain"]  # backward and the second call went straight to eager
    for a, b in zip(got, run(ref, x, grad_y)):
        assert_close(a, b)
