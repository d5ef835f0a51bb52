// Linear layers over GGUF's quantized blocks, read as the file stores them.
//
// At batch 1 a decode step reads every weight once, so its speed is the
// bytes of weights per token: fp16 weights cost SmolLM2-135M ~270 MB a
// token, its Q4_1 blocks ~90 MB. These kernels keep the blocks (Q4_0, Q4_1,
// Q8_0, Q4_K, Q6_K) and dequantize them in registers, 16 weights at a time,
// straight into fp32 multiply-adds with fp32 activations: no weight is ever
// written out, and the result is the dense product of the dequantized
// matrix up to summation order (activations are not quantized, unlike
// llama.cpp, so greedy output stays transformers' on the dequantized model).
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
#include <cstring>
#include <memory>
#include <vector>

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

int active_level() {
  const int cap = level_cap.load(std::memory_order_relaxed);
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

void dequant_segment_at(int level, const Segment& s, const int64_t* rows, int64_t count,
                        float* out) {
#ifdef OMNI_X86
  if (level >= 2) return avx512::dequant_segment(s, rows, count, out);
  if (level == 1) return avx2::dequant_segment(s, rows, count, out);
#endif
  (void)level;
  portable::dequant_segment(s, rows, count, out);
}

}  // namespace

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

// y = x W^T (+ b): x [..., in] fp32 on the CPU, y [..., out].
at::Tensor* omni_quant_linear(const at::Tensor* input, const void* handle, const at::Tensor* bias,
                              char** err) {
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
      // A task gets whole rows; ~64 KiB of blocks per task at least, so a
      // small matrix stays on the calling thread.
      const int64_t bytes_per_row = mat.segments.front().row_bytes;
      const int64_t grain = std::max<int64_t>(4, (64 << 10) / std::max<int64_t>(bytes_per_row, 1));
      at::parallel_for(0, mat.out_features, grain, [&](int64_t b, int64_t e) {
        for (const Segment& s : mat.segments) {
          const int64_t lo = std::max(b, s.col0), hi = std::min(e, s.col0 + s.rows);
          if (lo < hi) run_segment_at(level, s, p, lo - s.col0, hi - s.col0);
        }
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
