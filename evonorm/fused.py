"""Fast EvoNorm (``impl="fast"``): autograd functions that save only the input and small statistics.

A chain of element-wise autograd ops keeps several input-sized tensors alive for backward (timm's port: ~5x the
input). These functions save x plus per-(n, c) or per-(n, group) statistics (~1x the input), recompute the
element-wise parts in backward and use analytic gradients (derived in the ``*_coefficients`` helpers).

- Statistics: one Welford pass of ``native_group_norm`` (``torch.var`` is ~15x slower on CPU). For the B-series the
  per-(n, c) moments also give the batch variance (law of total variance), so one pass serves both terms.
- Backward = per-(n, c) sums over (H, W) -> small per-(n, c) coefficient algebra -> one element-wise pass for the
  input gradient. The input-sized stages exist twice, computing the same thing:
  * ``*_plain``: plain formulas for ``torch.compile`` (inductor fuses each stage into one loop nest). They see x as
    (N*C, H*W) rows and every factor as an (N*C, 1) tensor, so that each stage compiles to one graph for all shapes
    and layer variants (per-group indexing with dynamic shapes would cost integer divisions per element).
  * ``*_eager``: one ATen kernel per step, in place in at most two temporaries. On CPU a fresh input-sized buffer
    costs more than the arithmetic done in it, per-(n, c) sums of products come from the batch-norm backward
    reduction (no product tensor) and branch masks use ``threshold_backward`` (boolean masks are slow).
- CPU float32 inputs: a layer call is one C++ autograd node (``evonorm.cpu_kernels``, built on first use) whose
  forward and backward are one kernel call each, the same formulas with the per-(n, c) algebra between two
  vectorized passes. Where the build fails, the eager stages, in the Python autograd functions below.
- CUDA (float32, float16 and bfloat16 inputs): the whole layer call is a few Triton launches
  (``evonorm.triton_kernels``, imported on first use; two forward, two backward, fewer on small maps) that also do
  the small per-(n, c), per-group and per-channel algebra and the running-variance update, reading and writing half
  tensors directly, unless compilation is "off".
  ``set_compile`` / ``EVONORM_COMPILE`` choose (``COMPILE_MODES``); a failed compilation or Triton launch (or a
  missing triton) warns once and falls back to the eager stages (a backward whose forward ran on Triton takes its
  statistics from the Triton workspace).
- Half inputs: statistics and arithmetic in float32, output and input gradient in the input dtype.
- Backward is first-order only (``once_differentiable``), and torch.func transforms and forward-mode AD raise: use
  ``impl="reference"`` for those.
"""
from __future__ import annotations

import logging
import os
from functools import partial
from typing import Callable

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from . import cpu_kernels, triton_native
from .common import check_choice, stats_dtype

log = logging.getLogger(__name__)
aten = torch.ops.aten

BATCH_VARIANTS = ("b0", "b1", "b2")
# auto: the fused C++ kernels for float32 CPU inputs; where they cannot be built, compile the stages for inputs of
# at least COMPILE_MIN_NUMEL elements (a compile costs seconds once per process and stage, so tests and small maps
# stay eager); on: compile always (any device, float32); off: never. CUDA inputs take the Triton stages instead
# unless the mode is off ("off" benchmarks the eager stages on every device).
COMPILE_MODES = ("auto", "on", "off")
COMPILE_MIN_NUMEL = 1 << 20
_compile_state: dict = {"mode": os.environ.get("EVONORM_COMPILE", "auto"), "failed": False, "kernels": {}}
# force: Triton stages for CPU tensors too, for tests under the Triton interpreter (TRITON_INTERPRET=1).
_triton_state: dict = {"failed": False, "force": False}
_cpu_state: dict = {"failed": False}


def set_compile(mode: str) -> None:
    """Choose when the input-sized stages go through torch.compile or Triton (``COMPILE_MODES``)."""
    _compile_state["mode"] = check_choice(mode, COMPILE_MODES, "compile mode")


def _compile_mode() -> str:
    return check_choice(_compile_state["mode"], COMPILE_MODES, "EVONORM_COMPILE")


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if _compile_mode() == "off" or torch.compiler.is_compiling() or _triton_state["failed"]:
        return False  # inside a user's torch.compile the plain stages are traced instead
    return x.dtype in TRITON_DTYPES and weight.dtype in TRITON_DTYPES and (x.is_cuda or _triton_state["force"])


def _use_cpu_kernels(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """The fused C++ kernels (evonorm.cpu_kernels): float32 CPU inputs and parameters under "auto"."""
    if not x.is_cpu or _cpu_state["failed"] or _compile_mode() != "auto" or torch.compiler.is_compiling():
        return False
    for t in (x, *params):  # a loop, not all(generator): this runs twice per layer call
        if t is not None and t.dtype != torch.float32:
            return False
    return True


def _use_compiled(x: torch.Tensor) -> bool:
    mode = _compile_mode()
    if torch.compiler.is_compiling():  # inside a user's torch.compile: it traces and fuses the plain stages
        return True
    if mode == "off" or _compile_state["failed"] or x.dtype != torch.float32:
        return False
    return mode == "on" or (x.device.type == "cpu" and x.numel() >= COMPILE_MIN_NUMEL)


def _run_compiled(stage: Callable, *args):
    """stage(*args) through torch.compile; None when compilation fails (the caller then runs the eager stages)."""
    if torch.compiler.is_compiling():
        return stage(*args)
    kernels = _compile_state["kernels"]
    if stage not in kernels:
        kernels[stage] = torch.compile(stage, dynamic=True, fullgraph=True)
    try:
        return kernels[stage](*args)
    except Exception as err:  # no C++ compiler, unsupported backend, recompile limit, ...
        log.warning("evonorm: torch.compile failed, using the eager kernels from now on (%s: %s)",
                    type(err).__name__, err)
        _compile_state["failed"] = True
        return None


def fallbacks() -> list[str]:
    """The fast paths that failed in this process, whose calls now run the eager stages (what a benchmark row
    labelled with that path would measure instead)."""
    states = {"fused CPU kernels": _cpu_state, "torch.compile stages": _compile_state, "Triton stages": _triton_state,
              "native Triton launches": triton_native._state}
    return [path for path, state in states.items() if state["failed"]]


def _fail(state: dict, failure: str, err: Exception) -> None:
    log.warning("evonorm: %s, using the eager kernels from now on (%s: %s)", failure, type(err).__name__, err)
    state["failed"] = True


def _triton_kernels():
    from . import triton_kernels  # imported on first use: it imports triton
    return triton_kernels


def _run_triton(name: str, *args):
    """evonorm.triton_kernels.<name>(*args); None when triton is missing or a launch fails (ImportError, no driver,
    compilation error, out of resources, ...) or failed before."""
    if _triton_state["failed"]:
        return None
    try:
        return getattr(_triton_kernels(), name)(*args)
    except Exception as err:
        _fail(_triton_state, "Triton stages failed", err)
        return None


def _run_cpu(name: str, *args):
    """torch.ops.evonorm_cpu.<name>(*args); None when the build fails (no C++ compiler or ninja, build error) or
    failed before. A call's own errors propagate: its inputs are what the layers guarantee, and what rejects the
    C++ autograd function (torch.func transforms, forward-mode AD, out of memory) rejects the eager stages too."""
    if _cpu_state["failed"]:
        return None
    try:
        ops = cpu_kernels.ops()
    except Exception as err:
        _fail(_cpu_state, "the fused CPU kernels are unavailable (they need a C++ compiler and ninja)", err)
        return None
    return getattr(ops, name)(*args)


def _run_stages(rows_stages: Callable, eager_stages: Callable, x: torch.Tensor, args: tuple):
    """The row-layout stages through torch.compile where the policy says so; the eager stages otherwise or when
    compilation fails."""
    out = rows_stages(_run_compiled, *args) if _use_compiled(x) else None
    return eager_stages(*args) if out is None else out


def _c(t: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C, 1, 1)."""
    return t.view(1, -1, 1, 1)


def _nc(t: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C, 1, 1)."""
    return t.view(*t.shape, 1, 1)


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in dtype (None stays None; no call where it has it already: a layer call's host time counts on GPUs)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Contiguous (N, C, H, W) -> (N*C, H*W), the layout of the compiled stages."""
    return x.view(x.shape[0] * x.shape[1], -1)


def _row_factor(t: torch.Tensor | None, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """A factor broadcastable to (N, C, 1, 1) (None: ``fill``) as the (N*C, 1) column of the compiled stages."""
    n, c = x.shape[:2]
    return x.new_full((n * c, 1), fill) if t is None else t.expand(n, c, 1, 1).reshape(n * c, 1)


def _moments(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scratch buffer like x, mean, 1 / sqrt(var + eps)) per (n, group) from one pass; the buffer holds garbage."""
    n, c, h, w = x.shape
    return torch.native_group_norm(x, None, None, n, c, h * w, groups, eps)


def _sum_and_dot(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) sum(a) and sum(a * b) over (H, W), each (N, C), in one pass without materializing a * b.

    The batch-norm backward reduction over an (1, N*C, H, W) view with mean 0 and inverse std 1 returns exactly these
    as its bias and weight gradients. The weight (ones) must be given: CUDA allocates those gradients like the
    weight and fails with "tensor does not have a device" without one (CPU does not care).
    """
    n, c, h, w = a.shape
    zeros = a.new_zeros(n * c)
    ones = torch.ones_like(zeros)
    _, dot, total = aten.native_batch_norm_backward(
        a.reshape(1, n * c, h, w), b.reshape(1, n * c, h, w), ones, None, None, zeros, ones,
        True, 0.0, [False, True, True])
    return total.view(n, c), dot.view(n, c)


def _add_stat_terms_eager(grad_x, x, k1, center, k0, scratch=None):
    """grad_x += k1 * (x - center) + k0 in place (center, k0 may be None); x - center goes into scratch.

    The input gradient through the statistics has this form with per-(n, c) k1, center, k0. Centering first, as
    autograd of a variance does, keeps it exact where x == center (one-element groups) and accurate when the mean
    is large against the spread; the compiled stages compute the same expression.
    """
    grad_x.addcmul_(x if center is None else torch.sub(x, center, out=scratch), k1)
    return grad_x if k0 is None else grad_x.add_(k0)


# ---------------------------------------------------------------------------------------------------------------
# B-series: y = x / max(alpha * x + beta, batch_std) * weight + bias, computed as
# r = max(a * x + b, 1) with a = alpha / batch_std, b = beta / batch_std (r > 1 exactly on the instance branch, r = 1
# on the batch branch) and y = x / r * scale + bias, scale = weight / batch_std.


def _instance_term(variant: str, mean: torch.Tensor, var: torch.Tensor, v: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) with instance term = alpha * x + beta; beta is (N, C, 1, 1), alpha broadcasts against x."""
    if variant == "b0":  # v * x + sqrt(var_{H,W} + eps)
        return _c(v), _nc((var + eps).sqrt())
    rms = _nc((var + mean.square() + eps).sqrt())  # sqrt(mean_{H,W}(x^2) + eps)
    if variant == "b1":  # (x + 1) * rms
        return rms, rms
    return rms.new_full((1, 1, 1, 1), -1.0), rms  # b2: rms - x


def _batch_coefficients(variant: str, training: bool, mean, beta, batch_std, weight, spatial: int, sums):
    """(k1, center, k0, weight gradient, v gradient): grad_x = (gy / r - a * q_inst) * scale + stat terms.

    sums, each (N, C) over (H, W): gy, gy x / r, q = gy x / r^2, q_inst = q on the instance branch, q_inst * x.
    dL/d den = -weight gy x / den^2 = -weight / batch_std^2 * q; its sums over each branch go to beta and alpha
    (instance branch) or batch_std (batch branch), and from there through the statistics to x.
    """
    _, dot_gy_t, dot_all, sum_inst, dot_inst_x = sums
    n, c = mean.shape
    w_ss = weight / batch_std.square()
    g_beta = -w_ss * sum_inst
    g_alpha = -w_ss * dot_inst_x  # alpha * x per element, summed
    beta = beta.view(n, c)
    grad_v = k0 = None
    if variant == "b0":  # beta = sqrt(var + eps): d beta / dx = (x - mean) / (HW beta)
        grad_v = g_alpha.sum(0)
        k1 = g_beta / (beta * spatial)
    else:  # beta = rms = sqrt(mean(x^2) + eps): d rms / dx = x / (HW rms) = ((x - mean) + mean) / (HW rms)
        k1 = (g_beta + g_alpha if variant == "b1" else g_beta) / (beta * spatial)  # b1 also has alpha = rms
        k0 = k1 * mean
    if training:  # d batch_std / dx = (x - batch_mean) / (N HW batch_std), x - batch_mean = (x - mean) + ...
        k_batch = (-w_ss * (dot_all - sum_inst)).sum(0) / (batch_std * n * spatial)
        k1 = k1 + k_batch
        k0 = (0 if k0 is None else k0) + k_batch * (mean - mean.mean(0))
    return _nc(k1), _nc(mean), None if k0 is None else _nc(k0), (dot_gy_t / batch_std).sum(0), grad_v


def _batch_forward_plain(buf, x, a, b, scale, bias):
    r = torch.clamp_min(a * x + b, 1.0)
    return buf.copy_(x / r * scale + bias)


def _batch_sums_plain(x, gy, a, b):
    r = torch.clamp_min(a * x + b, 1.0)
    t = x / r
    q = gy * t / r
    q_inst = torch.where(r > 1.0, q, 0.0)
    return tuple(s.sum(-1) for s in (gy, gy * t, q, q_inst, q_inst * x))


def _batch_grad_x_plain(x, gy, a, b, scale, k1, center, k0):
    r = torch.clamp_min(a * x + b, 1.0)
    q_inst = torch.where(r > 1.0, gy * x / (r * r), 0.0)
    return (gy / r - a * q_inst) * scale + k1 * (x - center) + k0


def _batch_forward_rows(run, buf, x, a, b, scale, bias):
    y = run(_batch_forward_plain, _rows(buf), _rows(x), *(_row_factor(t, x) for t in (a, b, scale, bias)))
    return None if y is None else y.view_as(x)


def _batch_backward_rows(run, x, gy, a, b, scale, coefficients):
    x_rows, gy_rows = _rows(x), _rows(gy)
    a, b, scale = (_row_factor(t, x) for t in (a, b, scale))
    sums = run(_batch_sums_plain, x_rows, gy_rows, a, b)
    if sums is None:
        return None
    sums = [s.view(x.shape[:2]) for s in sums]
    *stat_terms, grad_weight, grad_v = coefficients(sums)
    grad_x = run(_batch_grad_x_plain, x_rows, gy_rows, a, b, scale, *(_row_factor(t, x) for t in stat_terms))
    return None if grad_x is None else (grad_x.view_as(x), grad_weight, sums[0].sum(0), grad_v)


def _batch_forward_eager(buf, x, a, b, scale, bias):
    r = torch.mul(x, a, out=buf).add_(b).clamp_min_(1.0)
    return torch.div(x, r, out=r).mul_(scale).add_(bias)


def _batch_backward_eager(x, gy, a, b, scale, coefficients):
    r = torch.mul(x, a).add_(b).clamp_min_(1.0)
    t = x / r
    sum_gy, dot_gy_t = _sum_and_dot(gy, t)
    t.div_(r)
    _, dot_all = _sum_and_dot(gy, t)
    q_inst = aten.threshold_backward.grad_input(t, r, 1.0, grad_input=t).mul_(gy)
    sum_inst, dot_inst_x = _sum_and_dot(q_inst, x)
    *stat_terms, grad_weight, grad_v = coefficients((sum_gy, dot_gy_t, dot_all, sum_inst, dot_inst_x))
    grad_x = torch.div(gy, r, out=r).addcmul_(q_inst, a, value=-1).mul_(scale)
    return _add_stat_terms_eager(grad_x, x, *stat_terms, scratch=q_inst), grad_weight, sum_gy.sum(0), grad_v


def update_running_var(running_var: torch.Tensor, batch_var: torch.Tensor, momentum: float) -> None:
    """rv <- (1 - momentum) * rv + momentum * var (biased), per channel, skipping non-finite channels."""
    with torch.no_grad():
        var = batch_var.detach().to(running_var.dtype)
        updated = torch.lerp(running_var, var, momentum)
        running_var.copy_(torch.where(torch.isfinite(var), updated, running_var))


def _batch_forward(x, weight, bias, v, running_var, variant: str, eps: float, momentum: float, training: bool):
    """Eager or compiled stages: (y, saved statistics (mean, var, batch_std)); updates the running variance."""
    f = stats_dtype(x)
    xs = x.contiguous().to(f)
    # eps 0: var = rstd^-2 recovers the variance exactly (a zero variance gives rstd inf, var 0).
    buf, mean, rstd = _moments(xs, xs.shape[1], 0.0)
    var = rstd.pow(-2)
    if training:  # over (N, H, W): mean of the (n, c) variances + variance of the (n, c) means
        batch_var = var.mean(0) + (mean - mean.mean(0)).square().mean(0)  # torch.var: slow on CPU
        update_running_var(running_var, batch_var, momentum)
    else:
        batch_var = running_var.to(f)
    batch_std = (batch_var + eps).sqrt()
    alpha, beta = _instance_term(variant, mean, var, _as(v, f), eps)
    args = buf, xs, alpha / _c(batch_std), beta / _c(batch_std), _c(weight.to(f) / batch_std), _c(bias.to(f))
    return _run_stages(_batch_forward_rows, _batch_forward_eager, xs, args).to(x.dtype), (mean, var, batch_std)


def _batch_backward(x, grad_y, weight, v, stats, variant: str, eps: float, training: bool):
    """Eager or compiled stages: (grad_x, grad_weight, grad_bias, grad_v)."""
    mean, var, batch_std = stats
    f = mean.dtype
    xs = x.contiguous().to(f)
    w = weight.to(f)
    alpha, beta = _instance_term(variant, mean, var, _as(v, f), eps)
    coefficients = partial(_batch_coefficients, variant, training, mean, beta, batch_std, w,
                           xs.shape[2] * xs.shape[3])
    args = (xs, grad_y.contiguous().to(f), alpha / _c(batch_std), beta / _c(batch_std), _c(w / batch_std),
            coefficients)
    return _run_stages(_batch_backward_rows, _batch_backward_eager, xs, args)


def _workspace_for_backward(ctx: FunctionCtx, ws: torch.Tensor) -> torch.Tensor:
    """The Triton forward's workspace; a copy from the second backward on (retain_graph), since the parameter
    gradients of the first one are views of it."""
    if ctx.workspace_used:
        return ws.clone()
    ctx.workspace_used = True
    return ws


class EvoNormBatchFn(torch.autograd.Function):
    """EvoNorm B0/B1/B2 with activation; in training it also updates the running variance in place."""

    @staticmethod
    def forward(ctx: FunctionCtx, x, weight, bias, v, running_var, variant: str, eps: float, momentum: float,
                training: bool):
        # Triton launches: autocast does not touch them (and its context costs host time)
        y, ws, stats = None, None, (None, None, None)
        if _use_triton(x, weight):
            xc = x.contiguous()
            out, launches = triton_native.recorded(_run_triton, "batch_forward", xc, weight, bias, v, running_var,
                                                   variant, eps, momentum, training)
            if out is not None:
                y, ws = out
                if launches:
                    ctx.native_key = triton_native.add_forward(
                        triton_native.BATCH, launches, y, ws, xc, weight, bias, v, running_var,
                        BATCH_VARIANTS.index(variant), eps, momentum, training)
        if y is None:
            with torch.autocast(x.device.type, enabled=False):
                y, stats = _batch_forward(x, weight, bias, v, running_var, variant, eps, momentum, training)
        ctx.save_for_backward(x, weight, v, ws, *stats)
        ctx.variant, ctx.eps, ctx.training, ctx.bias_dtype = variant, eps, training, bias.dtype
        ctx.workspace_used = False
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_y):
        x, weight, v, ws, *stats = ctx.saved_tensors
        grads = None
        if ws is not None:
            ws = _workspace_for_backward(ctx, ws)
            xc, gy = x.contiguous(), grad_y.contiguous()
            grads, launches = triton_native.recorded(_run_triton, "batch_backward", xc, gy, ws, weight, v,
                                                     ctx.variant, ctx.eps, ctx.training)
            if launches and grads is not None:
                triton_native.add_backward(getattr(ctx, "native_key", None), launches, grads[0], xc, gy, ws, weight,
                                           v)
            if grads is None:
                from .triton_kernels import batch_saved_stats
                stats = batch_saved_stats(ws, *x.shape[:2])
        if grads is None:
            with torch.autocast(x.device.type, enabled=False):
                grads = _batch_backward(x, grad_y, weight, v, stats, ctx.variant, ctx.eps, ctx.training)
        grad_x, grad_weight, grad_bias, grad_v = grads
        return (_as(grad_x, x.dtype), _as(grad_weight, weight.dtype), _as(grad_bias, ctx.bias_dtype),
                None if v is None else _as(grad_v, v.dtype), None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# S-series: y = x * sigmoid(v * x) * rstd * weight + bias, rstd = 1 / sqrt(stat_group(x) + eps), v = 1 for S1/S2;
# stat is the group variance (S0, S1) or the group second moment (S2, mean None). scale = rstd * weight per (n, c).


def _per_channel(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, groups) -> (N, C): each group's value for its channels."""
    return t.repeat_interleave(channels // t.shape[1], dim=1)


def _sample_coefficients(mean, rstd, weight, spatial: int, sums):
    """(k1, center, k0, weight gradient, v gradient): grad_x = gy * d num / dx * scale + stat terms.

    sums, each (N, C) over (H, W): gy, gy * num, and gy * d num / dv (S0) or None. dL/d rstd = sum over the group
    of weight * gy * num; d rstd / dx = -rstd^3 / 2 * d stat / dx, d stat / dx = 2 (x - mean) / M (variance) or
    2 x / M (second moment), M = HW * channels per group.
    """
    _, dot_gy_num, dot_v = sums
    n, c = dot_gy_num.shape
    per_group = c // rstd.shape[1]
    g_rstd = (weight * dot_gy_num).view(n, -1, per_group).sum(2)
    k1 = _per_channel(-g_rstd * rstd.pow(3) / (per_group * spatial), c)
    center = None if mean is None else _nc(_per_channel(mean, c))
    rstd_c = _per_channel(rstd, c)
    grad_v = None if dot_v is None else (weight * rstd_c * dot_v).sum(0)
    return _nc(k1), center, None, (rstd_c * dot_gy_num).sum(0), grad_v


def _sample_forward_plain(buf, x, v, scale, bias):
    return buf.copy_(x * torch.sigmoid(v * x) * scale + bias)


def _sample_sums_plain(x, gy, v):
    s = torch.sigmoid(v * x)
    gy_num = gy * x * s
    return gy.sum(-1), gy_num.sum(-1), (gy_num * x * (1 - s)).sum(-1)  # d (x s) / dv = x^2 s (1 - s)


def _sample_grad_x_plain(x, gy, v, scale, k1, center, k0):
    z = v * x
    s = torch.sigmoid(z)
    return gy * (s + z * s * (1 - s)) * scale + k1 * (x - center) + k0  # d (x s) / dx = s + v x s (1 - s)


def _sample_forward_rows(run, buf, x, v, scale, bias):
    y = run(_sample_forward_plain, _rows(buf), _rows(x), _row_factor(v, x, 1.0), _row_factor(scale, x),
            _row_factor(bias, x))
    return None if y is None else y.view_as(x)


def _sample_backward_rows(run, x, gy, v, scale, coefficients):
    x_rows, gy_rows, v_rows = _rows(x), _rows(gy), _row_factor(v, x, 1.0)
    sums = run(_sample_sums_plain, x_rows, gy_rows, v_rows)
    if sums is None:
        return None
    sum_gy, dot_gy_num, dot_v = (s.view(x.shape[:2]) for s in sums)
    *stat_terms, grad_weight, grad_v = coefficients((sum_gy, dot_gy_num, None if v is None else dot_v))
    grad_x = run(_sample_grad_x_plain, x_rows, gy_rows, v_rows, _row_factor(scale, x),
                 *(_row_factor(t, x) for t in stat_terms))
    return None if grad_x is None else (grad_x.view_as(x), grad_weight, sum_gy.sum(0), grad_v)


def _sample_forward_eager(buf, x, v, scale, bias):
    num = aten.silu.out(x, out=buf) if v is None else torch.mul(x, v, out=buf).sigmoid_().mul_(x)
    return num.mul_(scale).add_(bias)


def _sample_backward_eager(x, gy, v, scale, coefficients):
    scratch = None
    if v is None:  # numerator silu(x)
        g_num = aten.silu.out(x, out=torch.empty_like(x))
        sum_gy, dot_gy_num = _sum_and_dot(gy, g_num)
        dot_v = None
        aten.silu_backward.grad_input(gy, x, grad_input=g_num)  # gy * d silu(x) / dx
    else:  # numerator x * s, s = sigmoid(v x): d/dx = s + v x s (1 - s), d/dv = x^2 s (1 - s)
        g_num = torch.mul(x, v).sigmoid_()  # s
        gy_x = gy * x
        _, dot_gy_num = _sum_and_dot(gy_x, g_num)
        aten.sigmoid_backward.grad_input(gy_x, g_num, grad_input=gy_x)  # gy x s (1 - s)
        _, dot_v = _sum_and_dot(gy_x, x)
        sum_gy = gy.sum((2, 3))
        g_num.mul_(gy).addcmul_(gy_x, v)  # gy * d num / dx
        scratch = gy_x
    *stat_terms, grad_weight, grad_v = coefficients((sum_gy, dot_gy_num, dot_v))
    grad_x = _add_stat_terms_eager(g_num.mul_(scale), x, *stat_terms, scratch=scratch)
    return grad_x, grad_weight, sum_gy.sum(0), grad_v


def _sample_forward(x, weight, bias, v, groups: int, eps: float, centered: bool):
    """Eager or compiled stages: (y, saved statistics (mean or None, rstd) per (n, group))."""
    f = stats_dtype(x)
    xs = x.contiguous().to(f)
    if centered:
        buf, mean, rstd = _moments(xs, groups, eps)
    else:  # second moment = var + mean^2 (eps 0 recovers var exactly)
        buf, mean, rstd = _moments(xs, groups, 0.0)
        rstd = (rstd.pow(-2) + mean.square() + eps).rsqrt()
        mean = None
    scale = _c(weight.to(f)) * _nc(_per_channel(rstd, xs.shape[1]))
    args = buf, xs, None if v is None else _c(v.to(f)), scale, _c(bias.to(f))
    return _run_stages(_sample_forward_rows, _sample_forward_eager, xs, args).to(x.dtype), (mean, rstd)


def _sample_backward(x, grad_y, weight, v, stats):
    """Eager or compiled stages: (grad_x, grad_weight, grad_bias, grad_v)."""
    mean, rstd = stats
    f = rstd.dtype
    xs = x.contiguous().to(f)
    w = weight.to(f)
    coefficients = partial(_sample_coefficients, mean, rstd, w, xs.shape[2] * xs.shape[3])
    args = (xs, grad_y.contiguous().to(f), None if v is None else _c(v.to(f)),
            _c(w) * _nc(_per_channel(rstd, xs.shape[1])), coefficients)
    return _run_stages(_sample_backward_rows, _sample_backward_eager, xs, args)


class EvoNormSampleFn(torch.autograd.Function):
    """EvoNorm S0 (v given), S1 (v None, centered) or S2 (v None, not centered) with activation."""

    @staticmethod
    def forward(ctx: FunctionCtx, x, weight, bias, v, groups: int, eps: float, centered: bool):
        # Triton launches: autocast does not touch them (and its context costs host time)
        y, ws, stats = None, None, (None, None)
        if _use_triton(x, weight):
            xc = x.contiguous()
            out, launches = triton_native.recorded(_run_triton, "sample_forward", xc, weight, bias, v, groups, eps,
                                                   centered)
            if out is not None:
                y, ws = out
                if launches:
                    ctx.native_key = triton_native.add_forward(
                        triton_native.SAMPLE, launches, y, ws, xc, weight, bias, v, None, groups, eps, 0.0, centered)
        if y is None:
            with torch.autocast(x.device.type, enabled=False):
                y, stats = _sample_forward(x, weight, bias, v, groups, eps, centered)
        ctx.save_for_backward(x, weight, v, ws, *stats)
        ctx.groups, ctx.eps, ctx.centered, ctx.bias_dtype = groups, eps, centered, bias.dtype
        ctx.workspace_used = False
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_y):
        x, weight, v, ws, *stats = ctx.saved_tensors
        grads = None
        if ws is not None:
            ws = _workspace_for_backward(ctx, ws)
            xc, gy = x.contiguous(), grad_y.contiguous()
            grads, launches = triton_native.recorded(_run_triton, "sample_backward", xc, gy, ws, weight, v,
                                                     ctx.groups, ctx.centered)
            if launches and grads is not None:
                triton_native.add_backward(getattr(ctx, "native_key", None), launches, grads[0], xc, gy, ws, weight,
                                           v)
            if grads is None:
                from .triton_kernels import sample_saved_stats
                stats = sample_saved_stats(ws, *x.shape[:2], ctx.groups, ctx.centered)
        if grads is None:
            with torch.autocast(x.device.type, enabled=False):
                grads = _sample_backward(x, grad_y, weight, v, stats)
        grad_x, grad_weight, grad_bias, grad_v = grads
        return (_as(grad_x, x.dtype), _as(grad_weight, weight.dtype), _as(grad_bias, ctx.bias_dtype),
                None if v is None else _as(grad_v, v.dtype), None, None, None)


def evonorm_batch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, v: torch.Tensor | None,
                  running_var: torch.Tensor, *, variant: str, eps: float, momentum: float,
                  training: bool) -> torch.Tensor:
    """EvoNorm B0/B1/B2 with activation; in training the running variance is updated in place."""
    check_choice(variant, BATCH_VARIANTS, "variant")
    if _use_triton(x, weight):
        if triton_native.enabled(x):
            y = triton_native.call(triton_native.BATCH, x, weight, bias, v, running_var,
                                   BATCH_VARIANTS.index(variant), eps, momentum, training)
            if y is not None:
                return y
    elif _use_cpu_kernels(x, weight, bias, v, running_var):
        y = _run_cpu("batch_act", x, weight, bias, v, running_var, BATCH_VARIANTS.index(variant), eps, momentum,
                     training)
        if y is not None:
            return y
    return EvoNormBatchFn.apply(x, weight, bias, v, running_var, variant, eps, momentum, training)


def evonorm_sample(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, v: torch.Tensor | None, *,
                   groups: int, eps: float, centered: bool) -> torch.Tensor:
    """EvoNorm S0 (v given), S1 (v None, centered) or S2 (v None, not centered) with activation."""
    if _use_triton(x, weight):
        if triton_native.enabled(x):
            y = triton_native.call(triton_native.SAMPLE, x, weight, bias, v, None, groups, eps, 0.0, centered)
            if y is not None:
                return y
    elif _use_cpu_kernels(x, weight, bias, v):
        y = _run_cpu("sample_act", x, weight, bias, v, groups, eps, centered)
        if y is not None:
            return y
    return EvoNormSampleFn.apply(x, weight, bias, v, groups, eps, centered)
