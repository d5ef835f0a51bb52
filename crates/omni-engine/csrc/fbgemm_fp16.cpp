// fp16-weight linear layers through libtorch's fbgemm kernels.
//
// tch's generated bindings leave out the `fbgemm_*` operators, so the two we
// need are exposed here with C linkage. Tensors cross the boundary as
// `at::Tensor*` (what tch's `Tensor::as_ptr` / `from_ptr` carry). Errors
// never unwind into Rust: they come back as a malloc'd message in `*err`
// (freed with omni_fbgemm_free_error).
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>

namespace {
template <typename F>
at::Tensor* guarded(char** err, F&& f) {
  *err = nullptr;
  try {
    return new at::Tensor(f());
  } catch (const std::exception& e) {
    *err = strdup(e.what());
  } catch (...) {
    *err = strdup("unknown C++ exception");
  }
  return nullptr;
}
}  // namespace

extern "C" {

// Packs a [out, in] fp32 weight into fbgemm's fp16 layout (an opaque tensor).
// Fails ("Your CPU does not support FBGEMM") without AVX2.
at::Tensor* omni_fbgemm_pack_fp16(const at::Tensor* weight, char** err) {
  return guarded(err, [&] { return at::fbgemm_pack_gemm_matrix_fp16(*weight); });
}

// y = x W^T (+ b) with W packed as fp16 and x, y, b in fp32.
at::Tensor* omni_fbgemm_linear_fp16(const at::Tensor* input, const at::Tensor* packed,
                                    const at::Tensor* bias, char** err) {
  return guarded(err, [&] {
    std::optional<at::Tensor> b;
    if (bias != nullptr) b = *bias;
    return at::fbgemm_linear_fp16_weight_fp32_activation(*input, *packed, b);
  });
}

void omni_fbgemm_free_error(char* err) { free(err); }
}
