// What the CPU kernels (fused.cpp, paged_attention.cpp) share: the run-time
// choice of their AVX2 + FMA builds, and an 8-lane exp.
//
// The shim is compiled for baseline x86-64 (SSE2) so that it runs on any
// x86-64; functions that want AVX2 carry `target("avx2,fma")` (with
// `f16c` where they widen fp16) and are only called when `use_avx2()` (and
// `use_f16c()`) say the CPU has it.
#pragma once

#include <atomic>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define OMNI_X86 1
#endif

namespace omni {

// Set by tests (omni_fused_force_portable) to run the portable loops where
// AVX2 is available, so both builds are checked on one machine.
extern std::atomic<bool> force_portable;

// Whether to run the AVX2 + FMA builds: the CPU has both and no test said
// otherwise.
inline bool use_avx2() {
#ifdef OMNI_X86
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes && !force_portable.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

// Whether fp16 loads can widen in hardware (F16C; every AVX2 CPU we know
// has it, but it is a separate flag).
inline bool use_f16c() {
#ifdef OMNI_X86
  static const bool yes = __builtin_cpu_supports("f16c");
  return yes && use_avx2();
#else
  return false;
#endif
}

#ifdef OMNI_X86
// e^x for 8 floats: Cephes' expf (range reduction by ln 2 in two parts, a
// degree-5 polynomial, 2^n through the exponent bits), ~1 ulp. Inputs are
// clamped to +-88.38, so the result is never inf or NaN.
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)),
                    _mm256_set1_ps(88.3762626647949f));
  const __m256 fx = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.f));
  const __m256i p = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(p, 23)));
}

// Sum of 8 lanes.
__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_hadd_ps(x, x);
  x = _mm_hadd_ps(x, x);
  return _mm_cvtss_f32(x);
}
#endif

}  // namespace omni
