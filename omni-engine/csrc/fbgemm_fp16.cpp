// fp16-weight linear layers on fbgemm's fp16 GEMM, called directly.
//
// ATen's `fbgemm_linear_fp16_weight_fp32_activation` runs on one thread and
// allocates its output; splitting the weight into shards made it parallel
// but cost an `at::cat` of the shards' outputs (~10% of a prefill step).
// fbgemm's own entry point, `cblas_gemm_compute(..., thread_id,
// num_threads)`, splits the output columns into parts and writes into a
// buffer we own, so each intra-op thread computes its parts of one output.
// Conventions in shim.h.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <fbgemm/FbgemmFP16.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "shim.h"

using omni::guarded;
using omni::guarded_ptr;

namespace {
// Packed weights, and the output width they produce.
struct PackedFp16 {
  std::unique_ptr<fbgemm::PackedGemmMatrixFP16> matrix;
  int64_t out_features;
  int64_t in_features;
};
}  // namespace

extern "C" {

// Packs a [out, in] fp32 weight for fbgemm's fp16 GEMM. Returns an opaque
// handle for omni_fp16_linear, freed with omni_fp16_free; null and `*err`
// on failure (fbgemm needs AVX2, FMA and F16C).
void* omni_fp16_pack(const at::Tensor* weight, char** err) {
  return guarded_ptr(err, [&]() -> void* {
    TORCH_CHECK(weight->dim() == 2, "weight must be 2-d, got ", weight->dim(), " dims");
    TORCH_CHECK(weight->scalar_type() == at::kFloat, "weight must be fp32");
    TORCH_CHECK(fbgemm::fbgemmHasAvx2Support(), "Your CPU does not support FBGEMM (it needs AVX2)");
    const at::Tensor w = weight->contiguous();
    const int64_t n = w.size(0), k = w.size(1);
    TORCH_CHECK(n > 0 && k > 0, "weight has an empty dimension: ", w.sizes());
    // B = W^T, [k, n]: fbgemm reads W row-major and transposes as it packs.
    auto matrix = std::make_unique<fbgemm::PackedGemmMatrixFP16>(
        fbgemm::matrix_op_t::Transpose, static_cast<int>(k), static_cast<int>(n), 1.0f,
        w.const_data_ptr<float>());
    return new PackedFp16{std::move(matrix), n, k};
  });
}

void omni_fp16_free(void* packed) { delete static_cast<PackedFp16*>(packed); }

// y = x W^T (+ b): x [..., in] fp32, y [..., out] fp32.
at::Tensor* omni_fp16_linear(const at::Tensor* input, const void* handle, const at::Tensor* bias,
                             char** err) {
  return guarded(err, [&] {
    // Named in profiler traces like an ATen op, so a trace shows the GEMMs'
    // share of a step.
    RECORD_FUNCTION("omni::fp16_linear", std::vector<c10::IValue>());
    const auto& packed = *static_cast<const PackedFp16*>(handle);
    TORCH_CHECK(input->scalar_type() == at::kFloat, "input must be fp32");
    TORCH_CHECK(input->dim() >= 1 && input->size(-1) == packed.in_features, "input ",
                input->sizes(), " does not end in ", packed.in_features, " features");
    const at::Tensor x = input->contiguous();
    const int64_t m = x.numel() / packed.in_features;
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = packed.out_features;
    at::Tensor y = at::empty(shape, x.options());
    if (m > 0) {
      const float* a = x.const_data_ptr<float>();
      float* c = y.mutable_data_ptr<float>();
      const int threads = at::get_num_threads();
      // fbgemm sweeps a thread's whole column range for every few rows of
      // A, rereading that range's slice of B each time: when the slice
      // outgrows the caches (an LM head: 49152 columns) the GEMM waits on
      // memory, measured at 43 GFLOP/s against 76 for the same head cut
      // into parts of 4096 columns (one thread, 64 rows). So the columns
      // are cut into parts of at most kPartCols, each thread computing its
      // consecutive parts one after another (fbgemm's own partition, with
      // more parts than threads). Layer matrices fit one part per thread:
      // unchanged.
      constexpr int64_t kPartCols = 4096;
      const int64_t per_thread =
          std::max<int64_t>(1, (packed.out_features + threads * kPartCols - 1) /
                                   (threads * kPartCols));
      const int parts = static_cast<int>(threads * per_thread);
      std::exception_ptr failure;
      // One task per thread id; if the pool runs them inline, one thread
      // walks every id and the result is the same.
      at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
        try {
          for (int64_t part = begin * per_thread; part < end * per_thread; ++part) {
            fbgemm::cblas_gemm_compute(fbgemm::matrix_op_t::NoTranspose, static_cast<int>(m), a,
                                       *packed.matrix, 0.0f, c, static_cast<int>(part), parts);
          }
        } catch (...) {
          // Rethrown below, on the calling thread, which `guarded` catches.
          failure = std::current_exception();
        }
      });
      if (failure) std::rethrow_exception(failure);
    }
    if (bias != nullptr) y.add_(*bias);
    return y;
  });
}
}
