// Attention straight from the paged KV cache, on the CPU: decode rows, and
// the rows of short prefills (each query row is its own problem, attending
// to its sequence's first `context_lens[row]` positions); and the K/V
// writes into the cache that precede it.
//
// The generic path gathers every decoding sequence's keys and values into a
// padded [n, ctx, kv_heads, head_dim] copy (index_select), then runs
// scaled_dot_product_attention with a mask over the padding. On a CPU that
// copy is the cost: at 64 sequences of ~300 tokens it writes and rereads
// ~30 MB per layer, and a decode step took 50% longer than at 40 tokens
// (measured: 400 -> 600 ms). This kernel reads the cached keys and values
// in place, through the block table, with no padding: one task per query
// row (or per share of its heads, when rows are fewer than threads)
// computes its heads' scores (GQA: query head j uses kv head
// j / (heads / kv_heads), as HF's repeat_kv and SDPA's enable_gqa do), a
// softmax in fp32, and the weighted sum of the values. A prefill's rows are
// separate tasks that reread their shared context from the cache, which is
// why only short ones come here (batch.rs). Conventions of the C interface:
// shim.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "shim.h"
#include "simd.h"

using omni::guarded;

namespace {

// Dot product with independent partial sums, so the compiler vectorizes it
// without reassociating (no -ffast-math).
template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  constexpr int kLanes = 8;
  float part[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += q[i + l] * static_cast<float>(k[i + l]);
  }
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  for (; i < d; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

// a += w * v
template <typename T>
inline void axpy(float w, const T* v, float* a, int64_t d) {
  for (int64_t i = 0; i < d; ++i) a[i] += w * static_cast<float>(v[i]);
}

// x = softmax(x), in fp32.
inline void softmax(float* x, int64_t n) {
  const float m = *std::max_element(x, x + n);
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

// One call's problem, shared by every task: a task is one query row's heads,
// or a share of them (paged_rows).
template <typename T>
struct Problem {
  // Row s, head h at q + s * q_row + h * q_head (a view into the fused q/k/v
  // projection is read in place: copying it out took 45 us a layer).
  const float* q;
  int64_t q_row, q_head;
  const T* k_cache;
  const T* v_cache;
  const int64_t* tables;
  // Row -> its sequence's table (rows of one prefill share one).
  const int64_t* row_tables;
  int64_t max_blocks;
  const int64_t* lens;
  float* out;
  int64_t heads, kv_heads, d, block_size;
  float scale;
};

// Attention of query row `s`, heads [h0, h1): scores block by block (no
// division per key), softmax in fp32, weighted sum of the values. With all
// heads, each cached row (every kv head of one token, contiguous) is read
// once, by one thread: a task per (sequence, kv head) read each row's thirds
// on different threads, and ran at a third of the memory bandwidth; fewer
// heads a task only where rows alone would leave threads idle (paged_rows).
// `scores` and `acc` are the calling thread's scratch.
template <typename T, float (*Dot)(const float*, const T*, int64_t),
          void (*Axpy)(float, const T*, float*, int64_t), void (*Softmax)(float*, int64_t)>
inline __attribute__((always_inline)) void attend(const Problem<T>& p, int64_t s, int64_t h0,
                                                  int64_t h1, std::vector<float>& scores,
                                                  std::vector<float>& acc) {
  const int64_t heads = p.heads, kvh = p.kv_heads, group = heads / kvh, d = p.d;
  const int64_t bs = p.block_size, ctx = p.lens[s];
  const int64_t* table = p.tables + p.row_tables[s] * p.max_blocks;
  const float* qs = p.q + s * p.q_row;
  scores.resize(static_cast<size_t>((h1 - h0) * ctx));
  for (int64_t b0 = 0; b0 < ctx; b0 += bs) {
    const int64_t base = table[b0 / bs] * bs;
    const int64_t stop = std::min(bs, ctx - b0);
    for (int64_t j = 0; j < stop; ++j) {
      const T* row = p.k_cache + (base + j) * kvh * d;
      for (int64_t hq = h0; hq < h1; ++hq) {
        scores[(hq - h0) * ctx + b0 + j] =
            Dot(qs + hq * p.q_head, row + (hq / group) * d, d) * p.scale;
      }
    }
  }
  for (int64_t i = 0; i < h1 - h0; ++i) Softmax(scores.data() + i * ctx, ctx);
  acc.assign(static_cast<size_t>((h1 - h0) * d), 0.f);
  for (int64_t b0 = 0; b0 < ctx; b0 += bs) {
    const int64_t base = table[b0 / bs] * bs;
    const int64_t stop = std::min(bs, ctx - b0);
    for (int64_t j = 0; j < stop; ++j) {
      const T* row = p.v_cache + (base + j) * kvh * d;
      for (int64_t hq = h0; hq < h1; ++hq) {
        Axpy(scores[(hq - h0) * ctx + b0 + j], row + (hq / group) * d,
             acc.data() + (hq - h0) * d, d);
      }
    }
  }
  std::copy(acc.begin(), acc.end(), p.out + (s * heads + h0) * d);
}

template <typename T>
void attend_generic(const Problem<T>& p, int64_t s, int64_t h0, int64_t h1,
                    std::vector<float>& scores, std::vector<float>& acc) {
  attend<T, dot<T>, axpy<T>, softmax>(p, s, h0, h1, scores, acc);
}

#ifdef OMNI_X86
// AVX2 + FMA builds, chosen at run time (fp32 caches of any head width
// below; fp32, fp16 and bf16 caches of widths that are a multiple of 8 in
// the wide build further down): the shim is compiled for
// baseline x86-64 (SSE2), where the loops above run 4 lanes without FMA
// and exp one value at a time (scalar exp was ~8% of a decode step). The
// whole task is compiled for AVX2 so that these inline into it.
__attribute__((target("avx2,fma"))) inline float dot_avx2(const float* q, const float* k,
                                                           int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(k + i + 8), a1);
  }
  for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a0);
  float sum = omni::hsum_avx2(_mm256_add_ps(a0, a1));
  for (; i < d; ++i) sum += q[i] * k[i];
  return sum;
}

__attribute__((target("avx2,fma"))) inline void axpy_avx2(float w, const float* v, float* a,
                                                          int64_t d) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    _mm256_storeu_ps(a + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(a + i)));
  }
  for (; i < d; ++i) a[i] += w * v[i];
}

__attribute__((target("avx2,fma"))) inline void softmax_avx2(float* x, int64_t n) {
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float m = *std::max_element(lanes, lanes + 8);
  for (; i < n; ++i) m = std::max(m, x[i]);

  const __m256 mb = _mm256_set1_ps(m);
  __m256 sv = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = omni::exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), mb));
    _mm256_storeu_ps(x + i, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = omni::hsum_avx2(sv);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }

  const float inv = 1.f / sum;
  const __m256 invv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), invv));
  for (; i < n; ++i) x[i] *= inv;
}

__attribute__((target("avx2,fma"))) void attend_avx2(const Problem<float>& p, int64_t s,
                                                     int64_t h0, int64_t h1,
                                                     std::vector<float>& scores,
                                                     std::vector<float>& acc) {
  attend<float, dot_avx2, axpy_avx2, softmax_avx2>(p, s, h0, h1, scores, acc);
}

// Lane k of the result: the sum of a[k]'s lanes.
__attribute__((target("avx2,fma"))) inline __m256 hsum8_avx2(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// 8 cached elements as fp32: the caches' dtypes (`kv_cache_dtype`). fp16
// widens exactly (F16C), bf16 by placing its bits in a float's upper half.
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Rows this far ahead are fetched while the current ones are used: the
// blocks of a sequence lie anywhere, so the hardware's stride prefetch
// stops at each block's end (64 sequences of 100 positions, 30 layers,
// caches cold: 20.5-24.2 ms before, 19.0-20.2 after in fp32, 14.6-23.2 and
// 12.5-13.1 in fp16; a standalone harness, two threads, four runs each).
constexpr int64_t kAhead = 16;

template <typename T>
__attribute__((target("avx2,fma,f16c"))) inline void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

template <typename T>
__attribute__((target("avx2,fma,f16c"))) inline float dot8(const float* q, const T* k,
                                                           int64_t d) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a);
  return omni::hsum_avx2(a);
}

// The same attention for head widths that are a multiple of 8, laid out
// for the registers: a query head's scores come 8 keys at a time (8
// accumulators, one horizontal reduction for all 8 instead of one per key,
// which was most of the scores' time), and its weighted sum keeps 64 (or
// 32) output lanes in registers across every key instead of loading and
// storing them per key: in a 64-sequence decode step of SmolLM2 (9 heads
// of 64 on 3 kv heads) the reductions and the accumulator traffic were
// most of the kernel's time. Same products, summed in another order. A
// 16-bit cache is widened as it is loaded: half the bytes of an fp32 one,
// and a decode step's attention waits on those bytes.
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void attend_avx2_wide(const Problem<T>& p, int64_t s,
                                                               int64_t h0, int64_t h1,
                                                               std::vector<float>& scores,
                                                               std::vector<float>& acc) {
  const int64_t heads = p.heads, kvh = p.kv_heads, group = heads / kvh, d = p.d;
  const int64_t bs = p.block_size, ctx = p.lens[s];
  const int64_t* table = p.tables + p.row_tables[s] * p.max_blocks;
  const float* qs = p.q + s * p.q_row;
  // Each position's cached row (every kv head of one token), in order;
  // the calling thread's scratch, like `scores`.
  static thread_local std::vector<const T*> keys, values;
  keys.resize(static_cast<size_t>(ctx));
  values.resize(static_cast<size_t>(ctx));
  for (int64_t j = 0; j < ctx; ++j) {
    const int64_t slot = table[j / bs] * bs + j % bs;
    keys[j] = p.k_cache + slot * kvh * d;
    values[j] = p.v_cache + slot * kvh * d;
  }
  (void)acc;  // The generic build's scratch; this one keeps its sums in registers.
  scores.resize(static_cast<size_t>((h1 - h0) * ctx));
  const __m256 scale = _mm256_set1_ps(p.scale);
  for (int64_t hq = h0; hq < h1; ++hq) {
    const float* q = qs + hq * p.q_head;
    const int64_t off = (hq / group) * d;
    float* sc = scores.data() + (hq - h0) * ctx;
    // The first of its group's heads in this task.
    const bool first = hq % group == 0 || hq == h0;
    int64_t j = 0;
    for (; j + 8 <= ctx; j += 8) {
      // The group's first head brings its kv head's rows in; the
      // group's other heads find them in cache.
      if (first) {
        for (int64_t k = j + kAhead; k < std::min(ctx, j + kAhead + 8); ++k) {
          prefetch(keys[k] + off, d);
        }
      }
      __m256 a[8];
      for (int k = 0; k < 8; ++k) a[k] = _mm256_setzero_ps();
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int k = 0; k < 8; ++k) {
          a[k] = _mm256_fmadd_ps(qv, load8(keys[j + k] + off + i), a[k]);
        }
      }
      _mm256_storeu_ps(sc + j, _mm256_mul_ps(hsum8_avx2(a), scale));
    }
    for (; j < ctx; ++j) sc[j] = dot8(q, keys[j] + off, d) * p.scale;
    softmax_avx2(sc, ctx);
  }
  float* out = p.out + s * heads * d;
  for (int64_t hq = h0; hq < h1; ++hq) {
    const float* sc = scores.data() + (hq - h0) * ctx;
    const int64_t off = (hq / group) * d;
    int64_t i = 0;
    // 64 lanes at a time: 8 independent sums per key, enough to hide the
    // FMA's latency (with 4, each key waited on the previous key's FMAs).
    for (; i + 64 <= d; i += 64) {
      __m256 o[8];
      for (int r = 0; r < 8; ++r) o[r] = _mm256_setzero_ps();
      const bool first = hq % group == 0 || hq == h0;
      for (int64_t j = 0; j < ctx; ++j) {
        if (first && j + kAhead < ctx) prefetch(values[j + kAhead] + off + i, 64);
        const __m256 w = _mm256_set1_ps(sc[j]);
        const T* v = values[j] + off + i;
        for (int r = 0; r < 8; ++r) o[r] = _mm256_fmadd_ps(w, load8(v + 8 * r), o[r]);
      }
      for (int r = 0; r < 8; ++r) _mm256_storeu_ps(out + hq * d + i + 8 * r, o[r]);
    }
    for (; i + 32 <= d; i += 32) {
      __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
      for (int64_t j = 0; j < ctx; ++j) {
        const __m256 w = _mm256_set1_ps(sc[j]);
        const T* v = values[j] + off + i;
        o0 = _mm256_fmadd_ps(w, load8(v), o0);
        o1 = _mm256_fmadd_ps(w, load8(v + 8), o1);
        o2 = _mm256_fmadd_ps(w, load8(v + 16), o2);
        o3 = _mm256_fmadd_ps(w, load8(v + 24), o3);
      }
      float* o = out + hq * d + i;
      _mm256_storeu_ps(o, o0);
      _mm256_storeu_ps(o + 8, o1);
      _mm256_storeu_ps(o + 16, o2);
      _mm256_storeu_ps(o + 24, o3);
    }
    for (; i < d; i += 8) {
      __m256 o0 = _mm256_setzero_ps();
      for (int64_t j = 0; j < ctx; ++j) {
        o0 = _mm256_fmadd_ps(_mm256_set1_ps(sc[j]), load8(values[j] + off + i), o0);
      }
      _mm256_storeu_ps(out + hq * d + i, o0);
    }
  }
}
#endif

// How many parts each row's heads are cut into: whole rows when there are
// at least as many as threads (a row's keys are then read by one thread;
// parts of a row split a GQA group's keys between threads, which reread
// them), else as many parts as it takes for the tasks to divide evenly
// among the threads (one row on two threads: 2 parts; 3 rows on 4
// threads: 4), never more parts than heads.
int64_t head_parts(int64_t n, int64_t threads, int64_t heads) {
  if (n >= threads) return 1;
  return std::min(heads, threads / std::gcd(n, threads));
}

// The build of `attend` that runs `p`.
template <typename T>
auto attend_task(const Problem<T>& p) {
  auto task = attend_generic<T>;
#ifdef OMNI_X86
  if (omni::use_avx2()) {
    // The wide build is compiled with F16C for its fp16 loads, so every
    // dtype's asks for it (no AVX2 CPU we know lacks it).
    const bool wide = p.d % 8 == 0 && omni::use_f16c();
    if constexpr (std::is_same_v<T, float>) {
      task = wide ? attend_avx2_wide<float> : attend_avx2;
    } else if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
      if (wide) task = attend_avx2_wide<T>;
    }
  }
#else
  (void)p;
#endif
  return task;
}

template <typename T>
void paged_rows(const Problem<T>& p, int64_t n) {
  const auto task = attend_task(p);
  // A task is a row's heads, or a share of them where rows alone would
  // leave threads idle: one decoding sequence on two threads ran on one of
  // them (its attention ~10% of a batch-one step, the other thread
  // spinning). Each head's arithmetic is the same either way.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t parts = head_parts(n, threads, p.heads);
  const int64_t tasks = n * parts;
  // Tasks dealt round-robin, not in contiguous ranges: a row costs in
  // proportion to its context, and a prefill's rows (contexts growing row by
  // row) sit together, so a range split could hand one thread most of the
  // work. If the pool runs the tasks inline, one thread walks every lane.
  const int64_t lanes = std::max<int64_t>(1, std::min(threads, tasks));
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc;
    for (int64_t lane = begin; lane < end; ++lane) {
      for (int64_t t = lane; t < tasks; t += lanes) {
        // Each row's parts rotate among the lanes: with heads that do not
        // divide evenly, no lane gets every row's larger part.
        const int64_t s = t / parts, part = (t + s) % parts;
        task(p, s, part * p.heads / parts, (part + 1) * p.heads / parts, scores, acc);
      }
    }
  });
}

// fp32 rows into a 16-bit cache, rounded to nearest even as `Tensor::to`
// rounds (ATen's conversion kernel, called per layer for K and V, took
// ~40 us a call at 64 rows, as long as the row copies themselves).
template <typename T>
void narrow_row(const float* x, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(x[i]);
}

#ifdef OMNI_X86
__attribute__((target("avx2,fma,f16c"))) void narrow_row_avx2(const float* x, at::Half* out,
                                                              int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < n; ++i) out[i] = static_cast<at::Half>(x[i]);
}

// c10::BFloat16's rounding (round_to_nearest_even): add 0x7fff plus the
// kept part's lowest bit, keep the upper half; NaN becomes 0x7fc0.
__attribute__((target("avx2,fma,f16c"))) void narrow_row_avx2(const float* x,
                                                              at::BFloat16* out, int64_t n) {
  int64_t i = 0;
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
  const __m256i nan = _mm256_set1_epi32(0x7fc0);
  for (; i + 8 <= n; i += 8) {
    const __m256 f = _mm256_loadu_ps(x + i);
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, lsb)), 16);
    r = _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
    // 8 x 32-bit (each < 2^16) -> 8 x 16-bit, in order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_castsi256_si128(packed));
  }
  for (; i < n; ++i) out[i] = static_cast<at::BFloat16>(x[i]);
}
#endif

// Row `i` of `x` (fp32) into `dst`, in the cache's 16-bit type `T`.
template <typename T>
void narrow_rows(const float* x, int64_t x_stride, T* dst, const int64_t* slots, int64_t width,
                 int64_t begin, int64_t end) {
  auto row = narrow_row<T>;
#ifdef OMNI_X86
  if (omni::use_f16c()) row = narrow_row_avx2;
#endif
  for (int64_t i = begin; i < end; ++i) row(x + i * x_stride, dst + slots[i] * width, width);
}

template <typename T>
void attend_row_as(const omni::RowAttention& r, int64_t h0, int64_t h1,
                   std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t row_table = 0;
  const Problem<T> p{r.q,
                     0,
                     r.d,
                     static_cast<const T*>(r.k_cache),
                     static_cast<const T*>(r.v_cache),
                     r.table,
                     &row_table,
                     0,
                     &r.context,
                     r.out,
                     r.heads,
                     r.kv_heads,
                     r.d,
                     r.block_size,
                     r.scale};
  attend_task(p)(p, 0, h0, h1, scores, acc);
}

template <typename T>
void write_row_as(const float* k, const float* v, void* k_cache, void* v_cache, int64_t slot,
                  int64_t width) {
  T* kc = static_cast<T*>(k_cache);
  T* vc = static_cast<T*>(v_cache);
  narrow_rows(k, 0, kc, &slot, width, 0, 1);
  narrow_rows(v, 0, vc, &slot, width, 0, 1);
}

}  // namespace

namespace omni {

void attend_row(const RowAttention& r, int64_t h0, int64_t h1, std::vector<float>& scores,
                std::vector<float>& acc) {
  switch (r.dtype) {
    case at::kHalf: return attend_row_as<at::Half>(r, h0, h1, scores, acc);
    case at::kBFloat16: return attend_row_as<at::BFloat16>(r, h0, h1, scores, acc);
    default: return attend_row_as<float>(r, h0, h1, scores, acc);
  }
}

void write_kv_row(const float* k, const float* v, void* k_cache, void* v_cache,
                  at::ScalarType dtype, int64_t slot, int64_t width) {
  switch (dtype) {
    case at::kHalf: return write_row_as<at::Half>(k, v, k_cache, v_cache, slot, width);
    case at::kBFloat16: return write_row_as<at::BFloat16>(k, v, k_cache, v_cache, slot, width);
    default: {
      const size_t bytes = static_cast<size_t>(width) * sizeof(float);
      std::memcpy(static_cast<float*>(k_cache) + slot * width, k, bytes);
      std::memcpy(static_cast<float*>(v_cache) + slot * width, v, bytes);
    }
  }
}

}  // namespace omni

extern "C" {

// q: [n, heads, d] (fp32 with unit last stride is read in place, at any row and
// head stride); k_cache, v_cache: [slots, kv_heads, d] (contiguous, any
// floating dtype); block_tables: [seqs, max_blocks] int64; row_tables: [n]
// int64, the table of each query row; context_lens: [n] int64, each >= 1
// and covered by its table. Returns [n, heads, d] in q's dtype. Every index
// is checked before the kernel runs: a bad table is an error, never an
// out-of-bounds read.
at::Tensor* omni_paged_attention(const at::Tensor* q, const at::Tensor* k_cache,
                                 const at::Tensor* v_cache, const at::Tensor* block_tables,
                                 const at::Tensor* row_tables, const at::Tensor* context_lens,
                                 int64_t block_size, double scale, char** err) {
  return guarded(err, [&] {
    // Named in profiler traces like an ATen op.
    RECORD_FUNCTION("omni::paged_attention", std::vector<c10::IValue>());
    TORCH_CHECK(q->dim() == 3 && k_cache->dim() == 3 && v_cache->dim() == 3,
                "q and the caches must be 3-d");
    for (const at::Tensor* t : {q, k_cache, v_cache, block_tables, row_tables, context_lens}) {
      TORCH_CHECK(t->device().is_cpu(), "CPU tensors only");
    }
    TORCH_CHECK(k_cache->sizes() == v_cache->sizes(), "K and V caches differ in shape");
    TORCH_CHECK(k_cache->scalar_type() == v_cache->scalar_type(), "K and V caches differ in dtype");
    TORCH_CHECK(k_cache->is_contiguous() && v_cache->is_contiguous(), "caches must be contiguous");
    const int64_t n = q->size(0), heads = q->size(1), d = q->size(2);
    const int64_t slots = k_cache->size(0), kv_heads = k_cache->size(1);
    TORCH_CHECK(k_cache->size(2) == d, "head_dim of q and cache differ");
    TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, "heads not a multiple of kv_heads");
    TORCH_CHECK(block_size >= 1, "block_size must be positive");
    const at::Tensor tables = block_tables->to(at::kLong).contiguous();
    const at::Tensor rows = row_tables->to(at::kLong).contiguous();
    const at::Tensor lens = context_lens->to(at::kLong).contiguous();
    TORCH_CHECK(tables.dim() == 2, "block_tables must be [seqs, max_blocks]");
    TORCH_CHECK(rows.dim() == 1 && rows.size(0) == n, "row_tables must be [n]");
    TORCH_CHECK(lens.dim() == 1 && lens.size(0) == n, "context_lens must be [n]");
    const int64_t seqs = tables.size(0), max_blocks = tables.size(1);
    const int64_t* t = tables.data_ptr<int64_t>();
    const int64_t* r = rows.data_ptr<int64_t>();
    const int64_t* l = lens.data_ptr<int64_t>();
    const int64_t num_blocks = slots / block_size;
    // Every entry of every table (padding included) in the cache, then every
    // row's table and length in range: what the kernel may read.
    for (int64_t i = 0; i < seqs * max_blocks; ++i) {
      TORCH_CHECK(t[i] >= 0 && t[i] < num_blocks, "block ", t[i], " of table ", i / max_blocks,
                  " is outside the cache (", num_blocks, " blocks)");
    }
    for (int64_t s = 0; s < n; ++s) {
      TORCH_CHECK(r[s] >= 0 && r[s] < seqs, "row ", s, " names table ", r[s], " of ", seqs);
      TORCH_CHECK(l[s] >= 1 && l[s] <= max_blocks * block_size, "context length ", l[s],
                  " of row ", s, " is not covered by its ", max_blocks, " blocks");
    }
    // fp32 heads with contiguous elements are read where they are.
    const at::Tensor qf = q->scalar_type() == at::kFloat && q->stride(2) == 1
                              ? *q
                              : q->to(at::kFloat).contiguous();
    at::Tensor out = at::empty({n, heads, d}, qf.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, k_cache->scalar_type(), "omni_paged_attention", [&] {
          const Problem<scalar_t> p{qf.data_ptr<float>(),
                                    qf.stride(0),
                                    qf.stride(1),
                                    k_cache->data_ptr<scalar_t>(),
                                    v_cache->data_ptr<scalar_t>(),
                                    t,
                                    r,
                                    max_blocks,
                                    l,
                                    out.data_ptr<float>(),
                                    heads,
                                    kv_heads,
                                    d,
                                    block_size,
                                    static_cast<float>(scale)};
          paged_rows(p, n);
        });
    return out.to(q->scalar_type());
  });
}

// Writes the new tokens' keys and values into their cache slots, in place:
// what two `index_copy_` calls do, in one pass of row copies over the
// intra-op threads (index_copy_ dispatches per element through
// TensorIterator: ~3% of a batched step). k, v: [t, kv_heads, d], each row
// contiguous (a view into the fused q/k/v projection is fine); slots: [t]
// int64, distinct. Returns the K cache.
at::Tensor* omni_paged_kv_write(const at::Tensor* k_cache, const at::Tensor* v_cache,
                                const at::Tensor* slots, const at::Tensor* k,
                                const at::Tensor* v, char** err) {
  return guarded(err, [&] {
    RECORD_FUNCTION("omni::paged_kv_write", std::vector<c10::IValue>());
    TORCH_CHECK(k_cache->dim() == 3 && k_cache->sizes() == v_cache->sizes(),
                "K and V caches must be [slots, kv_heads, d] alike");
    TORCH_CHECK(k_cache->scalar_type() == v_cache->scalar_type(), "K and V caches differ in dtype");
    TORCH_CHECK(k_cache->is_contiguous() && v_cache->is_contiguous(), "caches must be contiguous");
    for (const at::Tensor* t : {k_cache, v_cache, slots, k, v}) {
      TORCH_CHECK(t->device().is_cpu(), "CPU tensors only");
    }
    const int64_t n = k->size(0), width = k_cache->size(1) * k_cache->size(2);
    // fp32 K/V into an fp16 or bf16 cache (`kv_cache_dtype`) are rounded
    // here, row by row, instead of by a conversion before the call.
    const at::ScalarType cache_type = k_cache->scalar_type();
    const bool narrowing = k->scalar_type() == at::kFloat && v->scalar_type() == at::kFloat &&
                           (cache_type == at::kHalf || cache_type == at::kBFloat16);
    for (const at::Tensor* x : {k, v}) {
      TORCH_CHECK(x->dim() == 3 && x->size(0) == n && x->size(1) == k_cache->size(1) &&
                      x->size(2) == k_cache->size(2),
                  "new K/V must be [", n, ", ", k_cache->size(1), ", ", k_cache->size(2),
                  "], got ", x->sizes());
      TORCH_CHECK(x->scalar_type() == k_cache->scalar_type() || narrowing, "new K/V dtype ",
                  x->scalar_type(), " differs from the cache's ", k_cache->scalar_type(),
                  " (fp32 may go into a 16-bit cache)");
      TORCH_CHECK(x->stride(2) == 1 && x->stride(1) == x->size(2),
                  "each new K/V row must be contiguous");
    }
    const at::Tensor idx = slots->to(at::kLong).contiguous();
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == n, "slots must be [", n, "]");
    const int64_t* sl = idx.data_ptr<int64_t>();
    const int64_t cap = k_cache->size(0);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(sl[i] >= 0 && sl[i] < cap, "slot ", sl[i], " of row ", i,
                  " is outside the cache (", cap, " slots)");
    }
    if (narrowing) {
      const float* kp = k->const_data_ptr<float>();
      const float* vp = v->const_data_ptr<float>();
      AT_DISPATCH_REDUCED_FLOATING_TYPES(cache_type, "omni_paged_kv_write", [&] {
        auto* kc = k_cache->mutable_data_ptr<scalar_t>();
        auto* vc = v_cache->mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
          narrow_rows(kp, k->stride(0), kc, sl, width, b, e);
          narrow_rows(vp, v->stride(0), vc, sl, width, b, e);
        });
      });
      return *k_cache;
    }
    const size_t bytes = static_cast<size_t>(width) * k_cache->element_size();
    auto* kc = static_cast<char*>(k_cache->data_ptr());
    auto* vc = static_cast<char*>(v_cache->data_ptr());
    const auto* kp = static_cast<const char*>(k->data_ptr());
    const auto* vp = static_cast<const char*>(v->data_ptr());
    const int64_t ks = k->stride(0) * k->element_size(), vs = v->stride(0) * v->element_size();
    at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        std::memcpy(kc + sl[i] * bytes, kp + i * ks, bytes);
        std::memcpy(vc + sl[i] * bytes, vp + i * vs, bytes);
      }
    });
    return *k_cache;
  });
}
}
