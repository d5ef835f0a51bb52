// fp16-weight linear layers through libtorch's fbgemm kernels.
//
// tch's generated bindings leave out the `fbgemm_*` operators, so the two we
// need are exposed here with C linkage (conventions in shim.h).
#include <ATen/Parallel.h>

#include <optional>
#include <vector>

#include "shim.h"

using omni::guarded;

extern "C" {

// Packs a [out, in] fp32 weight into fbgemm's fp16 layout (an opaque tensor).
// Fails ("Your CPU does not support FBGEMM") without AVX2.
at::Tensor* omni_fbgemm_pack_fp16(const at::Tensor* weight, char** err) {
  return guarded(err, [&] { return at::fbgemm_pack_gemm_matrix_fp16(*weight); });
}

// y = x W^T (+ b) with W packed as fp16 and x, y, b in fp32; W comes as
// `n` shards of its output rows, in order, each packed on its own.
//
// ATen's fbgemm fp16 linear runs on one thread (measured: one core of two
// busy in batched decode), and fbgemm's own thread split is only reachable
// through headers a PyTorch wheel cannot compile (they need asmjit). So the
// weight is sharded by output columns at load and the shards run in
// parallel on the intra-op threads, each writing its slice of y.
at::Tensor* omni_fbgemm_linear_fp16(const at::Tensor* input, const at::Tensor* const* shards,
                                    int64_t n, const at::Tensor* bias, char** err) {
  return guarded(err, [&] {
    TORCH_CHECK(n >= 1, "no weight shards");
    const at::Tensor x = input->contiguous();
    std::vector<at::Tensor> parts(static_cast<size_t>(n));
    std::exception_ptr failure;
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      try {
        for (int64_t i = begin; i < end; ++i) {
          parts[i] = at::fbgemm_linear_fp16_weight_fp32_activation(x, *shards[i], std::nullopt);
        }
      } catch (...) {
        // Rethrown below, on the calling thread, which `guarded` catches.
        failure = std::current_exception();
      }
    });
    if (failure) std::rethrow_exception(failure);
    at::Tensor y = n == 1 ? parts[0] : at::cat(parts, -1);
    if (bias != nullptr) y.add_(*bias);
    return y;
  });
}
}
