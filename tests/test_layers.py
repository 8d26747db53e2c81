"""Norm-act layers against independent float64 implementations of the reference formulas
(/work/shared/notes/evonorm-reference.md), plus the layer contracts: groups, running variance, edge cases,
mixed precision, input checks, factory options and weight-decay groups."""
import inspect
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from torch.func import functional_call
from torch.testing import assert_close

from evonorm import NORM_ACT_NAMES, EvoNormB0, norm_act, norm_act_factory, param_groups_weight_decay

NAMES = ("b0", "b1", "b2", "s0", "s1", "s2", "bn_relu", "bn_silu", "gn_relu", "gn_silu", "frn_tlu")
B_SERIES = ("b0", "b1", "b2")
S_SERIES = ("s0", "s1", "s2")
EVONORMS = B_SERIES + S_SERIES
GROUPED = S_SERIES + ("gn_relu", "gn_silu")
EPS = 1e-5
FRN_EPS = 1e-6
TOL = {"rtol": 1e-10, "atol": 1e-10}
SHAPE = (3, 40, 5, 7)  # C != H != W; C = 40 -> 20 groups of 2 channels

# EvoNorm tests run over every implementation the layers offer (``impl`` keyword, when present).
IMPLS = ("fast", "reference") if "impl" in inspect.signature(EvoNormB0).parameters else (None,)


def cases(names):
    """(name, impl) pairs: EvoNorms over IMPLS, baselines once."""
    return [pytest.param(n, i, id=n if i is None else f"{n}-{i}")
            for n in names for i in (IMPLS if n in EVONORMS else (None,))]


ALL_CASES = cases(NAMES)
EVO_CASES = cases(EVONORMS)
B_CASES = cases(B_SERIES)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make(name, num_features, impl=None, dtype=torch.float64, **kwargs):
    if impl is not None:
        kwargs["impl"] = impl
    return norm_act(name, num_features, dtype=dtype, **kwargs)


def randomize(layer):
    """Non-trivial parameters: weight around 1, everything else (bias, v, tau) around 0."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name == "weight" else 0.0))
    return layer


def sample_input(shape=SHAPE, dtype=torch.float64):
    """Per-channel scale and a non-zero mean (so that variance and second moment differ)."""
    c = shape[1]
    scale = torch.rand(1, c, 1, 1, dtype=dtype) * 2 + 0.5
    shift = torch.randn(1, c, 1, 1, dtype=dtype)
    return torch.randn(shape, dtype=dtype) * scale + shift


def params(layer):
    return {n: p.detach() for n, p in layer.named_parameters()}


# ---------------------------------------------------------------- independent float64 reference (from the spec)

def ch(t):
    return t.reshape(1, -1, 1, 1)


def mean(x, dims):
    return x.mean(dims, keepdim=True)


def var(x, dims):
    """Biased (population) variance."""
    return (x - mean(x, dims)).square().mean(dims, keepdim=True)


def mean_sq(x, dims):
    return x.square().mean(dims, keepdim=True)


def ref_groups(c):
    """Largest divisor of C that is <= 32."""
    return max(g for g in range(1, 33) if c % g == 0)


def per_group(stat, x, groups):
    """stat over (C/G, H, W) of each group of contiguous channels, per sample, as an (N, C, 1, 1) tensor."""
    k = x.shape[1] // groups
    return torch.cat([stat(x[:, i:i + k], (1, 2, 3)).expand(-1, k, -1, -1) for i in range(0, x.shape[1], k)], 1)


def reference(name, x, p, *, groups=None, running_mean=None, running_var=None, apply_act=True, linear="affine"):
    """Expected output; running_mean/running_var given means eval mode for the batch-dependent layers."""
    groups = groups or ref_groups(x.shape[1])

    def affine(y):
        return y * ch(p["weight"]) + ch(p["bias"])

    if name == "frn_tlu":
        y = affine(x / (mean_sq(x, (2, 3)) + FRN_EPS).sqrt())
        return torch.maximum(y, ch(p["tau"])) if apply_act else y
    if name.startswith(("bn", "gn")):
        if name.startswith("bn"):
            mu, sigma2 = ((mean(x, (0, 2, 3)), var(x, (0, 2, 3))) if running_var is None
                          else (ch(running_mean), ch(running_var)))
        else:
            mu, sigma2 = per_group(mean, x, groups), per_group(var, x, groups)
        y = affine((x - mu) / (sigma2 + EPS).sqrt())
        if not apply_act:
            return y
        return F.relu(y) if name.endswith("relu") else F.silu(y)
    if not apply_act and linear == "affine":
        return affine(x)
    if name in B_SERIES:
        batch_var = var(x, (0, 2, 3)) if running_var is None else ch(running_var)
        den = (batch_var + EPS).sqrt()
        if apply_act:
            if name == "b0":
                inst = ch(p["v"]) * x + (var(x, (2, 3)) + EPS).sqrt()
            elif name == "b1":
                inst = (x + 1) * (mean_sq(x, (2, 3)) + EPS).sqrt()
            else:
                inst = (mean_sq(x, (2, 3)) + EPS).sqrt() - x
            den = torch.maximum(den, inst)
        return affine(x / den)
    stat = per_group(mean_sq if name == "s2" else var, x, groups)
    num = x
    if apply_act:
        num = x * torch.sigmoid((ch(p["v"]) if name == "s0" else 1.0) * x)
    return affine(num / (stat + EPS).sqrt())


def expected_running(name, batches, momentum=0.1):
    """Running (mean, var) after training on ``batches``: EvoNorm tracks the biased variance, torch's BN the
    unbiased one."""
    c = batches[0].shape[1]
    run_mean, run_var = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    for x in batches:
        n = x.numel() // c
        batch_var = var(x, (0, 2, 3)).flatten()
        if name.startswith("bn"):
            batch_var = batch_var * n / (n - 1)
        run_mean = (1 - momentum) * run_mean + momentum * mean(x, (0, 2, 3)).flatten()
        run_var = (1 - momentum) * run_var + momentum * batch_var
    return run_mean, run_var


# ---------------------------------------------------------------- formulas

@pytest.mark.parametrize("shape", [SHAPE, (2, 12, 9, 4)], ids=str)
@pytest.mark.parametrize("name, impl", ALL_CASES)
def test_matches_reference_train(name, impl, shape):
    layer = randomize(make(name, shape[1], impl))
    x = sample_input(shape)
    assert_close(layer(x), reference(name, x, params(layer)), **TOL)


@pytest.mark.parametrize("name, impl", ALL_CASES)
def test_matches_reference_eval_after_training(name, impl):
    layer = randomize(make(name, SHAPE[1], impl))
    batches = [sample_input() * s for s in (0.5, 2.0, 3.0)]
    for x in batches:
        layer(x)
    run_mean, run_var = expected_running(name, batches)
    if hasattr(layer, "running_var"):
        assert_close(layer.running_var, run_var, **TOL)
    layer.eval()
    x = sample_input()
    assert_close(layer(x), reference(name, x, params(layer), running_mean=run_mean, running_var=run_var), **TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, impl", EVO_CASES)
def test_no_act_is_affine_only(name, impl, training):
    layer = randomize(make(name, SHAPE[1], impl, apply_act=False)).train(training)
    x = sample_input()
    p = params(layer)
    assert_close(layer(x), x * ch(p["weight"]) + ch(p["bias"]), **TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, impl", EVO_CASES)
def test_linear_normalize_divides_by_statistic(name, impl, training):
    layer = randomize(make(name, SHAPE[1], impl, apply_act=False, linear="normalize")).train(training)
    running_var = None
    if name in B_SERIES and not training:
        running_var = torch.rand(SHAPE[1], dtype=torch.float64) * 3 + 0.2
        layer.running_var.copy_(running_var)
    x = sample_input()
    expected = reference(name, x, params(layer), running_var=running_var, apply_act=False, linear="normalize")
    assert_close(layer(x), expected, **TOL)


@pytest.mark.parametrize("name", EVONORMS)
def test_bad_linear_raises(name):
    with pytest.raises(ValueError, match="linear"):
        norm_act(name, 8, apply_act=False, linear="scale")


# ---------------------------------------------------------------- gradients

def assert_gradcheck(layer, x):
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    inputs = (x.requires_grad_(), *(p.detach().clone().requires_grad_() for p in layer.parameters()))
    assert gradcheck(f, inputs)


GRAD_SHAPE = (2, 6, 3, 4)


def small_layer(name, impl, **kwargs):
    if name in GROUPED:
        kwargs["groups"] = 2  # 3 channels per group
    return randomize(make(name, GRAD_SHAPE[1], impl, **kwargs))


@pytest.mark.parametrize("name, impl", ALL_CASES)
def test_gradcheck_train(name, impl):
    assert_gradcheck(small_layer(name, impl), sample_input(GRAD_SHAPE))


@pytest.mark.parametrize("name, impl", B_CASES)
def test_gradcheck_eval(name, impl):
    layer = small_layer(name, impl).eval()
    layer.running_var.copy_(torch.rand(GRAD_SHAPE[1], dtype=torch.float64) + 0.5)
    assert_gradcheck(layer, sample_input(GRAD_SHAPE))


@pytest.mark.parametrize("name, impl", EVO_CASES)
def test_gradcheck_linear_normalize(name, impl):
    assert_gradcheck(small_layer(name, impl, apply_act=False, linear="normalize"), sample_input(GRAD_SHAPE))


# ---------------------------------------------------------------- groups

@pytest.mark.parametrize("c, groups", [(16, 16), (40, 20), (112, 28), (144, 24), (64, 32), (37, 1)])
@pytest.mark.parametrize("name", GROUPED)
def test_group_fallback(name, c, groups):
    layer = randomize(make(name, c))
    assert (layer.groups if name in S_SERIES else layer.num_groups) == groups
    x = sample_input((2, c, 3, 2))
    assert_close(layer(x), reference(name, x, params(layer), groups=groups), **TOL)


@pytest.mark.parametrize("name", GROUPED)
def test_groups_are_contiguous_channels(name):
    """Rescaling channel 0 changes exactly the outputs of its group, channels 0 and 1 (C = 40, 20 groups)."""
    layer = make(name, SHAPE[1])
    x = sample_input()
    x2 = x.clone()
    x2[:, 0] *= 10
    changed = (layer(x2) - layer(x)).abs().amax(dim=(0, 2, 3)) > 1e-12
    assert changed.tolist() == [True, True] + [False] * (SHAPE[1] - 2)


# ---------------------------------------------------------------- running variance (B-series)

@pytest.mark.parametrize("name, impl", B_CASES)
def test_running_var_init_ones(name, impl):
    layer = make(name, SHAPE[1], impl)
    assert_close(layer.running_var, torch.ones(SHAPE[1], dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [None, 0.3])
@pytest.mark.parametrize("name, impl", B_CASES)
def test_running_var_one_step_biased(name, impl, momentum):
    kwargs = {} if momentum is None else {"momentum": momentum}
    m = 0.1 if momentum is None else momentum
    layer = make(name, SHAPE[1], impl, **kwargs)
    x = sample_input()
    layer(x)
    assert_close(layer.running_var, (1 - m) + m * var(x, (0, 2, 3)).flatten(), **TOL)


@pytest.mark.parametrize("name, impl", B_CASES)
def test_eval_does_not_change_running_var(name, impl):
    layer = make(name, SHAPE[1], impl)
    layer(sample_input())
    before = layer.running_var.clone()
    layer.eval()(sample_input() * 3)
    assert torch.equal(layer.running_var, before)


@pytest.mark.parametrize("name, impl", B_CASES)
def test_non_finite_batch_keeps_running_var_finite(name, impl):
    layer = make(name, SHAPE[1], impl)
    x = sample_input()
    x[0, 0, 1, 2] = float("inf")
    x[2, 1, 4, 0] = float("nan")
    layer(x)
    expected = 0.9 + 0.1 * var(x, (0, 2, 3)).flatten()
    expected[:2] = 1.0
    assert torch.isfinite(layer.running_var).all()
    assert_close(layer.running_var, expected, **TOL)


# ---------------------------------------------------------------- batch and spatial edge cases

@pytest.mark.parametrize("name, impl", ALL_CASES)
def test_empty_batch(name, impl):
    """Shape kept, statistics untouched, and a zero gradient for every parameter: DDP (without
    find_unused_parameters) waits for each one in every process, e.g. a Mask R-CNN head without RoIs."""
    layer = randomize(make(name, SHAPE[1], impl))
    stats_before = {k: b.clone() for k, b in layer.named_buffers() if b.is_floating_point()}
    x = torch.empty(0, *SHAPE[1:], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    for k, b in layer.named_buffers():
        if k in stats_before:
            assert torch.equal(b, stats_before[k]), k
    y.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())


@pytest.mark.parametrize("name", ["b0", "s0"])  # the variants with a v
def test_no_v_without_activation_as_the_reference_and_older_checkpoints_still_load(name):
    """v only enters the activation: at apply_act=False it would be a parameter without a gradient, which DDP
    refuses (Mask R-CNN's FPN, MobileNetV2's linear bottlenecks)."""
    linear = norm_act(name, 8, apply_act=False)
    assert [k for k, _ in linear.named_parameters()] == ["weight", "bias"]
    older = {**linear.state_dict(), "v": torch.ones(8)}
    linear.load_state_dict(older)  # strict: the v such layers used to hold is dropped


@pytest.mark.parametrize("shape", [(1, 40, 5, 7), (4, 40, 1, 1)], ids=["N=1", "1x1"])
@pytest.mark.parametrize("name, impl", ALL_CASES)
def test_single_sample_and_1x1_maps(name, impl, shape):
    """Finite output, gradients and buffers; matches the reference (looser: 1x1 group statistics are
    ill-conditioned)."""
    layer = randomize(make(name, shape[1], impl))
    x = sample_input(shape).requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(b).all() for b in layer.buffers())
    assert_close(y, reference(name, x.detach(), params(layer)), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name, impl", ALL_CASES)
def test_channels_last_input(name, impl):
    layer = randomize(make(name, SHAPE[1], impl))
    x = sample_input()
    assert_close(layer(x.to(memory_format=torch.channels_last)), reference(name, x, params(layer)), **TOL)


# ---------------------------------------------------------------- mixed precision

@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, impl", ALL_CASES)
def test_autocast_half_precision(name, impl, dtype, tol):
    """Half inputs under CPU autocast: the input's dtype out, finite, close to float32. Inputs up to ~1000 make
    x^2 overflow float16, so statistics must run in float32."""
    layer = randomize(make(name, SHAPE[1], impl, dtype=torch.float32))
    x = (sample_input(dtype=torch.float32) * 100).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    assert_close(y.float(), layer(x.float()), rtol=tol, atol=tol)


# ---------------------------------------------------------------- factory and input checks

def test_factory_names():
    assert set(NORM_ACT_NAMES) == set(NAMES)


@pytest.mark.parametrize("build", [norm_act, norm_act_factory], ids=["norm_act", "norm_act_factory"])
def test_unknown_name_lists_valid_names(build):
    with pytest.raises(ValueError) as info:
        build("b3", 8) if build is norm_act else build("b3")
    assert all(n in str(info.value) for n in NAMES)


@pytest.mark.parametrize("kwargs, says", [
    ({"act": "silu"}, r"'bn_relu' names its activation: choose the name .*bn_silu.* instead of act='silu'"),
    ({"momentum": None}, r"momentum must be a number in \[0, 1\], got None"),
    ({"momentum": 1.5}, r"momentum must be a number in \[0, 1\], got 1.5"),
    ({"eps": -1e-5}, r"eps must be a number in \[0, inf\], got -1e-05"),
], ids=["act", "momentum None", "momentum 1.5", "eps"])
def test_bad_layer_options_are_refused_when_built(kwargs, says):
    name = "bn_relu" if "act" in kwargs else "b0"
    with pytest.raises(ValueError, match=says):
        norm_act(name, 8, **kwargs)
    if "eps" in kwargs:
        with pytest.raises(ValueError, match=says):
            norm_act("s0", 8, **kwargs)
    with pytest.raises(ValueError, match=r"num_features must be a whole number in \[1, inf\], got 0"):
        norm_act("s1", 0)
    with pytest.raises(ValueError, match=r"num_features must be a whole number .* got 8.0"):
        norm_act("b0", 8.0)
    assert norm_act("b0", np.int64(8)).num_features == 8  # a width from numpy arithmetic


@pytest.mark.parametrize("shape", [(2, 8, 5), (2, 8, 5, 7, 3)], ids=["3d", "5d"])
@pytest.mark.parametrize("name", NAMES)
def test_wrong_rank_raises(name, shape):
    with pytest.raises(ValueError, match=r"4D input \(N, C, H, W\)"):
        norm_act(name, 8)(torch.randn(shape))


@pytest.mark.parametrize("name", NAMES)
def test_wrong_channel_count_raises(name):
    with pytest.raises(ValueError, match="built for 8 channels but the input has 7"):
        norm_act(name, 8)(torch.randn(2, 7, 8, 8))


@pytest.mark.parametrize("name", NAMES)
def test_factory_device_and_dtype(name):
    layer = norm_act(name, 8, dtype=torch.float64)
    tensors = [*layer.parameters(), *(b for b in layer.buffers() if b.is_floating_point())]
    assert tensors and all(t.dtype == torch.float64 for t in tensors)
    assert all(t.device.type == "cpu" for t in norm_act(name, 8, device="cpu").parameters())
    meta = norm_act(name, 8, device="meta")
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])


@pytest.mark.parametrize("name, impl", EVO_CASES)
def test_parameter_init(name, impl):
    layer = make(name, SHAPE[1], impl, dtype=None)
    p = dict(layer.named_parameters())
    assert set(p) == ({"weight", "bias", "v"} if name in ("b0", "s0") else {"weight", "bias"})
    assert all(t.shape == (SHAPE[1],) for t in p.values())
    assert torch.equal(p["weight"], torch.ones(SHAPE[1]))
    assert torch.equal(p["bias"], torch.zeros(SHAPE[1]))
    if "v" in p:
        assert torch.equal(p["v"], torch.ones(SHAPE[1]))


def test_param_groups_weight_decay():
    stem = nn.Conv2d(3, 8, 3, bias=False)
    conv = nn.Conv2d(8, 8, 1)
    tied = nn.Conv2d(8, 8, 1, bias=False)
    tied.weight = conv.weight
    frozen = nn.Conv2d(8, 8, 1)
    frozen.requires_grad_(False)
    head = nn.Linear(8, 10)
    norms = [norm_act(n, 8) for n in NAMES] + [norm_act(n, 8, apply_act=False) for n in NAMES]
    model = nn.Sequential(stem, nn.Sequential(conv, *norms[:11]), nn.Sequential(tied, frozen, *norms[11:]), head)

    decay, no_decay = param_groups_weight_decay(model, 5e-4)

    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert Counter(map(id, decay["params"])) == Counter(map(id, [stem.weight, conv.weight, head.weight]))
    norm_params = [p for m in norms for p in m.parameters()]
    assert Counter(map(id, no_decay["params"])) == Counter(map(id, [conv.bias, head.bias, *norm_params]))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert Counter(map(id, decay["params"] + no_decay["params"])) == Counter(trainable)


# ---------------------------------------------------------------- sync_stats (B-series, several processes)

def _sync_stats_worker(rank, world, init_file, x, grad_y, states, out_dir, split):
    """One process of the two-process run: its share of the batch (``split`` samples and the rest, possibly none),
    gradients summed afterwards as DDP would."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        share = slice(0, split) if rank == 0 else slice(split, None)
        results = {}
        for name, state in states.items():
            layer = make(name, x.shape[1], "fast", sync_stats=True)
            layer.load_state_dict(state)
            xl = x[share].clone().requires_grad_()
            y = layer(xl)
            y.backward(grad_y[share])
            grads = [p.grad for p in layer.parameters()]
            for g in grads:
                dist.all_reduce(g)
            results[name] = {"y": y.detach(), "x_grad": xl.grad, "grads": grads, "running_var": layer.running_var}
        torch.save(results, f"{out_dir}/{rank}.pt")
        dist.barrier()  # neither process tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("split", [3, 4], ids=["3+1", "4+0"])
def test_sync_stats_two_processes_match_one_batch(tmp_path, split):
    """sync_stats=True on two gloo processes with uneven shares equals one process on the whole batch: outputs,
    input and parameter gradients, running variance. An empty share takes part in the backward all-reduces too (it
    used to leave them to the other process, which then waited for it forever)."""
    x, grad_y = sample_input((4, 6, 5, 3)), torch.randn(4, 6, 5, 3, dtype=torch.float64)
    layers = {name: randomize(make(name, 6, "reference")) for name in B_SERIES}
    states = {name: {k: v.clone() for k, v in layer.state_dict().items()} for name, layer in layers.items()}
    torch.multiprocessing.spawn(_sync_stats_worker, args=(2, tmp_path / "init", x, grad_y, states, tmp_path, split),
                                nprocs=2)
    shares = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for name, layer in layers.items():
        xf = x.clone().requires_grad_()
        y = layer(xf)
        y.backward(grad_y)
        got = [s[name] for s in shares]
        assert_close(torch.cat([g["y"] for g in got]), y.detach(), **TOL)
        assert_close(torch.cat([g["x_grad"] for g in got]), xf.grad, **TOL)
        for rank_result in got:
            for g, p in zip(rank_result["grads"], layer.parameters()):
                assert_close(g, p.grad, **TOL)
            assert_close(rank_result["running_var"], layer.running_var, **TOL)


@pytest.mark.parametrize("name", B_SERIES)
def test_sync_stats_is_off_by_default_and_per_device_without_a_process_group(name):
    assert make(name, 6).sync_stats is False
    x = sample_input((4, 6, 5, 3))
    plain, synced = make(name, 6), make(name, 6, sync_stats=True)
    assert_close(synced(x), plain(x), **TOL)
    assert_close(synced.running_var, plain.running_var, **TOL)
    assert "sync_stats=True" in repr(synced)
