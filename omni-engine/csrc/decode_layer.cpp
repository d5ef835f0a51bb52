// One decoder layer for a lone decoding token on the CPU, in one call: the
// step of a request decoding by itself (batch one), with the layer's
// products on GGUF's blocks (quant.cpp).
//
// Done op by op, a batch-one step of SmolLM2-135M ran ~150 parallel regions
// (four products and the attention in each of 30 layers) and ~400 small
// calls between them; `perf` put 19% of the model thread's time in that
// serial work and 16% in waiting at the regions' joins for the other
// thread, which starts each region late (BENCHMARKS.md). Here a layer is
// one OpenMP region: its threads split each product's output columns and
// the attention's heads, meet at a barrier between phases, and one thread
// does the elementwise steps (RoPE, the K/V write, the residual adds and
// norms, SiLU) between two barriers. No tensor is made and no op
// dispatched inside. Each phase runs the row kernels the separate ops run
// (kernels.h), so the layer's output is theirs bit for bit, whatever the
// thread count; tests hold the two paths to each other.
//
// Conventions of the C interface: shim.h.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <exception>
#include <vector>

#include "kernels.h"
#include "shim.h"

namespace {

// What Rust passes (decode_layer.rs, `#[repr(C)]`, field for field).
struct LayerArgs {
  at::Tensor* x;        // [1, hidden] fp32: the residual stream, updated in place
  at::Tensor* h;        // [1, hidden] fp32: this layer's normed input; the next one's after
  const void* qkv;      // quant.cpp matrices
  const at::Tensor* qkv_bias;  // [q + 2 kv] or null
  const void* o;
  const void* gate_up;
  const void* down;
  const at::Tensor* post_norm;  // [hidden]
  const at::Tensor* next_norm;  // [hidden], or null after the last layer
  double eps;
  int64_t heads, kv_heads;
  const at::Tensor* cos;  // [head_dim] values of the token's position
  const at::Tensor* sin;
  const at::Tensor* k_cache;  // [slots, kv_heads, head_dim]
  const at::Tensor* v_cache;
  const at::Tensor* block_tables;  // [seqs, max_blocks] int64
  const at::Tensor* row_tables;    // [1] int64
  const at::Tensor* context_lens;  // [1] int64, the new token included
  const at::Tensor* slots;         // [1] int64
  int64_t block_size;
  double scale;
  bool int8_activations;
};

// The calling thread's buffers, kept between calls (a step calls once per
// layer, always the same sizes).
struct Scratch {
  std::vector<float> qkv, attn, out, gu, act;
  omni::Q8Row q8;
  // Per thread of the region: attention scores and sums.
  std::vector<std::vector<float>> scores, acc;
};

thread_local Scratch scratch;

const float* floats(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.numel() == n,
              name, " must be ", n, " contiguous fp32 values on the CPU, got ", t.sizes(), " ",
              t.scalar_type());
  return t.const_data_ptr<float>();
}

int64_t one_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.numel() == 1, name,
              " must be one int64 on the CPU, got ", t.sizes(), " ", t.scalar_type());
  return t.const_data_ptr<int64_t>()[0];
}

// The columns of `n` that thread `tid` of `nt` takes.
inline void share(int64_t n, int tid, int nt, int64_t* b, int64_t* e) {
  *b = n * tid / nt;
  *e = n * (tid + 1) / nt;
}

void decode_layer(const LayerArgs& a) {
  RECORD_FUNCTION("omni::decode_layer", std::vector<c10::IValue>());
  // ---- every check, before any thread starts ----
  TORCH_CHECK(a.x != nullptr && a.h != nullptr && a.qkv != nullptr && a.o != nullptr &&
                  a.gate_up != nullptr && a.down != nullptr && a.post_norm != nullptr &&
                  a.cos != nullptr && a.sin != nullptr && a.k_cache != nullptr &&
                  a.v_cache != nullptr && a.block_tables != nullptr && a.row_tables != nullptr &&
                  a.context_lens != nullptr && a.slots != nullptr,
              "a decode layer needs x, h, its four matrices, its norm, the rotary rows, the "
              "caches and the row's indices");
  const int64_t hidden = omni::quant_in_features(a.qkv);
  float* x = const_cast<float*>(floats(*a.x, hidden, "x"));
  float* h = const_cast<float*>(floats(*a.h, hidden, "h"));
  TORCH_CHECK(x + hidden <= h || h + hidden <= x, "x and h must not overlap");
  const at::Tensor& kc = *a.k_cache;
  const at::Tensor& vc = *a.v_cache;
  TORCH_CHECK(kc.dim() == 3 && kc.sizes() == vc.sizes() && kc.is_contiguous() &&
                  vc.is_contiguous() && kc.device().is_cpu() && vc.device().is_cpu(),
              "K and V caches must be contiguous [slots, kv_heads, d] alike on the CPU");
  const at::ScalarType dtype = kc.scalar_type();
  TORCH_CHECK(vc.scalar_type() == dtype &&
                  (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16),
              "the caches must be fp32, fp16 or bf16 alike, got ", dtype, " and ",
              vc.scalar_type());
  const int64_t heads = a.heads, kv_heads = a.kv_heads, d = kc.size(2);
  TORCH_CHECK(kv_heads == kc.size(1) && kv_heads >= 1 && heads >= 1 && heads % kv_heads == 0,
              heads, " heads over ", kv_heads, " kv heads do not fit a cache of ", kc.size(1),
              " kv heads");
  TORCH_CHECK(d % 2 == 0, "head_dim ", d, " is odd");
  const int64_t q_width = heads * d, kv_width = kv_heads * d;
  const int64_t qkv_width = q_width + 2 * kv_width;
  const int64_t inter = omni::quant_in_features(a.down);
  const struct {
    const void* m;
    int64_t in, out;
    const char* name;
  } shapes[] = {{a.qkv, hidden, qkv_width, "qkv"},
                {a.o, q_width, hidden, "o"},
                {a.gate_up, hidden, 2 * inter, "gate_up"},
                {a.down, inter, hidden, "down"}};
  for (const auto& s : shapes) {
    TORCH_CHECK(omni::quant_in_features(s.m) == s.in && omni::quant_out_features(s.m) == s.out,
                "the ", s.name, " matrix is ", omni::quant_out_features(s.m), "x",
                omni::quant_in_features(s.m), ", the layer needs ", s.out, "x", s.in);
  }
  const float* qkv_bias = a.qkv_bias ? floats(*a.qkv_bias, qkv_width, "qkv bias") : nullptr;
  const float* post_norm = floats(*a.post_norm, hidden, "post_attention_layernorm");
  const float* next_norm = a.next_norm ? floats(*a.next_norm, hidden, "next input_layernorm")
                                       : nullptr;
  const float* cos = floats(*a.cos, d, "cos");
  const float* sin = floats(*a.sin, d, "sin");
  const at::Tensor& tables = *a.block_tables;
  TORCH_CHECK(tables.device().is_cpu() && tables.scalar_type() == at::kLong && tables.dim() == 2 &&
                  tables.is_contiguous(),
              "block_tables must be contiguous [seqs, max_blocks] int64 on the CPU");
  const int64_t row = one_index(*a.row_tables, "row_tables");
  const int64_t context = one_index(*a.context_lens, "context_lens");
  const int64_t slot = one_index(*a.slots, "slots");
  const int64_t max_blocks = tables.size(1), bs = a.block_size;
  TORCH_CHECK(bs >= 1, "block_size must be positive");
  TORCH_CHECK(row >= 0 && row < tables.size(0), "row names table ", row, " of ",
              tables.size(0));
  TORCH_CHECK(context >= 1 && context <= max_blocks * bs, "context length ", context,
              " is not covered by ", max_blocks, " blocks");
  const int64_t* table = tables.const_data_ptr<int64_t>() + row * max_blocks;
  const int64_t num_blocks = kc.size(0) / bs;
  for (int64_t i = 0; i < (context + bs - 1) / bs; ++i) {
    TORCH_CHECK(table[i] >= 0 && table[i] < num_blocks, "block ", table[i],
                " is outside the cache (", num_blocks, " blocks)");
  }
  TORCH_CHECK(slot >= 0 && slot < kc.size(0), "slot ", slot, " is outside the cache (",
              kc.size(0), " slots)");

  // ---- buffers, sized before the region, so that nothing in it
  // allocates in the usual case (an exception there is caught below) ----
  Scratch& s = scratch;
  s.qkv.resize(qkv_width);
  s.attn.resize(q_width);
  s.out.resize(hidden);
  s.gu.resize(2 * inter);
  s.act.resize(inter);
  const int64_t widest = std::max({hidden, q_width, inter});
  s.q8.q.reserve(widest);
  s.q8.d.reserve(widest / 32);
  s.q8.dsum.reserve(widest / 32);
  const bool int8 = a.int8_activations;
  // Which products take their row quantized to int8.
  const bool q8_qkv = int8 && omni::quant_takes_q8(a.qkv);
  const bool q8_o = int8 && omni::quant_takes_q8(a.o);
  const bool q8_gate_up = int8 && omni::quant_takes_q8(a.gate_up);
  const bool q8_down = int8 && omni::quant_takes_q8(a.down);
  const int team = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  s.scores.resize(team);
  s.acc.resize(team);
  for (int t = 0; t < team; ++t) {
    // Room for every head (OpenMP may start fewer threads than asked),
    // grown by halves as the context grows, not a token at a time.
    const int64_t need = heads * context;
    if (static_cast<int64_t>(s.scores[t].capacity()) < need) s.scores[t].reserve(need + need / 2);
    s.acc[t].reserve(heads * d);
  }
  // One build of each product for the whole layer, whatever a test switches
  // meanwhile.
  const int level = omni::quant_level();
  // The first product's row, quantized once for every thread.
  if (q8_qkv) omni::quantize_q8(h, hidden, s.q8);
  const omni::RowAttention attention{s.qkv.data(),
                                     kc.const_data_ptr(),
                                     vc.const_data_ptr(),
                                     dtype,
                                     table,
                                     context,
                                     heads,
                                     kv_heads,
                                     d,
                                     bs,
                                     static_cast<float>(a.scale),
                                     s.attn.data()};
  void* k_base = kc.data_ptr();
  void* v_base = vc.data_ptr();
  const float eps = static_cast<float>(a.eps);
  // An exception inside the region (a kernel's scratch failing to grow)
  // cannot leave it: the first is kept, every later phase is skipped (each
  // thread still meets every barrier), and it is rethrown after.
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  auto phase = [&](auto&& work) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      work();
    } catch (...) {
#ifdef _OPENMP
#pragma omp critical(omni_decode_layer_error)
#endif
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };

#ifdef _OPENMP
#pragma omp parallel num_threads(team) if (team > 1)
#endif
  {
#ifdef _OPENMP
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
#else
    const int nt = 1, tid = 0;
#endif
    auto product = [&](const void* m, const float* in, bool quantized, float* out, int64_t width,
                       const float* bias) {
      phase([&] {
        int64_t b, e;
        share(width, tid, nt, &b, &e);
        if (b >= e) return;
        omni::quant_row_product(m, in, quantized ? &s.q8 : nullptr, out, b, e, level);
        if (bias != nullptr) {
          for (int64_t i = b; i < e; ++i) out[i] += bias[i];
        }
      });
    };
    auto on_first = [&](auto&& work) {
      if (tid == 0) phase(work);
    };
    product(a.qkv, h, q8_qkv, s.qkv.data(), qkv_width, qkv_bias);
#ifdef _OPENMP
#pragma omp barrier
#endif
    on_first([&] {
      // Queries and keys rotate together (they are adjacent heads).
      omni::rope_row(s.qkv.data(), heads + kv_heads, d, cos, sin);
      omni::write_kv_row(s.qkv.data() + q_width, s.qkv.data() + q_width + kv_width, k_base, v_base,
                         dtype, slot, kv_width);
    });
#ifdef _OPENMP
#pragma omp barrier
#endif
    // The row's heads, in shares of whole heads (as paged_attention.cpp cuts
    // a lone row).
    const int64_t threads_on_heads = std::min<int64_t>(heads, nt);
    if (tid < threads_on_heads) {
      phase([&] {
        int64_t b, e;
        share(heads, tid, static_cast<int>(threads_on_heads), &b, &e);
        omni::attend_row(attention, b, e, s.scores[tid], s.acc[tid]);
      });
    }
#ifdef _OPENMP
#pragma omp barrier
#endif
    if (q8_o) {
      on_first([&] { omni::quantize_q8(s.attn.data(), q_width, s.q8); });
#ifdef _OPENMP
#pragma omp barrier
#endif
    }
    product(a.o, s.attn.data(), q8_o, s.out.data(), hidden, nullptr);
#ifdef _OPENMP
#pragma omp barrier
#endif
    on_first([&] {
      omni::rms_norm_row(x, s.out.data(), post_norm, h, hidden, eps);
      if (q8_gate_up) omni::quantize_q8(h, hidden, s.q8);
    });
#ifdef _OPENMP
#pragma omp barrier
#endif
    product(a.gate_up, h, q8_gate_up, s.gu.data(), 2 * inter, nullptr);
#ifdef _OPENMP
#pragma omp barrier
#endif
    on_first([&] {
      omni::silu_and_mul_row(s.gu.data(), s.act.data(), inter);
      if (q8_down) omni::quantize_q8(s.act.data(), inter, s.q8);
    });
#ifdef _OPENMP
#pragma omp barrier
#endif
    product(a.down, s.act.data(), q8_down, s.out.data(), hidden, nullptr);
  }
  if (error) std::rethrow_exception(error);
  // The region's end joined the threads: the residual add and the next
  // layer's norm on this one.
  if (next_norm != nullptr) {
    omni::rms_norm_row(x, s.out.data(), next_norm, h, hidden, eps);
  } else {
    for (int64_t i = 0; i < hidden; ++i) x[i] += s.out[i];
  }
}

}  // namespace

extern "C" {

// Runs one layer for one token (see the top of this file and LayerArgs):
// x and h are updated in place, the token's K/V written into the caches.
// Returns false and `*err` when an argument does not fit.
bool omni_decode_layer(const LayerArgs* args, char** err) {
  return omni::guarded_ptr(err, [&]() -> void* {
           decode_layer(*args);
           return args->x;
         }) != nullptr;
}
}
