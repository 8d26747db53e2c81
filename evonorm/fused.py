"""Fast EvoNorm (``impl="fast"``): autograd functions that save only the input and small statistics.

A chain of element-wise autograd ops keeps several input-sized tensors alive for backward (timm's port: ~5x the
input). These functions save x plus per-(n, c) or per-(n, group) statistics (~1x the input), recompute the
element-wise parts in backward and use analytic gradients. Each element-wise step is a single ATen kernel, in place on
temporaries where possible: on CPU every extra pass over the tensor costs about as much as the arithmetic in it.

- Statistics: one Welford pass of ``native_group_norm`` (``torch.var`` is ~15x slower on CPU). For the B-series the
  per-(n, c) moments also give the batch variance (law of total variance), so one pass serves both terms.
- Per-(n, c) sums of products come from the batch-norm backward reduction, which does not materialise the product.
- Half inputs: statistics and arithmetic in float32, output and input gradient in the input dtype.
- Backward is first-order only (``once_differentiable``): use ``impl="reference"`` for double backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from .common import stats_dtype

BATCH_VARIANTS = ("b0", "b1", "b2")


def _c(t: torch.Tensor) -> torch.Tensor:
    """(C,) or (1, C) -> (1, C, 1, 1)."""
    return t.view(1, -1, 1, 1)


def _nc(t: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C, 1, 1)."""
    return t.view(*t.shape, 1, 1)


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _moments(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, group) mean and 1 / sqrt(var + eps), each (N, groups), in one pass (the normalized output is unused)."""
    n, c, h, w = x.shape
    _, mean, rstd = torch.native_group_norm(x, None, None, n, c, h * w, groups, eps)
    return mean, rstd


def _sum_and_dot(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) sum(a) and sum(a * b) over (H, W), each (N, C), in one pass without materializing a * b.

    The batch-norm backward reduction over an (1, N*C, H, W) view with mean 0 and inverse std 1 returns exactly these
    as its bias and weight gradients.
    """
    n, c, h, w = a.shape
    zeros = a.new_zeros(n * c)
    _, dot, total = torch.ops.aten.native_batch_norm_backward(
        a.reshape(1, n * c, h, w), b.reshape(1, n * c, h, w), None, None, None, zeros, torch.ones_like(zeros),
        True, 0.0, [False, True, True])
    return total.view(n, c), dot.view(n, c)


def _instance_term(variant: str, mean: torch.Tensor, var: torch.Tensor, v: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) with instance term = alpha * x + beta; beta is (N, C, 1, 1), alpha broadcasts against x."""
    if variant == "b0":  # v * x + sqrt(var_{H,W} + eps)
        return _c(v), _nc((var + eps).sqrt())
    rms = _nc((var + mean.square() + eps).sqrt())  # sqrt(mean_{H,W}(x^2) + eps)
    if variant == "b1":  # (x + 1) * rms
        return rms, rms
    return rms.new_full((1, 1, 1, 1), -1.0), rms  # b2: rms - x


class EvoNormBatchFn(torch.autograd.Function):
    """y = x / max(batch_std, alpha * x + beta) * weight + bias; returns (y, batch variance used)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x, weight, bias, v, running_var, variant: str, eps: float, training: bool):
        with torch.autocast(x.device.type, enabled=False):
            f = stats_dtype(x)
            xs = x.contiguous().to(f)
            # eps 0: var = rstd^-2 recovers the variance exactly (a zero variance gives rstd inf, var 0).
            mean, rstd = _moments(xs, xs.shape[1], 0.0)
            var = rstd.pow(-2)
            if training:  # over (N, H, W): mean of the (n, c) variances + variance of the (n, c) means
                batch_var = var.mean(0) + mean.var(0, correction=0)
            else:
                batch_var = running_var.to(f)
            batch_std = (batch_var + eps).sqrt()
            alpha, beta = _instance_term(variant, mean, var, _as(v, f), eps)
            den = torch.addcmul(beta, alpha, xs)
            torch.maximum(den, _c(batch_std), out=den)
            y = torch.div(xs, den, out=den)
            y = torch.addcmul(_c(bias.to(f)), y, _c(weight.to(f)), out=y)
        ctx.save_for_backward(x, weight, v, mean, var, batch_std)
        ctx.variant, ctx.eps, ctx.training, ctx.bias_dtype = variant, eps, training, bias.dtype
        ctx.mark_non_differentiable(batch_var)
        return y.to(x.dtype), batch_var

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_y, _grad_batch_var):
        x, weight, v, mean, var, batch_std = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            f = mean.dtype
            xs = x.contiguous().to(f)
            gy = grad_y.contiguous().to(f)
            n, c, h, w = xs.shape
            w_c = weight.to(f).view(1, c)
            alpha, beta = _instance_term(ctx.variant, mean, var, _as(v, f), ctx.eps)
            den = torch.addcmul(beta, alpha, xs)
            inst = den > _c(batch_std)  # where the instance term is the max (a tie counts as the batch term)
            torch.maximum(den, _c(batch_std), out=den)
            y_hat = xs / den
            gy_den = torch.div(gy, den, out=den)
            sum_gy, dot_gy_yhat = _sum_and_dot(gy, y_hat)
            _, dot_all = _sum_and_dot(gy_den, y_hat)  # sum gy x / den^2; dL/dden = -weight * gy x / den^2
            inst_part = torch.mul(gy_den, y_hat, out=y_hat).mul_(inst)
            sum_inst, dot_inst_x = _sum_and_dot(inst_part, xs)

            g_beta = -w_c * sum_inst  # (N, C)
            g_alpha = -w_c * dot_inst_x  # (N, C), per-element alpha * x summed over (H, W)
            spatial = h * w
            grad_v = None
            if ctx.variant == "b0":  # beta = sqrt(var + eps): d beta / dx = (x - mean) / (HW * beta)
                grad_v = g_alpha.sum(0).to(v.dtype)
                k1 = g_beta / (beta.view(n, c) * spatial)
                k0 = -k1 * mean
            else:  # rms = sqrt(mean(x^2) + eps): d rms / dx = x / (HW * rms)
                g_rms = g_beta + g_alpha if ctx.variant == "b1" else g_beta
                k1 = g_rms / (beta.view(n, c) * spatial)
                k0 = torch.zeros_like(k1)
            if ctx.training:  # d batch_std / dx = (x - batch_mean) / (N HW batch_std)
                g_batch_std = (-w_c * (dot_all - sum_inst)).sum(0)
                kb = g_batch_std / (batch_std * n * spatial)
                k1 = k1 + kb
                k0 = k0 - kb * mean.mean(0)
            direct = gy_den.addcmul_(inst_part, alpha, value=-1)  # (gy - alpha * inst * gy x / den) / den
            grad_x = torch.addcmul(_nc(k0), xs, _nc(k1)).addcmul_(direct, _c(w_c))
        return (grad_x.to(x.dtype), dot_gy_yhat.sum(0).to(weight.dtype), sum_gy.sum(0).to(ctx.bias_dtype), grad_v,
                None, None, None, None)


class EvoNormSampleFn(torch.autograd.Function):
    """y = x * sigmoid(v * x) / sqrt(stat_group(x) + eps) * weight + bias (v None: sigmoid(x)).

    stat is the group variance (``centered``, S0/S1) or the group second moment (S2).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x, weight, bias, v, groups: int, eps: float, centered: bool):
        with torch.autocast(x.device.type, enabled=False):
            f = stats_dtype(x)
            xs = x.contiguous().to(f)
            if centered:
                mean, rstd = _moments(xs, groups, eps)
            else:  # second moment = var + mean^2 (eps 0 recovers var exactly)
                mean, rstd = _moments(xs, groups, 0.0)
                rstd = (rstd.pow(-2) + mean.square() + eps).rsqrt()
                mean = None
            if v is None:
                num = F.silu(xs)
            else:
                num = torch.mul(xs, _c(v.to(f))).sigmoid_().mul_(xs)
            scale = _c(weight.to(f)) * _nc(rstd.repeat_interleave(xs.shape[1] // groups, dim=1))
            y = torch.addcmul(_c(bias.to(f)), num, scale, out=num)
        ctx.save_for_backward(x, weight, v, mean, rstd)
        ctx.bias_dtype = bias.dtype
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_y):
        x, weight, v, mean, rstd = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            f = rstd.dtype
            xs = x.contiguous().to(f)
            gy = grad_y.contiguous().to(f)
            n, c, h, w = xs.shape
            groups = rstd.shape[1]
            w_c = weight.to(f).view(1, c)
            rstd_c = rstd.repeat_interleave(c // groups, dim=1)  # (N, C)
            grad_v = None
            if v is None:  # numerator silu(x)
                num = F.silu(xs)
                sum_gy, dot_gy_num = _sum_and_dot(gy, num)
                grad_bias = sum_gy.sum(0)
                g_num = torch.ops.aten.silu_backward(gy, xs)  # gy * d silu(x) / dx
            else:  # numerator x * sigmoid(z), z = v x: d/dx = silu'(z), d/dv = x^2 s (1 - s)
                z = xs * _c(v.to(f))
                s = torch.sigmoid(z)
                gy_x = gy * xs
                _, dot_gy_num = _sum_and_dot(gy_x, s)
                grad_bias = gy.sum((0, 2, 3))
                _, dot_v = _sum_and_dot(torch.ops.aten.sigmoid_backward(gy_x, s), xs)
                grad_v = (w_c * rstd_c * dot_v).sum(0).to(v.dtype)
                g_num = torch.ops.aten.silu_backward(gy, z)
            # rstd = (stat + eps)^-1/2 with d stat / dx = 2 (x - mean) / M (variance) or 2 x / M (second moment)
            g_rstd = (w_c * dot_gy_num).view(n, groups, -1).sum(2)
            k1 = -g_rstd * rstd.pow(3) / (c // groups * h * w)
            k0 = torch.zeros_like(k1) if mean is None else -k1 * mean
            repeat = c // groups
            grad_x = torch.addcmul(_nc(k0.repeat_interleave(repeat, 1)), xs, _nc(k1.repeat_interleave(repeat, 1)))
            grad_x.addcmul_(g_num, _nc(w_c * rstd_c))
        return (grad_x.to(x.dtype), (rstd_c * dot_gy_num).sum(0).to(weight.dtype), grad_bias.to(ctx.bias_dtype),
                grad_v, None, None, None)


def evonorm_batch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, v: torch.Tensor | None,
                  running_var: torch.Tensor, *, variant: str, eps: float,
                  training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """EvoNorm B0/B1/B2 with activation; returns (y, batch variance) (the running variance is not updated here)."""
    if variant not in BATCH_VARIANTS:
        raise ValueError(f"variant must be one of {BATCH_VARIANTS}, got {variant!r}")
    return EvoNormBatchFn.apply(x, weight, bias, v, running_var, variant, eps, training)


def evonorm_sample(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, v: torch.Tensor | None, *,
                   groups: int, eps: float, centered: bool) -> torch.Tensor:
    """EvoNorm S0 (v given), S1 (v None, centered) or S2 (v None, not centered) with activation."""
    return EvoNormSampleFn.apply(x, weight, bias, v, groups, eps, centered)
