// What every C++ entry point of the engine shares. Tensors cross the
// boundary as `at::Tensor*` (what tch's `Tensor::as_ptr` / `from_ptr`
// carry). Errors never unwind into Rust: they come back as a malloc'd
// message in `*err`, freed with omni_shim_free_error (shim.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace omni {
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
}  // namespace omni
