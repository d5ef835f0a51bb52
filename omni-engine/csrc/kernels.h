// The CPU kernels' one-row entry points, for code that runs several of them
// inside one parallel region (decode_layer.cpp). Each is the very function
// the op-level entry points (omni_rms_norm, omni_quant_linear,
// omni_paged_attention, ...) run on a row, with the same choice of build,
// so a caller of these gets those ops' results bit for bit. They trust
// their arguments (the caller checks them). The attention grows its
// scratch when it must, so it may throw std::bad_alloc; the rest do not
// allocate when the caller sized what they name.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace omni {

// ---- fused.cpp ----

// x += delta (when not null), then out = w * rms_norm(x); one row of n.
void rms_norm_row(float* x, const float* delta, const float* w, float* out, int64_t n, float eps);

// RoPE in place on one token's `heads` heads of `d` (contiguous, one after
// the other) with that token's cos and signed sin rows.
void rope_row(float* x, int64_t heads, int64_t d, const float* cos, const float* sin);

// out[i] = silu(gu[i]) * gu[n + i], i < n.
void silu_and_mul_row(const float* gu, float* out, int64_t n);

// ---- quant.cpp ----

// One activation row quantized to int8 per 32 elements (llama.cpp's
// scheme, `int8_activations`).
struct Q8Row {
  std::vector<int8_t> q;    // [in]
  std::vector<float> d;     // [in / 32]
  std::vector<float> dsum;  // [in / 32]: d * (sum of the block's q)
};

int64_t quant_in_features(const void* matrix);
int64_t quant_out_features(const void* matrix);
// Whether a product with int8 activations quantizes its row (some part of
// the matrix is Q4_0, Q4_1 or Q8_0).
bool quant_takes_q8(const void* matrix);
// `x` (`n` floats, whole blocks of 32) into `out`, sized to n.
void quantize_q8(const float* x, int64_t n, Q8Row& out);
// The build the products run now (0 portable, 1 AVX2, 2 AVX-512), read
// once for a run of calls.
int quant_level();
// Output columns [b, e) of y = x W^T for one row x, in build `level`;
// parts with an int8 kernel multiply `q8` (x quantized) when it is not
// null.
void quant_row_product(const void* matrix, const float* x, const Q8Row* q8, float* y, int64_t b,
                       int64_t e, int level);

// ---- paged_attention.cpp ----

// One query row against its sequence's paged cache.
struct RowAttention {
  const float* q;  // [heads, d]
  const void* k_cache;  // [slots, kv_heads, d] in `dtype`
  const void* v_cache;
  at::ScalarType dtype;  // float, half or bfloat16
  const int64_t* table;  // the sequence's block table
  int64_t context;       // positions attended, >= 1, covered by the table
  int64_t heads, kv_heads, d, block_size;
  float scale;
  float* out;  // [heads, d]
};

// Heads [h0, h1) of the row; `scores` and `acc` are the thread's scratch,
// with room for (h1 - h0) * context and (h1 - h0) * d floats.
void attend_row(const RowAttention& r, int64_t h0, int64_t h1, std::vector<float>& scores,
                std::vector<float>& acc);

// One token's fp32 K and V rows (`width` = kv_heads * d each) into slot
// `slot` of caches in `dtype` (float copies; half and bfloat16 round to
// nearest even, as omni_paged_kv_write does).
void write_kv_row(const float* k, const float* v, void* k_cache, void* v_cache,
                  at::ScalarType dtype, int64_t slot, int64_t width);

}  // namespace omni
