// Fused float32 CPU kernels of the fast EvoNorms: each forward and backward is one call doing two passes over the
// input (statistics, then output; sums, then input gradient) with the small per-(n, c), per-group and per-channel
// algebra in between, instead of ~40-110 ATen calls. Same formulas and evaluation order as the eager stages of
// evonorm/fused.py (which documents the derivations); sums accumulate in double like ATen's CPU reductions.
// A layer call is one C++ autograd node (batch_act, sample_act): on small maps the bookkeeping of a Python autograd
// function costs more than these kernels. Built by evonorm/cpu_kernels.py; registered as torch.ops.evonorm_cpu.*.
// Two memory layouts: contiguous (N, C, H, W), whose per-(n, c) rows are contiguous, and channels-last, where a
// sample is an (H W, C) block: per-(n, c) quantities are its columns, the loops run over channels innermost and the
// per-(n, c) coefficients are arrays. Same formulas either way; only the order of the sums differs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "once_differentiable.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kGrain = 1 << 15;  // elements per thread at least: smaller maps run on one thread
// Sums over a row: float partial sums over blocks of kBlock elements (16 per SIMD lane), added up in double. As
// accurate as double throughout for this purpose, at float's SIMD width and without conversions per element.
constexpr int64_t kBlock = 256;

// exp for |x| <= 88.37 (clamped; NaN passes through), a few ulp: Cephes' expf, branch-free so that the loops that
// call it vectorize (libm's expf does not).
inline float exp_approx(float x) {
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -88.3762626647949f ? -88.3762626647949f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

inline float sigmoid(float z) { return 1.0f / (1.0f + exp_approx(-z)); }

// Mean and biased variance of p[0:len], exact two-pass in double.
inline void moments(const float* p, int64_t len, float& mean, float& var) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) s += p[i];
  const double m = s / len;
  double ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < len; ++i) {
    const double d = p[i] - m;
    ss += d * d;
  }
  mean = static_cast<float>(m);
  var = static_cast<float>(ss / len);
}

// Column sums of an (len, c) block (a channels-last sample), in double: s[ch] = sum of p[:, ch].
std::vector<double> column_sums(const float* p, int64_t len, int64_t c) {
  std::vector<double> sums(c, 0.0);
  double* s = sums.data();
  for (int64_t i = 0; i < len; ++i) {
    const float* r = p + i * c;
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) s[ch] += r[ch];
  }
  return sums;
}

// Column sums of squared deviations from center[ch], in double (the second pass of a two-pass variance).
std::vector<double> column_squares(const float* p, int64_t len, int64_t c, const double* center) {
  std::vector<double> squares(c, 0.0);
  double* ss = squares.data();
  for (int64_t i = 0; i < len; ++i) {
    const float* r = p + i * c;
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) {
      const double d = r[ch] - center[ch];
      ss[ch] += d * d;
    }
  }
  return squares;
}

// Per (n, c) mean and biased variance of an (len, c) block: exact two-pass in double.
void column_moments(const float* p, int64_t len, int64_t c, float* mean, float* var) {
  std::vector<double> m = column_sums(p, len, c);
  for (int64_t ch = 0; ch < c; ++ch) m[ch] /= len;
  const std::vector<double> ss = column_squares(p, len, c, m.data());
  for (int64_t ch = 0; ch < c; ++ch) mean[ch] = static_cast<float>(m[ch]), var[ch] = static_cast<float>(ss[ch] / len);
}

// Rows in parallel, at least kGrain elements per thread.
template <typename F>
void for_rows(int64_t rows, int64_t len, const F& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(len, 1)), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) f(row);
  });
}

// The channels-last path: x channels-last and not contiguous, or with 1x1 maps (both layouts at once, where rows of
// one element would cost a loop each).
bool channels_last(const Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         (!x.is_contiguous() || x.size(2) * x.size(3) == 1);
}

at::MemoryFormat layout(const Tensor& x) {
  return channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Per-(n, c) work of the channels-last path in parallel, a sample's channels per task.
template <typename F>
void for_each_nc(int64_t n, int64_t c, const F& f) {
  for_rows(n, c, [&](int64_t i) {
    for (int64_t row = i * c; row < (i + 1) * c; ++row) f(row);
  });
}

void check(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() >= 2 &&
                  (t.is_contiguous() || channels_last(t)),
              "evonorm_cpu: ", name, " must be a contiguous or channels-last float32 CPU tensor of at least 2 "
              "dimensions");
}

// grad_y in x's layout.
void check_grad(const Tensor& grad_y, const Tensor& x) {
  check(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.is_contiguous(layout(x)),
              "evonorm_cpu: grad_y must have the shape and the memory layout of x");
}

// A small operand (parameter or statistics) of numel float32 elements, contiguous.
Tensor small(const Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == numel, "evonorm_cpu: ", name,
              " must be a float32 CPU tensor of ", numel, " elements");
  return t.contiguous();
}

Tensor small(const std::optional<Tensor>& t, int64_t numel, const char* name) {
  return t ? small(*t, numel, name) : Tensor();
}

const float* data(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// ---------------------------------------------------------------------------------------------------------------
// B-series. Per (n, c): instance term alpha * x + beta; a = alpha / batch_std, b = beta / batch_std,
// scale = weight / batch_std; r = max(a x + b, 1); y = x / r * scale + bias. variant: 0 b0, 1 b1, 2 b2.

struct BatchRow {
  float alpha, beta;
};

inline BatchRow instance_term(int64_t variant, float mean, float var, float v, float eps) {
  if (variant == 0) return {v, std::sqrt(var + eps)};
  const float rms = std::sqrt(var + mean * mean + eps);
  return {variant == 1 ? rms : -1.0f, rms};
}

// torch.lerp's formula (exact against update_running_var of the eager stages).
// r = max(a x + b, 1): the B-series denominator over batch_std (NaN kept, as clamp_min keeps it).
inline float batch_r(float x, float a, float b) {
  const float r = x * a + b;
  return 1.0f > r ? 1.0f : r;
}

inline float lerp(float start, float end, float weight) {
  const float diff = end - start;
  return std::abs(weight) < 0.5f ? start + weight * diff : end - diff * (1 - weight);
}

// Channels-last B-series, per (n, c) into arrays of n * c: a, b and beta, which the contiguous passes compute per
// row; and per channel the output scale weight / batch_std.
void batch_row_terms(int64_t n, int64_t c, int64_t variant, const float* pm, const float* pv, const float* pvv,
                     const float* pbs, float eps, float* a, float* b, float* beta) {
  for_each_nc(n, c, [&](int64_t row) {
    const int64_t ch = row % c;
    const BatchRow t = instance_term(variant, pm[row], pv[row], pvv ? pvv[ch] : 0.0f, eps);
    a[row] = t.alpha / pbs[ch], b[row] = t.beta / pbs[ch], beta[row] = t.beta;
  });
}

std::vector<float> batch_scale(int64_t c, const float* pw, const float* pbs) {
  std::vector<float> scale(c);
  for (int64_t ch = 0; ch < c; ++ch) scale[ch] = pw[ch] / pbs[ch];
  return scale;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                         const std::optional<Tensor>& v, const Tensor& running_var,
                                                         int64_t variant, double eps, double momentum,
                                                         bool training) {
  check(x, "x");
  const int64_t n = x.size(0), c = x.size(1), len = x.numel() / std::max<int64_t>(n * c, 1);
  const Tensor w = small(weight, c, "weight"), sh = small(bias, c, "bias"), vv = small(v, c, "v");
  const float *pw = data(w), *pb = data(sh), *pvv = data(vv);
  small(running_var, c, "running_var");
  TORCH_CHECK(running_var.is_contiguous(), "evonorm_cpu: running_var must be contiguous (it is updated in place)");
  float* prv = running_var.data_ptr<float>();
  const bool nhwc = channels_last(x);
  auto y = at::empty_like(x);
  auto mean = at::empty({n, c}, x.options()), var = at::empty({n, c}, x.options());
  auto batch_std = at::empty({c}, x.options());
  const float* px = x.data_ptr<float>();
  float *pm = mean.data_ptr<float>(), *pv = var.data_ptr<float>(), *pbs = batch_std.data_ptr<float>();
  if (nhwc) {
    for_rows(n, len * c, [&](int64_t i) { column_moments(px + i * len * c, len, c, pm + i * c, pv + i * c); });
  } else {
    for_rows(n * c, len, [&](int64_t row) { moments(px + row * len, len, pm[row], pv[row]); });
  }

  const float feps = static_cast<float>(eps);
  for_rows(c, n, [&](int64_t ch) {  // channels in parallel: each one's algebra is its own
    float batch_var = prv[ch];
    if (training) {  // over (N, H, W): mean of the (n, c) variances + variance of the (n, c) means
      float mean_of_means = 0, mean_of_vars = 0, spread = 0;
      for (int64_t i = 0; i < n; ++i) mean_of_means += pm[i * c + ch], mean_of_vars += pv[i * c + ch];
      mean_of_means /= n, mean_of_vars /= n;
      for (int64_t i = 0; i < n; ++i) spread += (pm[i * c + ch] - mean_of_means) * (pm[i * c + ch] - mean_of_means);
      batch_var = mean_of_vars + spread / n;
      if (std::isfinite(batch_var)) prv[ch] = lerp(prv[ch], batch_var, static_cast<float>(momentum));
    }
    pbs[ch] = std::sqrt(batch_var + feps);
  });

  float* py = y.data_ptr<float>();
  if (nhwc) {
    std::vector<float> a(n * c), b(n * c), beta(n * c);
    batch_row_terms(n, c, variant, pm, pv, pvv, pbs, feps, a.data(), b.data(), beta.data());
    const std::vector<float> scale = batch_scale(c, pw, pbs);
    const float* ps = scale.data();
    for_rows(n * len, c, [&](int64_t pos) {
      const float *xr = px + pos * c, *ar = a.data() + pos / len * c, *br = b.data() + pos / len * c;
      float* yr = py + pos * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) yr[ch] = xr[ch] / batch_r(xr[ch], ar[ch], br[ch]) * ps[ch] + pb[ch];
    });
    return {y, mean, var, batch_std};
  }
  for_rows(n * c, len, [&](int64_t row) {
    const int64_t ch = row % c;
    const BatchRow t = instance_term(variant, pm[row], pv[row], pvv ? pvv[ch] : 0.0f, feps);
    const float a = t.alpha / pbs[ch], b = t.beta / pbs[ch], scale = pw[ch] / pbs[ch], shift = pb[ch];
    const float* xr = px + row * len;
    float* yr = py + row * len;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) yr[i] = xr[i] / batch_r(xr[i], a, b) * scale + shift;
  });
  return {y, mean, var, batch_std};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_backward(const Tensor& x, const Tensor& grad_y, const Tensor& weight,
                                                          const std::optional<Tensor>& v, const Tensor& mean,
                                                          const Tensor& var, const Tensor& batch_std, int64_t variant,
                                                          double eps, bool training) {
  check(x, "x");
  check_grad(grad_y, x);
  const bool nhwc = channels_last(x);
  const int64_t n = x.size(0), c = x.size(1), len = x.numel() / std::max<int64_t>(n * c, 1), rows = n * c;
  const Tensor w = small(weight, c, "weight"), vv = small(v, c, "v"), m = small(mean, rows, "mean");
  const Tensor vr = small(var, rows, "var"), bs = small(batch_std, c, "batch_std");
  const float *px = x.data_ptr<float>(), *pg = grad_y.data_ptr<float>(), *pw = data(w), *pvv = data(vv);
  const float *pm = data(m), *pv = data(vr), *pbs = data(bs);
  const float feps = static_cast<float>(eps);
  // Per (n, c): a, b and the sums over (H, W) of gy, gy t, q, q_inst, q_inst x (t = x / r, q = gy t / r,
  // q_inst = q on the instance branch r > 1).
  std::vector<float> a(rows), b(rows), beta(rows), sum_gy(rows), dot_gy_t(rows), dot_all(rows), sum_inst(rows),
      dot_inst_x(rows);
  if (nhwc) {
    batch_row_terms(n, c, variant, pm, pv, pvv, pbs, feps, a.data(), b.data(), beta.data());
    for_rows(n, len * c, [&](int64_t i) {
      std::vector<double> sums(5 * c, 0.0);
      double *s0 = sums.data(), *s1 = s0 + c, *s2 = s1 + c, *s3 = s2 + c, *s4 = s3 + c;
      const float *ar = a.data() + i * c, *br = b.data() + i * c;
      for (int64_t pos = i * len; pos < (i + 1) * len; ++pos) {
        const float *xr = px + pos * c, *gr = pg + pos * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) {
          const float r = batch_r(xr[ch], ar[ch], br[ch]), inv_r = 1.0f / r, tt = xr[ch] * inv_r;
          const float q = gr[ch] * tt * inv_r, q_inst = r > 1.0f ? q : 0.0f;
          s0[ch] += gr[ch], s1[ch] += gr[ch] * tt, s2[ch] += q, s3[ch] += q_inst, s4[ch] += q_inst * xr[ch];
        }
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t row = i * c + ch;
        sum_gy[row] = s0[ch], dot_gy_t[row] = s1[ch], dot_all[row] = s2[ch], sum_inst[row] = s3[ch];
        dot_inst_x[row] = s4[ch];
      }
    });
  } else {
    for_rows(rows, len, [&](int64_t row) {
      const int64_t ch = row % c;
      const BatchRow t = instance_term(variant, pm[row], pv[row], pvv ? pvv[ch] : 0.0f, feps);
      const float ar = t.alpha / pbs[ch], br = t.beta / pbs[ch];
      const float *xr = px + row * len, *gr = pg + row * len;
      double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0;
      for (int64_t start = 0; start < len; start += kBlock) {
        float b0 = 0, b1 = 0, b2 = 0, b3 = 0, b4 = 0;
#pragma omp simd reduction(+ : b0, b1, b2, b3, b4)
        for (int64_t i = start; i < std::min(len, start + kBlock); ++i) {
          const float r = batch_r(xr[i], ar, br), inv_r = 1.0f / r, tt = xr[i] * inv_r, q = gr[i] * tt * inv_r;
          const float q_inst = r > 1.0f ? q : 0.0f;
          b0 += gr[i], b1 += gr[i] * tt, b2 += q, b3 += q_inst, b4 += q_inst * xr[i];
        }
        s0 += b0, s1 += b1, s2 += b2, s3 += b3, s4 += b4;
      }
      a[row] = ar, b[row] = br, beta[row] = t.beta;
      sum_gy[row] = s0, dot_gy_t[row] = s1, dot_all[row] = s2, sum_inst[row] = s3, dot_inst_x[row] = s4;
    });
  }

  // Coefficients of grad_x = (gy / r - a q_inst) scale + k1 (x - mean) + k0 and the parameter gradients.
  auto grad_weight = at::empty({c}, x.options()), grad_bias = at::empty({c}, x.options());
  auto grad_v = at::empty({variant == 0 ? c : 0}, x.options());
  float *pgw = grad_weight.data_ptr<float>(), *pgb = grad_bias.data_ptr<float>(), *pgv = grad_v.data_ptr<float>();
  std::vector<float> k1(rows), k0(rows);
  for_rows(c, n, [&](int64_t ch) {
    const float w_ss = pw[ch] / (pbs[ch] * pbs[ch]);
    float gv = 0, gw = 0, gb = 0, batch_grad = 0, mean_of_means = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = i * c + ch;
      const float g_beta = -w_ss * sum_inst[row], g_alpha = -w_ss * dot_inst_x[row];
      const float k = (variant == 1 ? g_beta + g_alpha : g_beta) / (beta[row] * len);
      k1[row] = k;
      k0[row] = variant == 0 ? 0.0f : k * pm[row];
      gv += g_alpha, gw += dot_gy_t[row] / pbs[ch], gb += sum_gy[row];  // empty batch: 0, not 0 / NaN
      batch_grad += -w_ss * (dot_all[row] - sum_inst[row]);
      mean_of_means += pm[row];
    }
    if (training) {  // through batch_std: d batch_std / dx = (x - batch_mean) / (N HW batch_std)
      const float k_batch = batch_grad / (pbs[ch] * n * len);
      mean_of_means /= n;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = i * c + ch;
        k1[row] += k_batch, k0[row] += k_batch * (pm[row] - mean_of_means);
      }
    }
    if (variant == 0) pgv[ch] = gv;
    pgw[ch] = gw, pgb[ch] = gb;
  });

  auto grad_x = at::empty_like(x);
  float* pgx = grad_x.data_ptr<float>();
  if (nhwc) {
    const std::vector<float> scale = batch_scale(c, pw, pbs);
    const float* ps = scale.data();
    for_rows(n * len, c, [&](int64_t pos) {
      const int64_t base = pos / len * c;
      const float *ar = a.data() + base, *br = b.data() + base, *kr1 = k1.data() + base, *kr0 = k0.data() + base;
      const float *center = pm + base, *xr = px + pos * c, *gr = pg + pos * c;
      float* out = pgx + pos * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        const float r = batch_r(xr[ch], ar[ch], br[ch]), inv_r = 1.0f / r;
        const float q_inst = r > 1.0f ? gr[ch] * xr[ch] * inv_r * inv_r : 0.0f;
        out[ch] = (gr[ch] * inv_r - q_inst * ar[ch]) * ps[ch] + kr1[ch] * (xr[ch] - center[ch]) + kr0[ch];
      }
    });
    return {grad_x, grad_weight, grad_bias, grad_v};
  }
  for_rows(rows, len, [&](int64_t row) {
    const int64_t ch = row % c;
    const float ar = a[row], br = b[row], scale = pw[ch] / pbs[ch], kr1 = k1[row], kr0 = k0[row], center = pm[row];
    const float *xr = px + row * len, *gr = pg + row * len;
    float* out = pgx + row * len;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float r = batch_r(xr[i], ar, br), inv_r = 1.0f / r;
      const float q_inst = r > 1.0f ? gr[i] * xr[i] * inv_r * inv_r : 0.0f;
      out[i] = (gr[i] * inv_r - q_inst * ar) * scale + kr1 * (xr[i] - center) + kr0;
    }
  });
  return {grad_x, grad_weight, grad_bias, grad_v};
}

// ---------------------------------------------------------------------------------------------------------------
// S-series: y = num * rstd * weight + bias per (n, group), num = x sigmoid(v x) (S0) or silu(x) (v None);
// rstd = 1 / sqrt(var + eps) (centered) or 1 / sqrt(mean(x^2) + eps).

std::tuple<Tensor, Tensor, Tensor> sample_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                  const std::optional<Tensor>& v, int64_t groups, double eps,
                                                  bool centered) {
  check(x, "x");
  const int64_t n = x.size(0), c = x.size(1), len = x.numel() / std::max<int64_t>(n * c, 1);
  TORCH_CHECK(groups > 0 && c % groups == 0, "evonorm_cpu: groups must divide the channels");
  const int64_t per_group = c / groups;
  const bool nhwc = channels_last(x);
  auto y = at::empty_like(x);
  auto mean = at::empty({n, groups}, x.options()), rstd = at::empty({n, groups}, x.options());
  const float* px = x.data_ptr<float>();
  float *pm = mean.data_ptr<float>(), *pr = rstd.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  const auto normalize = [&](int64_t row, float m, float var) {
    pm[row] = m;
    pr[row] = 1.0f / std::sqrt(centered ? var + feps : var + m * m + feps);
  };
  if (nhwc) {  // per channel, then per group: the sums of a group's columns
    for_rows(n, len * c, [&](int64_t i) {
      const float* p = px + i * len * c;
      const std::vector<double> s = column_sums(p, len, c);
      std::vector<double> group_mean(groups), channel_mean(c);
      for (int64_t g = 0; g < groups; ++g) {
        double total = 0;
        for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ++ch) total += s[ch];
        group_mean[g] = total / (per_group * len);
      }
      for (int64_t ch = 0; ch < c; ++ch) channel_mean[ch] = group_mean[ch / per_group];
      const std::vector<double> ss = column_squares(p, len, c, channel_mean.data());
      for (int64_t g = 0; g < groups; ++g) {
        double total = 0;
        for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ++ch) total += ss[ch];
        normalize(i * groups + g, static_cast<float>(group_mean[g]), static_cast<float>(total / (per_group * len)));
      }
    });
  } else {
    for_rows(n * groups, per_group * len, [&](int64_t row) {
      float m, var;
      moments(px + row * per_group * len, per_group * len, m, var);
      normalize(row, m, var);
    });
  }

  const Tensor w = small(weight, c, "weight"), sh = small(bias, c, "bias"), vv = small(v, c, "v");
  const float *pw = data(w), *pb = data(sh), *pvv = data(vv);
  float* py = y.data_ptr<float>();
  if (nhwc) {
    std::vector<float> scale(n * c), ones(pvv ? 0 : c, 1.0f);
    for_each_nc(n, c, [&](int64_t row) { scale[row] = pw[row % c] * pr[row / per_group]; });
    const float* pv = pvv ? pvv : ones.data();
    for_rows(n * len, c, [&](int64_t pos) {
      const float *xr = px + pos * c, *sr = scale.data() + pos / len * c;
      float* yr = py + pos * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) yr[ch] = xr[ch] * sigmoid(pv[ch] * xr[ch]) * sr[ch] + pb[ch];
    });
    if (!centered) mean = at::empty({0}, x.options());
    return {y, mean, rstd};
  }
  for_rows(n * c, len, [&](int64_t row) {
    const int64_t ch = row % c;
    const float scale = pw[ch] * pr[row / per_group], shift = pb[ch], vr = pvv ? pvv[ch] : 1.0f;
    const float* xr = px + row * len;
    float* yr = py + row * len;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) yr[i] = xr[i] * sigmoid(vr * xr[i]) * scale + shift;
  });
  if (!centered) mean = at::empty({0}, x.options());
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sample_backward(const Tensor& x, const Tensor& grad_y, const Tensor& weight,
                                                           const std::optional<Tensor>& v,
                                                           const std::optional<Tensor>& mean, const Tensor& rstd,
                                                           int64_t groups) {
  check(x, "x");
  check_grad(grad_y, x);
  const bool nhwc = channels_last(x);
  const int64_t n = x.size(0), c = x.size(1), len = x.numel() / std::max<int64_t>(n * c, 1), rows = n * c;
  TORCH_CHECK(groups > 0 && c % groups == 0, "evonorm_cpu: groups must divide the channels");
  const int64_t per_group = c / groups;
  const Tensor w = small(weight, c, "weight"), vv = small(v, c, "v");
  const Tensor m = small(mean, n * groups, "mean"), r = small(rstd, n * groups, "rstd");
  const float *px = x.data_ptr<float>(), *pg = grad_y.data_ptr<float>(), *pw = data(w), *pvv = data(vv);
  const float *pr = data(r), *pm = data(m);
  // Per (n, c): sums over (H, W) of gy, gy num and gy d num / dv = gy x^2 s (1 - s), s = sigmoid(v x).
  std::vector<float> sum_gy(rows), dot_gy_num(rows), dot_v(rows), ones(pvv ? 0 : c, 1.0f);
  const float* pv = pvv ? pvv : ones.data();
  if (nhwc) {
    for_rows(n, len * c, [&](int64_t i) {
      std::vector<double> sums(3 * c, 0.0);
      double *s0 = sums.data(), *s1 = s0 + c, *s2 = s1 + c;
      for (int64_t pos = i * len; pos < (i + 1) * len; ++pos) {
        const float *xr = px + pos * c, *gr = pg + pos * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) {
          const float s = sigmoid(pv[ch] * xr[ch]), gy_x = gr[ch] * xr[ch];
          s0[ch] += gr[ch], s1[ch] += gy_x * s, s2[ch] += gy_x * s * (1.0f - s) * xr[ch];
        }
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        sum_gy[i * c + ch] = s0[ch], dot_gy_num[i * c + ch] = s1[ch], dot_v[i * c + ch] = s2[ch];
      }
    });
  } else {
    for_rows(rows, len, [&](int64_t row) {
      const float vr = pvv ? pvv[row % c] : 1.0f;
      const float *xr = px + row * len, *gr = pg + row * len;
      double s0 = 0, s1 = 0, s2 = 0;
      for (int64_t start = 0; start < len; start += kBlock) {
        float b0 = 0, b1 = 0, b2 = 0;
#pragma omp simd reduction(+ : b0, b1, b2)
        for (int64_t i = start; i < std::min(len, start + kBlock); ++i) {
          const float s = sigmoid(vr * xr[i]), gy_x = gr[i] * xr[i];
          b0 += gr[i], b1 += gy_x * s, b2 += gy_x * s * (1.0f - s) * xr[i];
        }
        s0 += b0, s1 += b1, s2 += b2;
      }
      sum_gy[row] = s0, dot_gy_num[row] = s1, dot_v[row] = s2;
    });
  }

  // k1 per (n, group): dL/d rstd = sum of weight gy num over the group, d rstd / dx = -rstd^3 (x - center) / M.
  std::vector<float> k1(n * groups);
  for_rows(n * groups, per_group, [&](int64_t row) {
    float g_rstd = 0;
    for (int64_t ch = row * per_group; ch < (row + 1) * per_group; ++ch) g_rstd += pw[ch % c] * dot_gy_num[ch];
    k1[row] = -g_rstd * pr[row] * pr[row] * pr[row] / (per_group * len);
  });
  auto grad_weight = at::empty({c}, x.options()), grad_bias = at::empty({c}, x.options());
  auto grad_v = at::empty({v ? c : 0}, x.options());
  float *pgw = grad_weight.data_ptr<float>(), *pgb = grad_bias.data_ptr<float>(), *pgv = grad_v.data_ptr<float>();
  for_rows(c, n, [&](int64_t ch) {
    float gw = 0, gb = 0, gv = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = i * c + ch;
      const float rstd_c = pr[row / per_group];
      gw += rstd_c * dot_gy_num[row], gb += sum_gy[row], gv += pw[ch] * rstd_c * dot_v[row];
    }
    pgw[ch] = gw, pgb[ch] = gb;
    if (v) pgv[ch] = gv;
  });

  auto grad_x = at::empty_like(x);
  float* pgx = grad_x.data_ptr<float>();
  if (nhwc) {  // per-(n, c) factors: scale, k and center of the channel's group
    std::vector<float> scale(rows), k(rows), center(rows);
    for_each_nc(n, c, [&](int64_t row) {
      const int64_t group = row / per_group;
      scale[row] = pw[row % c] * pr[group], k[row] = k1[group], center[row] = pm ? pm[group] : 0.0f;
    });
    for_rows(n * len, c, [&](int64_t pos) {
      const int64_t base = pos / len * c;
      const float *sr = scale.data() + base, *kr = k.data() + base, *cr = center.data() + base;
      const float *xr = px + pos * c, *gr = pg + pos * c;
      float* out = pgx + pos * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) {
        const float z = pv[ch] * xr[ch], s = sigmoid(z);
        out[ch] = gr[ch] * (s + z * s * (1.0f - s)) * sr[ch] + kr[ch] * (xr[ch] - cr[ch]);
      }
    });
    return {grad_x, grad_weight, grad_bias, grad_v};
  }
  for_rows(rows, len, [&](int64_t row) {
    const int64_t group = row / per_group;
    const float vr = pvv ? pvv[row % c] : 1.0f, scale = pw[row % c] * pr[group], k = k1[group];
    const float center = pm ? pm[group] : 0.0f;
    const float *xr = px + row * len, *gr = pg + row * len;
    float* out = pgx + row * len;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {  // d (x s) / dx = s + v x s (1 - s)
      const float z = vr * xr[i], s = sigmoid(z);
      out[i] = gr[i] * (s + z * s * (1.0f - s)) * scale + k * (xr[i] - center);
    }
  });
  return {grad_x, grad_weight, grad_bias, grad_v};
}

// ---------------------------------------------------------------------------------------------------------------
// Layer calls. The kernels go through the dispatcher, as when Python calls them (operator counts see them).

template <typename Signature>
c10::TypedOperatorHandle<Signature> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::optional<Tensor> optional(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

// x in the kernels' layouts: channels-last as given, anything else contiguous.
Tensor dense(const Tensor& x) { return channels_last(x) ? x : x.contiguous(); }

// x is saved as given and made dense again in backward; v undefined for B1 and B2.
struct BatchAct : torch::autograd::Function<BatchAct> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                        const std::optional<Tensor>& v, const Tensor& running_var, int64_t variant, double eps,
                        double momentum, bool training) {
    static auto op = kernel<decltype(batch_forward)>("evonorm_cpu::batch_forward");
    auto [y, mean, var, batch_std] = op.call(dense(x), weight, bias, v, running_var, variant, eps, momentum,
                                             training);
    ctx->save_for_backward({x, weight, v.value_or(Tensor()), mean, var, batch_std});
    ctx->saved_data["variant"] = variant;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["training"] = training;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = kernel<decltype(batch_backward)>("evonorm_cpu::batch_backward");
    return evonorm::once_differentiable(grads, [&]() -> variable_list {
      auto s = ctx->get_saved_variables();
      const Tensor x = dense(s[0]);
      auto [gx, gw, gb, gv] = op.call(x, grads[0].contiguous(layout(x)), s[1], optional(s[2]), s[3], s[4], s[5],
                                      ctx->saved_data["variant"].toInt(), ctx->saved_data["eps"].toDouble(),
                                      ctx->saved_data["training"].toBool());
      return {gx, gw, gb, s[2].defined() ? gv : Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    });
  }
};

// v undefined for S1 and S2; the mean is saved where the statistics are centered (S0, S1).
struct SampleAct : torch::autograd::Function<SampleAct> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                        const std::optional<Tensor>& v, int64_t groups, double eps, bool centered) {
    static auto op = kernel<decltype(sample_forward)>("evonorm_cpu::sample_forward");
    auto [y, mean, rstd] = op.call(dense(x), weight, bias, v, groups, eps, centered);
    ctx->save_for_backward({x, weight, v.value_or(Tensor()), centered ? mean : Tensor(), rstd});
    ctx->saved_data["groups"] = groups;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = kernel<decltype(sample_backward)>("evonorm_cpu::sample_backward");
    return evonorm::once_differentiable(grads, [&]() -> variable_list {
      auto s = ctx->get_saved_variables();
      const Tensor x = dense(s[0]);
      auto [gx, gw, gb, gv] = op.call(x, grads[0].contiguous(layout(x)), s[1], optional(s[2]), optional(s[3]),
                                      s[4], ctx->saved_data["groups"].toInt());
      return {gx, gw, gb, s[2].defined() ? gv : Tensor(), Tensor(), Tensor(), Tensor()};
    });
  }
};

Tensor batch_act(const Tensor& x, const Tensor& weight, const Tensor& bias, const std::optional<Tensor>& v,
                 const Tensor& running_var, int64_t variant, double eps, double momentum, bool training) {
  return BatchAct::apply(x, weight, bias, v, running_var, variant, eps, momentum, training);
}

Tensor sample_act(const Tensor& x, const Tensor& weight, const Tensor& bias, const std::optional<Tensor>& v,
                  int64_t groups, double eps, bool centered) {
  return SampleAct::apply(x, weight, bias, v, groups, eps, centered);
}

}  // namespace

TORCH_LIBRARY(evonorm_cpu, m) {
  m.def("batch_forward(Tensor x, Tensor weight, Tensor bias, Tensor? v, Tensor(a!) running_var, int variant, "
        "float eps, float momentum, bool training) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_backward(Tensor x, Tensor grad_y, Tensor weight, Tensor? v, Tensor mean, Tensor var, "
        "Tensor batch_std, int variant, float eps, bool training) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("sample_forward(Tensor x, Tensor weight, Tensor bias, Tensor? v, int groups, float eps, bool centered) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("sample_backward(Tensor x, Tensor grad_y, Tensor weight, Tensor? v, Tensor? mean, Tensor rstd, "
        "int groups) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_act(Tensor x, Tensor weight, Tensor bias, Tensor? v, Tensor(a!) running_var, int variant, "
        "float eps, float momentum, bool training) -> Tensor");
  m.def("sample_act(Tensor x, Tensor weight, Tensor bias, Tensor? v, int groups, float eps, bool centered) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(evonorm_cpu, CPU, m) {
  m.impl("batch_forward", batch_forward);
  m.impl("batch_backward", batch_backward);
  m.impl("sample_forward", sample_forward);
  m.impl("sample_backward", sample_backward);
}

// The layer calls run above autograd (CompositeImplicitAutograd): their autograd function records the node, and
// the kernels it calls dispatch to CPU.
TORCH_LIBRARY_IMPL(evonorm_cpu, CompositeImplicitAutograd, m) {
  m.impl("batch_act", batch_act);
  m.impl("sample_act", sample_act);
}
