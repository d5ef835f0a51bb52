// Linear layers over GGUF's quantized blocks, read as the file stores them.
//
// At batch 1 a decode step reads every weight once, so its speed is the
// bytes of weights per token: fp16 weights cost SmolLM2-135M ~270 MB a
// token, its Q4_1 blocks ~90 MB. These kernels keep the blocks (Q4_0, Q4_1,
// Q8_0, Q4_K, Q6_K) and dequantize them in registers, 16 weights at a time,
// straight into fp32 multiply-adds with fp32 activations: no weight is ever
// written out, and the result is the dense product of the dequantized
// matrix up to summation order (by default activations are not quantized,
// unlike llama.cpp, so greedy output stays transformers' on the dequantized
// model; `int8_activations` opts in to llama.cpp's scheme, see below).
//
// One source (quant_kernels.inc) is compiled three times: AVX-512 (F, BW),
// AVX2 + FMA + F16C, and portable C++; the widest the CPU has runs, and
// tests cap it (omni_quant_force_level) to check the others on one machine.
// Output rows are split between libtorch's intra-op threads.
//
// A matrix is a list of segments, each a run of output rows in one block
// type: a fused q/k/v projection whose parts were quantized differently
// stays one matrix. Conventions: shim.h.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kernels.h"
#include "shim.h"
#include "simd.h"

using omni::guarded;
using omni::guarded_ptr;

namespace {

// ggml's type ids.
enum QType : int32_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };

// (elements, bytes) per block; false for a type without a kernel.
bool block_layout(int32_t type, int64_t* elems, int64_t* bytes) {
  switch (type) {
    case kQ4_0: *elems = 32, *bytes = 18; return true;
    case kQ4_1: *elems = 32, *bytes = 20; return true;
    case kQ8_0: *elems = 32, *bytes = 34; return true;
    case kQ4_K: *elems = 256, *bytes = 144; return true;
    case kQ6_K: *elems = 256, *bytes = 210; return true;
    default: return false;
  }
}

struct Segment {
  int32_t type;
  int64_t rows;
  int64_t in_features;
  int64_t row_bytes;
  int64_t col0;  // first output column
  const uint8_t* data;
};

struct Problem {
  const float* x;
  int64_t ldx;
  float* y;
  int64_t ldy;
  int64_t m;
};

struct Matrix {
  int64_t in_features = 0;
  int64_t out_features = 0;
  std::vector<Segment> segments;
  // Keep the bytes alive (uint8 CPU tensors; `Segment::data` points in).
  std::vector<at::Tensor> storage;
};

// fp16 bits -> float, for the portable build (subnormals, inf and NaN kept).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      float f = static_cast<float>(mant) * (1.0f / 16777216.0f);  // mant * 2^-24
      std::memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline uint16_t read16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

}  // namespace

#define OMNI_INLINE_LAMBDA __attribute__((always_inline))

// ---- portable ----
namespace portable {
namespace {
struct F {
  float v[16];
};
struct I {
  int32_t v[16];
};
#define OMNI_EACH for (int i = 0; i < 16; ++i)
inline __attribute__((always_inline)) I load_u8(const uint8_t* p) {
  I r;
  OMNI_EACH r.v[i] = p[i];
  return r;
}
inline __attribute__((always_inline)) I load_i8(const uint8_t* p) {
  I r;
  OMNI_EACH r.v[i] = static_cast<int8_t>(p[i]);
  return r;
}
inline __attribute__((always_inline)) I and_(I a, int m) {
  OMNI_EACH a.v[i] &= m;
  return a;
}
inline __attribute__((always_inline)) I or_(I a, I b) {
  OMNI_EACH a.v[i] |= b.v[i];
  return a;
}
inline __attribute__((always_inline)) I sub_(I a, int c) {
  OMNI_EACH a.v[i] -= c;
  return a;
}
template <int S>
inline __attribute__((always_inline)) I srl(I a) {
  OMNI_EACH a.v[i] = static_cast<int32_t>(static_cast<uint32_t>(a.v[i]) >> S);
  return a;
}
template <int S>
inline __attribute__((always_inline)) I sll(I a) {
  OMNI_EACH a.v[i] = static_cast<int32_t>(static_cast<uint32_t>(a.v[i]) << S);
  return a;
}
inline __attribute__((always_inline)) F cvt(I a) {
  F r;
  OMNI_EACH r.v[i] = static_cast<float>(a.v[i]);
  return r;
}
inline __attribute__((always_inline)) F set1(float f) {
  F r;
  OMNI_EACH r.v[i] = f;
  return r;
}
inline __attribute__((always_inline)) F zero() { return set1(0.f); }
inline __attribute__((always_inline)) F loadf(const float* p) {
  F r;
  OMNI_EACH r.v[i] = p[i];
  return r;
}
inline __attribute__((always_inline)) void storef(float* p, F a) { OMNI_EACH p[i] = a.v[i]; }
inline __attribute__((always_inline)) F fma(F a, F b, F c) {
  OMNI_EACH c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return c;
}
inline __attribute__((always_inline)) F mul(F a, F b) {
  OMNI_EACH a.v[i] *= b.v[i];
  return a;
}
inline __attribute__((always_inline)) float hsum(F a) {
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a.v[i] += a.v[i + w];
  return a.v[0];
}
inline __attribute__((always_inline)) float h2f(const uint8_t* p) {
  return half_bits_to_float(read16(p));
}
#undef OMNI_EACH
#include "quant_kernels.inc"
}  // namespace
}  // namespace portable

#ifdef OMNI_X86
// ---- AVX2 + FMA + F16C: a group is two 8-float registers ----
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
namespace {
struct F {
  __m256 lo, hi;
};
struct I {
  __m256i lo, hi;
};
inline __attribute__((always_inline)) I load_u8(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))};
}
inline __attribute__((always_inline)) I load_i8(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi8_epi32(b), _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))};
}
inline __attribute__((always_inline)) I and_(I a, int m) {
  const __m256i v = _mm256_set1_epi32(m);
  return {_mm256_and_si256(a.lo, v), _mm256_and_si256(a.hi, v)};
}
inline __attribute__((always_inline)) I or_(I a, I b) {
  return {_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)};
}
inline __attribute__((always_inline)) I sub_(I a, int c) {
  const __m256i v = _mm256_set1_epi32(c);
  return {_mm256_sub_epi32(a.lo, v), _mm256_sub_epi32(a.hi, v)};
}
template <int S>
inline __attribute__((always_inline)) I srl(I a) {
  return {_mm256_srli_epi32(a.lo, S), _mm256_srli_epi32(a.hi, S)};
}
template <int S>
inline __attribute__((always_inline)) I sll(I a) {
  return {_mm256_slli_epi32(a.lo, S), _mm256_slli_epi32(a.hi, S)};
}
inline __attribute__((always_inline)) F cvt(I a) {
  return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)};
}
inline __attribute__((always_inline)) F set1(float f) {
  const __m256 v = _mm256_set1_ps(f);
  return {v, v};
}
inline __attribute__((always_inline)) F zero() { return set1(0.f); }
inline __attribute__((always_inline)) F loadf(const float* p) {
  return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
}
inline __attribute__((always_inline)) void storef(float* p, F a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline __attribute__((always_inline)) F fma(F a, F b, F c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline __attribute__((always_inline)) F mul(F a, F b) {
  return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
inline __attribute__((always_inline)) float hsum(F a) {
  return omni::hsum_avx2(_mm256_add_ps(a.lo, a.hi));
}
inline __attribute__((always_inline)) float h2f(const uint8_t* p) { return _cvtsh_ss(read16(p)); }
#include "quant_kernels.inc"
}  // namespace
}  // namespace avx2
#pragma GCC pop_options

// ---- AVX-512 (F + BW): a group is one 16-float register ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
namespace {
struct F {
  __m512 v;
};
struct I {
  __m512i v;
};
inline __attribute__((always_inline)) I load_u8(const uint8_t* p) {
  return {_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline __attribute__((always_inline)) I load_i8(const uint8_t* p) {
  return {_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline __attribute__((always_inline)) I and_(I a, int m) {
  return {_mm512_and_si512(a.v, _mm512_set1_epi32(m))};
}
inline __attribute__((always_inline)) I or_(I a, I b) { return {_mm512_or_si512(a.v, b.v)}; }
inline __attribute__((always_inline)) I sub_(I a, int c) {
  return {_mm512_sub_epi32(a.v, _mm512_set1_epi32(c))};
}
template <int S>
inline __attribute__((always_inline)) I srl(I a) {
  return {_mm512_srli_epi32(a.v, S)};
}
template <int S>
inline __attribute__((always_inline)) I sll(I a) {
  return {_mm512_slli_epi32(a.v, S)};
}
inline __attribute__((always_inline)) F cvt(I a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline __attribute__((always_inline)) F set1(float f) { return {_mm512_set1_ps(f)}; }
inline __attribute__((always_inline)) F zero() { return {_mm512_setzero_ps()}; }
inline __attribute__((always_inline)) F loadf(const float* p) { return {_mm512_loadu_ps(p)}; }
inline __attribute__((always_inline)) void storef(float* p, F a) { _mm512_storeu_ps(p, a.v); }
inline __attribute__((always_inline)) F fma(F a, F b, F c) {
  return {_mm512_fmadd_ps(a.v, b.v, c.v)};
}
inline __attribute__((always_inline)) F mul(F a, F b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline __attribute__((always_inline)) float hsum(F a) {
  // Pairwise halves, as the portable build sums.
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a.v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)));
  return omni::hsum_avx2(h);
}
inline __attribute__((always_inline)) float h2f(const uint8_t* p) { return _cvtsh_ss(read16(p)); }
#include "quant_kernels.inc"
}  // namespace
}  // namespace avx512
#pragma GCC pop_options
#endif  // OMNI_X86

// ---- 8-bit activations (WeightPrecision::Q4Int8) ----
//
// llama.cpp's scheme for Q4_0, Q4_1 and Q8_0 weights: the activation row is
// quantized per 32 elements to int8 with one fp32 scale (d = max|x| / 127,
// q = x / d rounded to nearest even), and a block's product is an integer
// dot (exact) scaled once: w . x = dw dx sum(qw qx) (+ mw dx sum(qx) for
// Q4_1's minimum; Q4_0 is Q4_1 with mw = -8 dw). The weights' nibbles then
// never become floats: AVX2 multiplies bytes (maddubs) 32 at a time. The
// result is exactly the dequantized matrix times the dequantized
// activations, up to fp32 summation order; the activations' rounding (up to
// d / 2 per element) is what the fp32 path does not have.
//
// Only calls of one row take this path: the fp32 kernels unpack a weight
// block once for up to 4 rows, and from 2 rows on they were as fast as an
// int8 kernel tiled the same way (`cargo bench -p omni-engine --bench
// quant`); at one row the int8 dot is 1.4-2x faster (BENCHMARKS.md).
namespace {

constexpr int64_t kQ8Block = 32;

// One activation row, quantized.
// (kernels.h: decode_layer.cpp makes them too.)
using omni::Q8Row;

bool has_q8_kernel(int32_t type) { return type == kQ4_0 || type == kQ4_1 || type == kQ8_0; }

// The same code for every kernel build, so each sees the same quantized
// row. Written to vectorize at the baseline (SSE2): no libm call per
// element; rounding to nearest even by adding and taking away 1.5 * 2^23
// (exact for |v| <= 127, in the default rounding mode; no -ffast-math here).
void quantize_row(const float* x, int64_t in, Q8Row& out) {
  const int64_t blocks = in / kQ8Block;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23
  out.q.resize(in);
  out.d.resize(blocks);
  out.dsum.resize(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + b * kQ8Block;
    int8_t* qb = out.q.data() + b * kQ8Block;
    float amax = 0.f;
    int bad = 0;
    for (int j = 0; j < kQ8Block; ++j) {
      const float a = std::fabs(xb[j]);
      bad |= !(a <= std::numeric_limits<float>::max());  // inf or NaN
      amax = a > amax ? a : amax;
    }
    std::memset(qb, 0, kQ8Block);
    if (bad) {
      // The scale carries it (q is 0), so the block's products are NaN,
      // as the fp32 path's would be, never a converted NaN.
      out.d[b] = out.dsum[b] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    if (!(id <= std::numeric_limits<float>::max())) {
      // max|x| under 127 / FLT_MAX: 1 / d overflows; the block is zero to
      // well past fp32's resolution of the sum.
      out.d[b] = out.dsum[b] = 0.f;
      continue;
    }
    const float d = amax / 127.f;
    int32_t sum = 0;
    for (int j = 0; j < kQ8Block; ++j) {
      float v = (xb[j] * id + kRound) - kRound;
      v = v < -127.f ? -127.f : (v > 127.f ? 127.f : v);
      qb[j] = static_cast<int8_t>(static_cast<int32_t>(v));
      sum += qb[j];
    }
    out.d[b] = d;
    out.dsum[b] = d * static_cast<float>(sum);
  }
}

// Per block type: bytes, and where the quants start (after the fp16 scale
// and, for Q4_1, the fp16 minimum).
template <int32_t T>
struct Q8Layout;
template <>
struct Q8Layout<kQ4_0> {
  static constexpr int64_t kBytes = 18, kQuants = 2;
};
template <>
struct Q8Layout<kQ4_1> {
  static constexpr int64_t kBytes = 20, kQuants = 4;
};
template <>
struct Q8Layout<kQ8_0> {
  static constexpr int64_t kBytes = 34, kQuants = 2;
};

// The integer dot of one block's quants with 32 int8 activations.
template <int32_t T>
inline int32_t block_idot_portable(const uint8_t* qs, const int8_t* x) {
  int32_t s = 0;
  if constexpr (T == kQ8_0) {
    for (int j = 0; j < 32; ++j) s += static_cast<int8_t>(qs[j]) * x[j];
  } else {
    for (int j = 0; j < 16; ++j) s += (qs[j] & 15) * x[j] + (qs[j] >> 4) * x[j + 16];
  }
  return s;
}

// Weight rows [n0, n1) of segment `s` against the row: y[col0 + n].
template <int32_t T>
void q8_rows_portable(const Segment& s, const Q8Row& a, float* y, int64_t n0, int64_t n1) {
  using L = Q8Layout<T>;
  const int64_t blocks = s.in_features / kQ8Block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = s.data + n * s.row_bytes;
    float acc = 0.f, accm = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* blk = w + b * L::kBytes;
      const float dw = half_bits_to_float(read16(blk));
      const int32_t idot = block_idot_portable<T>(blk + L::kQuants, a.q.data() + b * kQ8Block);
      acc = std::fma(dw * a.d[b], static_cast<float>(idot), acc);
      if constexpr (T != kQ8_0) {
        const float mw = T == kQ4_1 ? half_bits_to_float(read16(blk + 2)) : -8.f * dw;
        accm = std::fma(mw, a.dsum[b], accm);
      }
    }
    y[s.col0 + n] = acc + accm;
  }
}

}  // namespace

#ifdef OMNI_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace {

// 32 nibbles as bytes, in ggml's order: byte j's low nibble is element j,
// its high nibble element j + 16.
inline __attribute__((always_inline)) __m256i nibbles32(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(15));
}

// Eight int32 partial sums of u8 x i8. maddubs saturates its int16 pair
// sums, which stay under 2^15 here: at most 2 * 15 * 127 for nibbles,
// 2 * 128 * 127 for Q8_0's |q| (activations never reach -128).
inline __attribute__((always_inline)) __m256i dot_u8_i8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// NR weight rows against the row: y[r] = w_r . x.
template <int32_t T, int NR>
inline __attribute__((always_inline)) void q8_tile_avx2(const uint8_t* w, int64_t row_bytes,
                                                        int64_t blocks, const Q8Row& a,
                                                        float* y) {
  using L = Q8Layout<T>;
  __m256 acc[NR];
  float accm[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps(), accm[r] = 0.f;
  // Prefetch the tile two ahead, a slice per block (as the fp32 kernels).
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(w) + 2 * NR * row_bytes;
  const int64_t slice = (NR * row_bytes + blocks - 1) / blocks;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t at = b * slice; at < (b + 1) * slice; at += 64)
      __builtin_prefetch(reinterpret_cast<const void*>(ahead + at), 0, 3);
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + b * kQ8Block));
    const float dx = a.d[b];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* blk = w + r * row_bytes + b * L::kBytes;
      const float dw = _cvtsh_ss(read16(blk));
      __m256i p;
      if constexpr (T == kQ8_0) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + L::kQuants));
        // |q| times x with q's sign: u8 x i8 (|-128| is 128 as a u8).
        p = dot_u8_i8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q));
      } else {
        p = dot_u8_i8(nibbles32(blk + L::kQuants), xv);
        const float mw = T == kQ4_1 ? _cvtsh_ss(read16(blk + 2)) : -8.f * dw;
        accm[r] = std::fma(mw, a.dsum[b], accm[r]);
      }
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), _mm256_cvtepi32_ps(p), acc[r]);
    }
  }
  for (int r = 0; r < NR; ++r) y[r] = omni::hsum_avx2(acc[r]) + accm[r];
}

template <int32_t T>
void q8_rows_avx2(const Segment& s, const Q8Row& a, float* y, int64_t n0, int64_t n1) {
  const int64_t blocks = s.in_features / kQ8Block;
  const int64_t rb = s.row_bytes;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) q8_tile_avx2<T, 4>(s.data + n * rb, rb, blocks, a, y + s.col0 + n);
  for (; n < n1; ++n) q8_tile_avx2<T, 1>(s.data + n * rb, rb, blocks, a, y + s.col0 + n);
}

}  // namespace
#pragma GCC pop_options
#endif  // OMNI_X86

namespace {

// 0 = portable, 1 = AVX2, 2 = AVX-512: the widest build this CPU runs.
int cpu_level() {
#ifdef OMNI_X86
  static const int level = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return 2;
    return avx2 ? 1 : 0;
  }();
  return level;
#else
  return 0;
#endif
}

// Tests lower it to run the narrower builds (-1: no cap).
std::atomic<int> level_cap{-1};

// OMNI_QUANT_BUILD=portable|avx2|avx512 caps the build for the whole
// process (benchmarks: a narrower build's speed on this CPU); unset, no
// cap; anything else is named on stderr and ignored.
int env_cap() {
  static const int cap = [] {
    const char* v = std::getenv("OMNI_QUANT_BUILD");
    if (v == nullptr) return -1;
    const std::string s(v);
    if (s == "portable") return 0;
    if (s == "avx2") return 1;
    if (s == "avx512") return 2;
    std::fprintf(stderr, "OMNI_QUANT_BUILD=%s is not portable, avx2 or avx512: ignored\n", v);
    return -1;
  }();
  return cap;
}

int active_level() {
  int cap = level_cap.load(std::memory_order_relaxed);
  if (cap < 0) cap = env_cap();
  return cap < 0 ? cpu_level() : std::min(cap, cpu_level());
}

void run_segment_at(int level, const Segment& s, const Problem& p, int64_t n0, int64_t n1) {
#ifdef OMNI_X86
  if (level >= 2) return avx512::run_segment(s, p, n0, n1);
  if (level == 1) return avx2::run_segment(s, p, n0, n1);
#endif
  (void)level;
  portable::run_segment(s, p, n0, n1);
}

void run_q8_segment_at(int level, const Segment& s, const Q8Row& a, float* y, int64_t n0,
                       int64_t n1) {
#ifdef OMNI_X86
  // AVX-512 parts run the AVX2 build: its byte products are the work, and
  // 256-bit maddubs is what both have.
  if (level >= 1) {
    switch (s.type) {
      case kQ4_0: return q8_rows_avx2<kQ4_0>(s, a, y, n0, n1);
      case kQ4_1: return q8_rows_avx2<kQ4_1>(s, a, y, n0, n1);
      case kQ8_0: return q8_rows_avx2<kQ8_0>(s, a, y, n0, n1);
    }
  }
#endif
  (void)level;
  switch (s.type) {
    case kQ4_0: return q8_rows_portable<kQ4_0>(s, a, y, n0, n1);
    case kQ4_1: return q8_rows_portable<kQ4_1>(s, a, y, n0, n1);
    case kQ8_0: return q8_rows_portable<kQ8_0>(s, a, y, n0, n1);
  }
}

void dequant_segment_at(int level, const Segment& s, const int64_t* rows, int64_t count,
                        float* out) {
#ifdef OMNI_X86
  if (level >= 2) return avx512::dequant_segment(s, rows, count, out);
  if (level == 1) return avx2::dequant_segment(s, rows, count, out);
#endif
  (void)level;
  portable::dequant_segment(s, rows, count, out);
}

// Output columns [b, e) of the product, one activation row or more (`p`).
void run_columns(const Matrix& mat, const Problem& p, const Q8Row* q8, int level, int64_t b,
                 int64_t e) {
  for (const Segment& s : mat.segments) {
    const int64_t lo = std::max(b, s.col0), hi = std::min(e, s.col0 + s.rows);
    if (lo >= hi) continue;
    if (q8 != nullptr && has_q8_kernel(s.type)) {
      run_q8_segment_at(level, s, *q8, p.y, lo - s.col0, hi - s.col0);
    } else {
      run_segment_at(level, s, p, lo - s.col0, hi - s.col0);
    }
  }
}

bool takes_q8(const Matrix& mat) {
  return std::any_of(mat.segments.begin(), mat.segments.end(),
                     [](const Segment& s) { return has_q8_kernel(s.type); });
}

}  // namespace

namespace omni {

int64_t quant_in_features(const void* matrix) {
  return static_cast<const Matrix*>(matrix)->in_features;
}

int64_t quant_out_features(const void* matrix) {
  return static_cast<const Matrix*>(matrix)->out_features;
}

bool quant_takes_q8(const void* matrix) { return takes_q8(*static_cast<const Matrix*>(matrix)); }

void quantize_q8(const float* x, int64_t n, Q8Row& out) { quantize_row(x, n, out); }

int quant_level() { return active_level(); }

void quant_row_product(const void* matrix, const float* x, const Q8Row* q8, float* y, int64_t b,
                       int64_t e, int level) {
  const auto& mat = *static_cast<const Matrix*>(matrix);
  const Problem p{x, mat.in_features, y, mat.out_features, 1};
  run_columns(mat, p, q8, level, b, e);
}

}  // namespace omni

extern "C" {

// An empty matrix of `in_features` columns; segments are appended with
// omni_quant_add. Freed with omni_quant_free.
void* omni_quant_new(int64_t in_features, char** err) {
  return guarded_ptr(err, [&]() -> void* {
    TORCH_CHECK(in_features > 0, "in_features must be positive, got ", in_features);
    auto m = std::make_unique<Matrix>();
    m->in_features = in_features;
    return m.release();
  });
}

void omni_quant_free(void* matrix) { delete static_cast<Matrix*>(matrix); }

// Appends `bytes` (uint8, CPU, [rows, row bytes] or flat) as the next
// output rows, in ggml type `type`. Returns false and `*err` on failure.
bool omni_quant_add(void* handle, int32_t type, int64_t rows, const at::Tensor* bytes,
                    char** err) {
  return guarded_ptr(err, [&]() -> void* {
           auto& m = *static_cast<Matrix*>(handle);
           int64_t elems = 0, block_bytes = 0;
           TORCH_CHECK(block_layout(type, &elems, &block_bytes), "no kernel for ggml type ",
                       type);
           TORCH_CHECK(m.in_features % elems == 0, "rows of ", m.in_features,
                       " elements are not whole blocks of ", elems);
           TORCH_CHECK(rows > 0, "a segment needs rows, got ", rows);
           TORCH_CHECK(bytes->device().is_cpu() && bytes->scalar_type() == at::kByte,
                       "block bytes must be a uint8 CPU tensor");
           const int64_t row_bytes = m.in_features / elems * block_bytes;
           TORCH_CHECK(bytes->numel() == rows * row_bytes, "expected ", rows * row_bytes,
                       " bytes for ", rows, " rows, got ", bytes->numel());
           at::Tensor owned = bytes->contiguous();
           m.segments.push_back(Segment{type, rows, m.in_features, row_bytes, m.out_features,
                                        owned.const_data_ptr<uint8_t>()});
           m.storage.push_back(std::move(owned));
           m.out_features += rows;
           return handle;
         }) != nullptr;
}

// y = x W^T (+ b): x [..., in] fp32 on the CPU, y [..., out]. With
// `int8_activations` and one row of x, Q4_0 / Q4_1 / Q8_0 rows multiply x
// quantized to 8 bits per 32 elements (see above); other rows, and calls
// of more rows, multiply x as it is.
at::Tensor* omni_quant_linear(const at::Tensor* input, const void* handle, const at::Tensor* bias,
                              bool int8_activations, char** err) {
  return guarded(err, [&] {
    RECORD_FUNCTION("omni::quant_linear", std::vector<c10::IValue>());
    const auto& mat = *static_cast<const Matrix*>(handle);
    TORCH_CHECK(input->scalar_type() == at::kFloat && input->device().is_cpu(),
                "input must be fp32 on the CPU");
    TORCH_CHECK(input->dim() >= 1 && input->size(-1) == mat.in_features, "input ",
                input->sizes(), " does not end in ", mat.in_features, " features");
    TORCH_CHECK(!mat.segments.empty(), "the matrix has no rows");
    const at::Tensor x = input->contiguous();
    const int64_t m = x.numel() / mat.in_features;
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = mat.out_features;
    at::Tensor y = at::empty(shape, x.options());
    if (m > 0) {
      const Problem p{x.const_data_ptr<float>(), mat.in_features, y.mutable_data_ptr<float>(),
                      mat.out_features, m};
      const int level = active_level();
      Q8Row q8;
      const bool use_q8 = int8_activations && m == 1 && takes_q8(mat);
      if (use_q8) quantize_row(p.x, mat.in_features, q8);
      // A task gets whole rows; ~64 KiB of blocks per task at least, so a
      // small matrix stays on the calling thread.
      const int64_t bytes_per_row = mat.segments.front().row_bytes;
      const int64_t grain = std::max<int64_t>(4, (64 << 10) / std::max<int64_t>(bytes_per_row, 1));
      at::parallel_for(0, mat.out_features, grain, [&](int64_t b, int64_t e) {
        run_columns(mat, p, use_q8 ? &q8 : nullptr, level, b, e);
      });
    }
    if (bias != nullptr) y.add_(*bias);
    return y;
  });
}

// Rows `ids` (int64, any shape) of the matrix, dequantized: [..., in] fp32.
// An embedding lookup straight from the blocks.
at::Tensor* omni_quant_rows(const void* handle, const at::Tensor* ids, char** err) {
  return guarded(err, [&] {
    const auto& mat = *static_cast<const Matrix*>(handle);
    TORCH_CHECK(ids->scalar_type() == at::kLong, "ids must be int64");
    const at::Tensor idx = ids->to(at::kCPU).contiguous();
    std::vector<int64_t> shape(idx.sizes().begin(), idx.sizes().end());
    shape.push_back(mat.in_features);
    at::Tensor out = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
    const int64_t n = idx.numel();
    const int64_t* id = idx.const_data_ptr<int64_t>();
    float* o = out.mutable_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(id[i] >= 0 && id[i] < mat.out_features, "row ", id[i], " out of range 0..",
                  mat.out_features);
    const int level = active_level();
    // A whole matrix (an fp16 copy being made at load) on every thread; an
    // embedding lookup's few rows stay on the calling one.
    at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        for (const Segment& s : mat.segments) {
          if (id[i] >= s.col0 && id[i] < s.col0 + s.rows) {
            const int64_t row = id[i] - s.col0;
            dequant_segment_at(level, s, &row, 1, o + i * mat.in_features);
            break;
          }
        }
      }
    });
    return out;
  });
}

// Caps the build the kernels use (0 portable, 1 AVX2, 2 AVX-512; negative:
// none) and returns the level now in force. For tests.
int32_t omni_quant_force_level(int32_t cap) {
  level_cap.store(cap, std::memory_order_relaxed);
  return active_level();
}

// The widest build this CPU runs.
int32_t omni_quant_cpu_level() { return cpu_level(); }
}
