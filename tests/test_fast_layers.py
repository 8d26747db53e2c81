"""impl="fast" EvoNorms (evonorm.fused): analytic gradients, agreement with impl="reference", memory saved for
backward, half precision, edge cases, the torch.compile policy, and a smoke run of benchmarks/layers.py.

On CPU a layer call runs the fused C++ kernels (float32), the eager kernels, or the plain formulas for
torch.compile; the ``stages`` fixture runs each test on all three (the plain ones uncompiled: compiling costs seconds
per kernel; one test compiles them all). float64 and half inputs never take the C++ kernels.
"""
import contextlib
import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import evonorm
from evonorm import fused

REPO = Path(__file__).resolve().parent.parent
EVONORMS = ("b0", "b1", "b2", "s0", "s1", "s2")
CASES = [(name, training) for name in EVONORMS for training in ((True, False) if name[0] == "b" else (True,))]
SHAPES = [(8, 64, 14, 14), (4, 40, 7, 5), (16, 24, 3, 3), (2, 8, 1, 1), (1, 16, 4, 4)]  # groups: 32, 20, 24, 8, 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a loaded 2-core machine each parallel region can wait a
    scheduler slice: gradcheck's thousands of calls went from under a second to half a minute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["kernels", "eager", "plain"])
def stages(request, monkeypatch):
    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    monkeypatch.setitem(fused._cpu_state, "failed", False)
    if request.param == "plain":
        monkeypatch.setattr(fused, "_use_compiled", lambda x: True)
        monkeypatch.setattr(fused, "_run_compiled", lambda stage, *args: stage(*args))
    else:
        monkeypatch.setattr(fused, "_use_compiled", lambda x: False)
    if request.param != "kernels":
        monkeypatch.setattr(fused, "_use_cpu_kernels", lambda x, *params: False)
    yield request.param
    assert not fused._cpu_state["failed"], "the fused CPU kernels failed to build or run (see the warning)"


# for inputs the C++ kernels never take (float64, half), where a "kernels" run would repeat the eager one
EAGER_AND_PLAIN = pytest.mark.parametrize("stages", ["eager", "plain"], indirect=True)


def make_pair(name, channels, training=True, dtype=torch.float32, seed=0, **kwargs):
    """(fast, reference) layers with the same random parameters and running variance."""
    gen = torch.Generator().manual_seed(seed)
    ref = evonorm.norm_act(name, channels, impl="reference", **kwargs)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        ref.bias.copy_(torch.randn(channels, generator=gen) * 0.1)
        if hasattr(ref, "v"):
            ref.v.copy_(torch.rand(channels, generator=gen) + 0.5)
        if hasattr(ref, "running_var"):
            ref.running_var.copy_(torch.rand(channels, generator=gen) * 1.5 + 0.5)
    ref = ref.to(dtype).train(training)
    fast = copy.deepcopy(ref)
    fast.impl = "fast"
    return fast, ref


def sample(shape, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)


def run(layer, x, grad_y):
    """Output, input gradient, parameter gradients and running variance after one forward/backward."""
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad_y)
    state = [y, x.grad] + [p.grad for p in layer.parameters()]
    return state + ([layer.running_var] if hasattr(layer, "running_var") else [])


def instance_branch_fraction(layer, x):
    """Share of elements where max() picks the instance term of a B layer (reference formula)."""
    var = x.var(dim=(0, 2, 3), unbiased=False) if layer.training else layer.running_var
    batch_std = (var + layer.eps).sqrt().view(1, -1, 1, 1)
    return (layer.instance_term(x) > batch_std).double().mean().item()


def saved_ratio(layer, x):
    """Bytes of distinct storages autograd saves for backward (parameters, buffers excluded) / input bytes."""
    own = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x.requires_grad_())
    return sum(saved.values()) / (x.numel() * x.element_size())


@EAGER_AND_PLAIN
@pytest.mark.parametrize("shape", [(3, 6, 5, 4), (2, 40, 2, 3)])
@pytest.mark.parametrize("name, training", CASES)
def test_gradcheck_float64(name, training, shape, stages):
    layer, _ = make_pair(name, shape[1], training, torch.float64)
    x = sample(shape, torch.float64).requires_grad_()
    params = dict(layer.named_parameters())
    names = list(params)

    def f(x, *values):
        return functional_call(layer, dict(zip(names, values)), (x,))

    assert gradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in params.values()]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name, training", CASES)
def test_matches_reference_float32(name, training, shape, stages):
    fast, ref = make_pair(name, shape[1], training)
    x, grad_y = sample(shape), sample(shape, seed=2)
    for got, want in zip(run(fast, x, grad_y), run(ref, x, grad_y)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["b0", "b1", "b2"])
def test_batch_inputs_use_both_branches(name, training):
    """The float32 comparison above covers elements on both sides of max()."""
    _, ref = make_pair(name, SHAPES[0][1], training)
    assert 0.05 < instance_branch_fraction(ref, sample(SHAPES[0])) < 0.95


@pytest.mark.parametrize("name", EVONORMS)
def test_saves_about_the_input_only(name):
    fast, ref = make_pair(name, 64)
    x = sample((8, 64, 16, 16))
    assert saved_ratio(fast, x) <= 1.1  # x + per-(n, c) statistics; the target is <= 2
    assert saved_ratio(ref, x) >= 3.0
    assert saved_ratio(evonorm.norm_act("bn_relu", 64), x) == pytest.approx(2.0, abs=0.01)


@EAGER_AND_PLAIN
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", EVONORMS)
def test_half_inputs_keep_dtype_and_stay_finite(name, dtype, stages):
    fast, ref = make_pair(name, 32)
    x = (sample((4, 32, 6, 5)) * 30).to(dtype)  # large values: squares overflow float16
    y, y_ref = run(fast, x, torch.ones_like(x))[:2], run(ref, x, torch.ones_like(x))[:2]
    assert y[0].dtype == y[1].dtype == dtype
    for got, want in zip(y, y_ref):
        assert torch.isfinite(want).all() and torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in fast.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["b0", "s0"])
def test_autocast_statistics_in_float32(name, dtype):
    """Conv outputs near 300: their squares (the variance's terms) overflow float16, not float32."""
    conv = torch.nn.Conv2d(3, 32, 3)
    torch.nn.init.constant_(conv.bias, 300.0)
    fast, ref = make_pair(name, 32)
    x = sample((4, 3, 9, 8))
    outputs = []
    for layer in (fast, ref):
        with torch.autocast("cpu", dtype=dtype):
            y = layer(conv(x))
        y.float().square().sum().backward()
        outputs.append(y.float())
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", EVONORMS)
def test_empty_batch_is_affine_and_keeps_running_var(name):
    fast, _ = make_pair(name, 16)
    x = torch.zeros(0, 16, 5, 4, requires_grad=True)
    before = copy.deepcopy(fast.state_dict())
    y = fast(x)
    y.sum().backward()
    assert y.shape == x.shape
    for key, value in fast.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("name", ["s0", "s1", "s2"])
def test_saturated_sigmoid_matches_reference(name, stages):
    """|v x| up to ~100: sigmoid at 0 and 1 (the C++ kernels' exp clamps at +-88)."""
    fast, ref = make_pair(name, 16)
    x, grad_y = sample((4, 16, 5, 3)) * 25, sample((4, 16, 5, 3), seed=2)
    for got, want in zip(run(fast, x, grad_y), run(ref, x, grad_y)):
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("name", ["b0", "b1", "b2"])
def test_non_finite_batch_variance_not_written(name, stages):
    fast, ref = make_pair(name, 8)
    x = sample((4, 8, 3, 3))
    x[0, 2, 1, 1] = float("inf")
    before = fast.running_var.clone()
    fast(x)
    ref(x)
    assert fast.running_var[2] == before[2]
    assert torch.isfinite(fast.running_var).all()
    torch.testing.assert_close(fast.running_var, ref.running_var)


@pytest.mark.parametrize("name", ["b0", "s0"])
def test_channels_last_input(name, stages):
    fast, ref = make_pair(name, 32)
    x = sample((4, 32, 7, 6)).to(memory_format=torch.channels_last)
    grad_y = sample((4, 32, 7, 6), seed=3)
    for got, want in zip(run(fast, x, grad_y), run(ref, x, grad_y)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["b0", "s0"])
def test_second_backward_of_a_retained_graph(name, stages):
    """Two backwards through one call (retain_graph) accumulate the reference's gradients twice: what a call saves
    stays intact after its first backward."""
    fast, ref = make_pair(name, 16)
    grad_y = sample((4, 16, 5, 3), seed=2)
    grads = []
    for layer in (fast, ref):
        x = sample((4, 16, 5, 3)).requires_grad_()
        y = layer(x)
        y.backward(grad_y, retain_graph=True)
        y.backward(grad_y)
        grads.append([x.grad, *(p.grad for p in layer.parameters())])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["b0", "s0"])
@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu_kernels", "eager"])
def test_double_backward_needs_reference_impl(name, cpu_kernels, monkeypatch):
    """The fast backward is first-order only, in the C++ autograd node as in the Python one: its gradients raise when
    differentiated again (a wrong second derivative would pass silently if they were taken for constants)."""
    monkeypatch.setitem(fused._compile_state, "mode", "auto" if cpu_kernels else "off")
    fast, ref = make_pair(name, 8)
    for layer, works in ((ref, True), (fast, False)):
        x = sample((2, 8, 3, 3)).requires_grad_()
        y = layer(x)
        if not works:
            python_fn = "EvoNormBatchFnBackward" if name == "b0" else "EvoNormSampleFnBackward"
            assert type(y.grad_fn).__name__ == ("CppFunction" if cpu_kernels else python_fn)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        if works:
            gx.sum().backward()
        else:
            with pytest.raises(RuntimeError, match="differentiate twice"):
                gx.sum().backward()


def test_impl_is_validated_and_shown():
    with pytest.raises(ValueError, match="impl"):
        evonorm.norm_act("s0", 8, impl="triton")
    assert "impl='fast'" in repr(evonorm.norm_act("b0", 8))
    assert "impl='reference'" in repr(evonorm.norm_act("s2", 8, impl="reference"))


def test_compile_policy(monkeypatch):
    small, large = torch.zeros(2, 8, 4, 4), torch.zeros(1, 1, 1, fused.COMPILE_MIN_NUMEL)
    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    assert not fused._use_compiled(small) and fused._use_compiled(large)
    assert not fused._use_compiled(large.double())
    fused.set_compile("off")
    assert not fused._use_compiled(large)
    fused.set_compile("on")
    assert fused._use_compiled(small)
    monkeypatch.setitem(fused._compile_state, "failed", True)
    assert not fused._use_compiled(large)
    with pytest.raises(ValueError):
        fused.set_compile("yes")
    monkeypatch.setitem(fused._compile_state, "mode", "sometimes")  # e.g. from EVONORM_COMPILE
    with pytest.raises(ValueError, match="EVONORM_COMPILE"):
        fused._use_compiled(small)


def test_cpu_kernel_policy(monkeypatch):
    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    monkeypatch.setitem(fused._cpu_state, "failed", False)
    x, weight = torch.zeros(2, 8, 4, 4), torch.ones(8)
    assert fused._use_cpu_kernels(x, weight, None)
    assert not fused._use_cpu_kernels(x.double(), weight.double())
    assert not fused._use_cpu_kernels(x.bfloat16(), weight) and not fused._use_cpu_kernels(x, weight.half())
    for mode in ("on", "off"):  # on: the compiled stages; off: the eager ones
        fused.set_compile(mode)
        assert not fused._use_cpu_kernels(x, weight)
    fused.set_compile("auto")
    monkeypatch.setitem(fused._cpu_state, "failed", True)
    assert not fused._use_cpu_kernels(x, weight)


def cpu_ops(fn) -> list[str]:
    """Names of the operators fn() dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Record() as record:
        fn()
    return record.names


@pytest.mark.parametrize("name", EVONORMS)
def test_cpu_kernels_are_one_call_per_direction(name, monkeypatch):
    """The fixed cost per layer call: one kernel call per direction and nothing else but the gradients' detaches
    (BN-ReLU: 11 operators; the eager stages: 40-110)."""
    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    monkeypatch.setitem(fused._cpu_state, "failed", False)
    fast, _ = make_pair(name, 16)
    x = sample((4, 16, 5, 3)).requires_grad_()
    grad_y = torch.ones_like(x)
    names = cpu_ops(lambda: fast(x).backward(grad_y))
    series = "batch" if name[0] == "b" else "sample"
    kernels = [n for n in names if n.startswith("evonorm_cpu.")]
    assert kernels == [f"evonorm_cpu.{series}_forward", f"evonorm_cpu.{series}_backward"]
    assert set(names) - set(kernels) == {"aten.detach"}, names


def test_cpu_kernels_in_threads_match_reference(monkeypatch):
    """Rows split across threads (kGrain elements per thread): the fixture's single thread would not show it."""
    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    monkeypatch.setitem(fused._cpu_state, "failed", False)
    torch.set_num_threads(2)
    shape = (4, 64, 32, 32)  # 256 rows of 1024: several chunks
    for name, training in CASES:
        fast, ref = make_pair(name, shape[1], training)
        x, grad_y = sample(shape), sample(shape, seed=2)
        for got, want in zip(run(fast, x, grad_y), run(ref, x, grad_y)):
            assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    assert not fused._cpu_state["failed"]


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernels_take_channels_last_inputs_as_they_are(threads, monkeypatch):
    """A channels-last input runs the kernels' channels-last loops: output and input gradient come back
    channels-last (no copy into or out of the contiguous layout) and match the reference on the contiguous input,
    whatever the layout of the output gradient; so do 1x1 maps, where the two layouts coincide."""
    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    monkeypatch.setitem(fused._cpu_state, "failed", False)
    torch.set_num_threads(threads)
    channels_last = torch.channels_last
    for shape in [*SHAPES, (64, 48, 16, 16)]:  # the last: samples split across threads
        for name, training in CASES:
            fast, ref = make_pair(name, shape[1], training)
            x, grad_y = sample(shape), sample(shape, seed=2)
            want = run(ref, x, grad_y)
            for grad_layout in (torch.contiguous_format, channels_last):
                layer = copy.deepcopy(fast)
                xc = x.to(memory_format=channels_last).requires_grad_()
                y = layer(xc)
                y.backward(grad_y.contiguous(memory_format=grad_layout))
                assert y.is_contiguous(memory_format=channels_last), (name, shape)
                assert xc.grad.is_contiguous(memory_format=channels_last), (name, shape)
                got = [y, xc.grad, *(p.grad for p in layer.parameters())]
                got += [layer.running_var] if hasattr(layer, "running_var") else []
                for g, w in zip(got, want):
                    assert (g - w).abs().max() <= 1e-5 * max(1.0, w.abs().max().item()), (name, training, shape)
    assert not fused._cpu_state["failed"]


def test_transforms_need_the_reference_impl_and_leave_cpu_kernels_on(monkeypatch):
    """torch.func transforms and forward-mode AD reject the fast layers (custom first-order autograd functions) with
    an error, not a fallback that would turn the fused CPU kernels off for the calls after; impl="reference" runs."""
    import torch.autograd.forward_ad as fwAD

    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    monkeypatch.setitem(fused._cpu_state, "failed", False)
    x = sample((4, 16, 5, 5))
    fast, ref = make_pair("s0", 16)
    for layer, works in ((ref, True), (fast, False)):
        params = {k: v.detach() for k, v in layer.named_parameters()}
        with pytest.raises(RuntimeError, match="functorch transforms") if not works else contextlib.nullcontext():
            torch.func.grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
        with pytest.raises(RuntimeError, match="jvp") if not works else contextlib.nullcontext(), fwAD.dual_level():
            layer(fwAD.make_dual(x, torch.ones_like(x)))
    assert not fused._cpu_state["failed"]
    assert type(fast(x.requires_grad_()).grad_fn).__name__ == "CppFunction"


def test_failed_cpu_kernel_build_falls_back_to_eager(monkeypatch, caplog):
    from evonorm import cpu_kernels

    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels, "ops", no_compiler)
    monkeypatch.setitem(fused._compile_state, "mode", "auto")
    monkeypatch.setitem(fused._cpu_state, "failed", False)
    x, grad_y = sample((4, 16, 5, 5)), sample((4, 16, 5, 5), seed=2)
    with caplog.at_level(logging.WARNING, logger="evonorm.fused"):
        for name in ("b0", "s0"):
            fast, ref = make_pair(name, 16)
            for a, b in zip(run(fast, x, grad_y), run(ref, x, grad_y)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert fused._cpu_state["failed"] and caplog.text.count("fused CPU kernels are unavailable") == 1


def test_failed_compile_falls_back_to_eager(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setitem(fused._compile_state, "kernels", {})
    monkeypatch.setitem(fused._compile_state, "failed", False)
    monkeypatch.setitem(fused._compile_state, "mode", "on")
    fast, ref = make_pair("b0", 16)
    x, grad_y = sample((4, 16, 5, 5)), sample((4, 16, 5, 5), seed=2)
    with caplog.at_level(logging.WARNING, logger="evonorm.fused"):
        got = run(fast, x, grad_y)
    assert fused._compile_state["failed"] and "torch.compile failed" in caplog.text
    for a, b in zip(got, run(ref, x, grad_y)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", EVONORMS)
def test_compiled_stages_match_reference(name, monkeypatch):
    monkeypatch.setitem(fused._compile_state, "mode", "on")
    for training in (True, False):
        fast, ref = make_pair(name, 40, training)
        x, grad_y = sample((4, 40, 7, 5)), sample((4, 40, 7, 5), seed=2)
        for got, want in zip(run(fast, x, grad_y), run(ref, x, grad_y)):
            assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    assert not fused._compile_state["failed"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", EVONORMS)
def test_cuda_matches_reference(name, dtype):
    fast, ref = make_pair(name, 64)
    fast, ref = fast.cuda(), ref.cuda()
    x, grad_y = sample((8, 64, 14, 14), dtype).cuda(), sample((8, 64, 14, 14), dtype, seed=2).cuda()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(run(fast, x, grad_y), run(ref, x, grad_y)):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def batch_norm_backward_weights(fn):
    """The weight argument of every native_batch_norm_backward call that fn() makes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        weights = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.native_batch_norm_backward.default:
                self.weights.append(args[2])
            return func(*args, **(kwargs or {}))

    with Spy() as spy:
        fn()
    return spy.weights


@pytest.mark.parametrize("name", ["b0", "s0", "s1"])
def test_eager_sums_pass_a_weight_to_batch_norm_backward(name, monkeypatch):
    """CUDA's native_batch_norm_backward allocates the weight and bias gradients like the weight, so a None weight
    fails there ("tensor does not have a device"); CPU accepts it. The eager stages must pass one."""
    monkeypatch.setitem(fused._compile_state, "mode", "off")
    fast, ref = make_pair(name, 16)
    x, grad_y = sample((4, 16, 5, 3)), sample((4, 16, 5, 3), seed=2)
    got = []
    weights = batch_norm_backward_weights(lambda: got.extend(run(fast, x, grad_y)))
    assert weights and all(isinstance(w, torch.Tensor) and w.device == x.device for w in weights)
    for a, b in zip(got, run(ref, x, grad_y)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", EVONORMS)
def test_cuda_eager_stages_match_reference(name, monkeypatch):
    """EVONORM_COMPILE=off (and every fallback after a failed Triton launch) on CUDA."""
    monkeypatch.setitem(fused._compile_state, "mode", "off")
    fast, ref = (layer.cuda() for layer in make_pair(name, 64))
    x, grad_y = sample((8, 64, 14, 14)).cuda(), sample((8, 64, 14, 14), seed=2).cuda()
    for got, want in zip(run(fast, x, grad_y), run(ref, x, grad_y)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


def test_benchmark_quick_run_writes_json(tmp_path):
    out = tmp_path / "layers.json"
    proc = subprocess.run([sys.executable, "benchmarks/layers.py", "--quick", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    meta_keys = {"device", "threads", "torch", "timm", "baseline", "compile", "malloc_keeps_freed_memory"}
    assert meta_keys <= set(report["meta"])
    rows = report["results"]
    assert {r["layer"] for r in rows} == set(evonorm.NORM_ACT_NAMES)
    keys = {"layer", "impl", "shape", "rounds", "fwd_ms", "fwd_bwd_ms", "fwd_ratio", "fwd_bwd_ratio", "saved_bytes",
            "saved_ratio"}
    assert all(keys <= set(r) for r in rows)
    assert {r["impl"] for r in rows if r["layer"] == "s0"} >= {"fast", "fast-eager", "reference"}
    base = next(r for r in rows if r["layer"] == "bn_relu")
    assert base["fwd_bwd_ratio"] == 1.0
    assert all(r["saved_ratio"] < 2.0 for r in rows if r["impl"].startswith("fast"))
    assert "fwd+bwd ms" in proc.stdout


def test_benchmark_times_channels_last_inputs(tmp_path):
    """--channels-last: every case gets the input and output gradient channels-last."""
    from benchmarks import layers as bench
    out = tmp_path / "layers.json"
    rows = bench.main(["--quick", "--layers", "bn_relu,b0,s0", "--channels-last", "--json", str(out)])
    assert json.loads(out.read_text())["meta"]["channels_last"] and all(r["channels_last"] for r in rows)
    assert all(t.is_contiguous(memory_format=torch.channels_last)
               for t in bench.random_input((2, 8, 3, 3), torch.device("cpu"), torch.float32, torch.channels_last))


def test_benchmark_refuses_rows_of_a_fast_path_that_fell_back(monkeypatch):
    """A failed build (no C++ compiler) makes impl=fast run the eager stages: those rows would be mislabelled."""
    from benchmarks import layers as bench
    monkeypatch.setitem(fused._cpu_state, "failed", True)
    assert fused.fallbacks() == ["fused CPU kernels"]
    with pytest.raises(SystemExit, match="fused CPU kernels failed .* would time the eager stages; nothing reported"):
        bench.main(["--quick", "--layers", "b0"])
