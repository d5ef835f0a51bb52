// The decoder's elementwise steps, fused, for fp32 on the CPU (and greedy
// sampling's argmax).
//
// Between its GEMMs a layer ran ~20 small ATen ops: RMSNorm alone is pow,
// mean, add, rsqrt and two muls, RoPE a cat, two muls and an add, the MLP's
// activation a silu and a mul. Each op is a pass over memory plus dispatch,
// and at decode batch sizes the dispatch dominates (profile of a 32-sequence
// decode step: ~30% of it outside the GEMMs). These kernels do each step
// in one pass:
//   omni_rms_norm       out = x / sqrt(mean(x^2) + eps) * w
//   omni_add_rms_norm   x += delta (in place), then out = rms_norm(x)
//   omni_silu_and_mul   out = silu(gu[:, :n]) * gu[:, n:]   (vLLM's silu_and_mul)
//   omni_rope_          x = x * cos + rotate_half(x) * sin, in place
//   omni_argmax_rows    each row's argmax (greedy sampling), as torch.argmax
// Numerics follow transformers' fp32 code (RMSNorm in fp32, then the
// weight; silu(x) = x / (1 + e^-x)) up to summation order and a last-bit
// exp; the Rust side keeps ATen's composite for other dtypes and devices,
// and tests hold the two to each other. AVX2 + FMA when the CPU has them
// (runtime check), portable loops otherwise. Conventions: shim.h.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <cmath>
#include <limits>

#include "kernels.h"
#include "shim.h"
#include "simd.h"

namespace omni {
std::atomic<bool> force_portable{false};
}  // namespace omni

using omni::guarded;

namespace {

// Rows per parallel task: small problems (a decode step's 32 rows of 576)
// stay on the calling thread, where a fork/join would cost more than the
// work.
int64_t grain(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1)); }

// Runs `task(args, begin, end)` over `rows`: the AVX2 build of the task
// when the CPU has it. The row-range function, not the lambda around it,
// carries the target attribute, so the inlined row kernels are AVX2 code.
template <typename Args>
void run_rows(void (*generic)(const Args&, int64_t, int64_t),
              void (*avx2)(const Args&, int64_t, int64_t), const Args& args, int64_t rows,
              int64_t row_len) {
  auto task = omni::use_avx2() && avx2 != nullptr ? avx2 : generic;
  at::parallel_for(0, rows, grain(row_len), [&](int64_t b, int64_t e) { task(args, b, e); });
}

// ---- RMSNorm ----

struct NormArgs {
  float* x;  // written only when delta is set
  int64_t x_stride;
  const float* delta;
  int64_t delta_stride;
  const float* w;
  float* out;
  int64_t n;
  float eps;
};

// Sum of squares with independent partial sums, so the compiler vectorizes
// it without reassociating (no -ffast-math).
inline __attribute__((always_inline)) float sum_sq(const float* x, int64_t n) {
  constexpr int kLanes = 8;
  float part[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += x[i + l] * x[i + l];
  }
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// x += delta (when given), out = w * (x * inv_rms), rows [b, e).
inline __attribute__((always_inline)) void norm_range(const NormArgs& a, int64_t b, int64_t e) {
  const int64_t n = a.n;
  for (int64_t r = b; r < e; ++r) {
    float* x = a.x + r * a.x_stride;
    if (a.delta != nullptr) {
      const float* d = a.delta + r * a.delta_stride;
      for (int64_t i = 0; i < n; ++i) x[i] += d[i];
    }
    const float inv = 1.f / std::sqrt(sum_sq(x, n) / static_cast<float>(n) + a.eps);
    float* out = a.out + r * n;
    for (int64_t i = 0; i < n; ++i) out[i] = a.w[i] * (x[i] * inv);
  }
}

void norm_generic(const NormArgs& a, int64_t b, int64_t e) { norm_range(a, b, e); }

// ---- SiLU and mul ----

struct SiluArgs {
  const float* gu;
  int64_t stride;
  float* out;
  int64_t n;
};

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

void silu_generic(const SiluArgs& a, int64_t b, int64_t e) {
  for (int64_t r = b; r < e; ++r) {
    const float* g = a.gu + r * a.stride;
    float* o = a.out + r * a.n;
    for (int64_t i = 0; i < a.n; ++i) o[i] = silu(g[i]) * g[a.n + i];
  }
}

// ---- RoPE ----

struct RopeArgs {
  float* x;
  int64_t token_stride, head_stride;
  const float* cos;
  const float* sin;
  int64_t heads, d;
};

// Per head: x[:h] = x[:h] * cos[:h] + x[h:] * sin[:h] (the table's first
// half of sin is negated), x[h:] = x[h:] * cos[h:] + x[:h] * sin[h:].
inline __attribute__((always_inline)) void rope_range(const RopeArgs& a, int64_t b, int64_t e) {
  const int64_t d = a.d, half = d / 2;
  for (int64_t t = b; t < e; ++t) {
    const float* c = a.cos + t * d;
    const float* s = a.sin + t * d;
    for (int64_t h = 0; h < a.heads; ++h) {
      float* x = a.x + t * a.token_stride + h * a.head_stride;
      for (int64_t i = 0; i < half; ++i) {
        const float lo = x[i], hi = x[half + i];
        x[i] = lo * c[i] + hi * s[i];
        x[half + i] = hi * c[half + i] + lo * s[half + i];
      }
    }
  }
}

void rope_generic(const RopeArgs& a, int64_t b, int64_t e) { rope_range(a, b, e); }

// ---- Argmax of each row ----
//
// Greedy sampling's argmax over the logits. ATen's runs each row on one
// thread at ~4 GB/s: 2.8 ms of a 64-sequence decode step of SmolLM2
// (49152 columns), as long as that step's K/V writes, norms and SiLU
// together. Same answer as torch.argmax: the first maximum, and the first
// NaN if a row has one.

struct ArgmaxArgs {
  const float* x;
  int64_t stride;
  int64_t* out;
  int64_t n;
};

inline int64_t argmax_scalar(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

void argmax_generic(const ArgmaxArgs& a, int64_t b, int64_t e) {
  for (int64_t r = b; r < e; ++r) a.out[r] = argmax_scalar(a.x + r * a.stride, a.n);
}

#ifdef OMNI_X86
__attribute__((target("avx2,fma"))) void norm_avx2(const NormArgs& a, int64_t b, int64_t e) {
  norm_range(a, b, e);
}

__attribute__((target("avx2,fma"))) void rope_avx2(const RopeArgs& a, int64_t b, int64_t e) {
  rope_range(a, b, e);
}

__attribute__((target("avx2,fma"))) void silu_avx2(const SiluArgs& a, int64_t b, int64_t e) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 zero = _mm256_setzero_ps();
  const int64_t n = a.n;
  for (int64_t r = b; r < e; ++r) {
    const float* g = a.gu + r * a.stride;
    float* o = a.out + r * n;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 den = _mm256_add_ps(one, omni::exp_avx2(_mm256_sub_ps(zero, gv)));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(g + n + i)));
    }
    for (; i < n; ++i) o[i] = silu(g[i]) * g[n + i];
  }
}

// Two passes over the row (it stays in L2 between them): the maximum, 32
// lanes at a time, with a NaN check alongside; then the first position
// that equals it. A row with a NaN goes to the scalar loop, which returns
// the first NaN.
__attribute__((target("avx2,fma"))) void argmax_avx2(const ArgmaxArgs& a, int64_t b, int64_t e) {
  const int64_t n = a.n;
  for (int64_t r = b; r < e; ++r) {
    const float* x = a.x + r * a.stride;
    const __m256 lowest = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
    __m256 nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
      const __m256 v2 = _mm256_loadu_ps(x + i + 16), v3 = _mm256_loadu_ps(x + i + 24);
      m0 = _mm256_max_ps(m0, v0);
      m1 = _mm256_max_ps(m1, v1);
      m2 = _mm256_max_ps(m2, v2);
      m3 = _mm256_max_ps(m3, v3);
      nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(v0, v1, _CMP_UNORD_Q),
                                           _mm256_cmp_ps(v2, v3, _CMP_UNORD_Q)));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
    float m = lanes[0];
    for (int l = 1; l < 8; ++l) m = std::max(m, lanes[l]);
    bool has_nan = _mm256_movemask_ps(nan) != 0;
    for (; i < n; ++i) {
      has_nan |= std::isnan(x[i]);
      m = std::max(m, x[i]);
    }
    if (has_nan) {
      a.out[r] = argmax_scalar(x, n);
      continue;
    }
    const __m256 mv = _mm256_set1_ps(m);
    int64_t at = -1;
    for (i = 0; i + 8 <= n; i += 8) {
      const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), mv, _CMP_EQ_OQ));
      if (hit != 0) {
        at = i + __builtin_ctz(static_cast<unsigned>(hit));
        break;
      }
    }
    for (; at < 0 && i < n; ++i) {
      if (x[i] == m) at = i;
    }
    a.out[r] = at;
  }
}
#else
constexpr void (*norm_avx2)(const NormArgs&, int64_t, int64_t) = nullptr;
constexpr void (*rope_avx2)(const RopeArgs&, int64_t, int64_t) = nullptr;
constexpr void (*silu_avx2)(const SiluArgs&, int64_t, int64_t) = nullptr;
constexpr void (*argmax_avx2)(const ArgmaxArgs&, int64_t, int64_t) = nullptr;
#endif

// Checks `t` is [rows, n] fp32 on the CPU with unit stride along n.
void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name,
              " must be fp32 on the CPU, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-d with contiguous rows, got ",
              t.sizes(), " strides ", t.strides());
}

// rms_norm(x), after x += delta when `delta` is set (then `x` must be
// writable: the caller passes the tensor it owns).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& w_in,
                    double eps) {
  RECORD_FUNCTION("omni::rms_norm", std::vector<c10::IValue>());
  check_rows(x, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  const at::Tensor w = w_in.contiguous();
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.numel() == n, "weight must be ", n,
              " fp32 values, got ", w.sizes(), " ", w.scalar_type());
  if (delta != nullptr) {
    check_rows(*delta, "delta");
    TORCH_CHECK(delta->sizes() == x.sizes(), "delta ", delta->sizes(), " does not match x ",
                x.sizes());
  }
  at::Tensor out = at::empty({rows, n}, x.options());
  const NormArgs args{const_cast<float*>(x.const_data_ptr<float>()),
                      x.stride(0),
                      delta ? delta->const_data_ptr<float>() : nullptr,
                      delta ? delta->stride(0) : 0,
                      w.const_data_ptr<float>(),
                      out.mutable_data_ptr<float>(),
                      n,
                      static_cast<float>(eps)};
  run_rows<NormArgs>(norm_generic, norm_avx2, args, rows, n);
  return out;
}

// The build run_rows would pick for a row.
template <typename Args>
void run_row(void (*generic)(const Args&, int64_t, int64_t),
             void (*avx2)(const Args&, int64_t, int64_t), const Args& args) {
  (omni::use_avx2() && avx2 != nullptr ? avx2 : generic)(args, 0, 1);
}

}  // namespace

namespace omni {

void rms_norm_row(float* x, const float* delta, const float* w, float* out, int64_t n, float eps) {
  run_row<NormArgs>(norm_generic, norm_avx2, NormArgs{x, n, delta, n, w, out, n, eps});
}

void rope_row(float* x, int64_t heads, int64_t d, const float* cos, const float* sin) {
  run_row<RopeArgs>(rope_generic, rope_avx2, RopeArgs{x, heads * d, d, cos, sin, heads, d});
}

void silu_and_mul_row(const float* gu, float* out, int64_t n) {
  run_row<SiluArgs>(silu_generic, silu_avx2, SiluArgs{gu, 2 * n, out, n});
}

}  // namespace omni

extern "C" {

// Runs the portable loops of every CPU kernel (these and the paged
// attention) even where AVX2 is available (for tests).
void omni_fused_force_portable(bool on) {
  omni::force_portable.store(on, std::memory_order_relaxed);
}

// x: [rows, n] (rows may be strided); w: [n]. Returns a new [rows, n].
at::Tensor* omni_rms_norm(const at::Tensor* x, const at::Tensor* w, double eps, char** err) {
  return guarded(err, [&] { return rms_norm(*x, nullptr, *w, eps); });
}

// x += delta in place, then returns rms_norm(x) as a new tensor.
at::Tensor* omni_add_rms_norm(at::Tensor* x, const at::Tensor* delta, const at::Tensor* w,
                              double eps, char** err) {
  return guarded(err, [&] { return rms_norm(*x, delta, *w, eps); });
}

// gu: [rows, 2n] (gate then up). Returns [rows, n].
at::Tensor* omni_silu_and_mul(const at::Tensor* gu, char** err) {
  return guarded(err, [&] {
    RECORD_FUNCTION("omni::silu_and_mul", std::vector<c10::IValue>());
    check_rows(*gu, "gate_up");
    TORCH_CHECK(gu->size(1) % 2 == 0, "gate_up width ", gu->size(1), " is odd");
    const int64_t rows = gu->size(0), n = gu->size(1) / 2;
    at::Tensor out = at::empty({rows, n}, gu->options());
    const SiluArgs args{gu->const_data_ptr<float>(), gu->stride(0), out.mutable_data_ptr<float>(), n};
    run_rows<SiluArgs>(silu_generic, silu_avx2, args, rows, 2 * n);
    return out;
  });
}

// Rotates x: [tokens, heads, d] (last dim contiguous) in place with cos,
// sin: [tokens, d] (sin's first half negated, see rotary.rs). Returns x.
at::Tensor* omni_rope_(at::Tensor* x, const at::Tensor* cos, const at::Tensor* sin, char** err) {
  return guarded(err, [&] {
    RECORD_FUNCTION("omni::rope_", std::vector<c10::IValue>());
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat,
                "x must be fp32 on the CPU, got ", x->scalar_type(), " on ", x->device());
    TORCH_CHECK(x->dim() == 3 && x->stride(2) == 1 && x->size(2) % 2 == 0,
                "x must be [tokens, heads, even head_dim] with contiguous heads, got ", x->sizes(),
                " strides ", x->strides());
    const int64_t tokens = x->size(0), heads = x->size(1), d = x->size(2);
    const at::Tensor c = cos->contiguous(), s = sin->contiguous();
    for (const at::Tensor* t : {&c, &s}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == tokens * d,
                  "cos/sin must hold ", tokens, " x ", d, " fp32 values, got ", t->sizes());
    }
    const RopeArgs args{x->mutable_data_ptr<float>(), x->stride(0), x->stride(1),
                        c.const_data_ptr<float>(), s.const_data_ptr<float>(), heads, d};
    run_rows<RopeArgs>(rope_generic, rope_avx2, args, tokens, heads * d);
    return *x;
  });
}

// x: [rows, n] fp32 (rows may be strided), n >= 1. Returns [rows] int64.
at::Tensor* omni_argmax_rows(const at::Tensor* x, char** err) {
  return guarded(err, [&] {
    RECORD_FUNCTION("omni::argmax_rows", std::vector<c10::IValue>());
    check_rows(*x, "x");
    const int64_t rows = x->size(0), n = x->size(1);
    TORCH_CHECK(n >= 1, "argmax of rows of ", n, " values");
    at::Tensor out = at::empty({rows}, x->options().dtype(at::kLong));
    const ArgmaxArgs args{x->const_data_ptr<float>(), x->stride(0), out.mutable_data_ptr<int64_t>(),
                          n};
    run_rows<ArgmaxArgs>(argmax_generic, argmax_avx2, args, rows, n);
    return out;
  });
}
}
