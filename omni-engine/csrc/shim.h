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
// Runs `f`, which returns a new heap pointer (or null); an exception becomes
// a null result and `*err`.
template <typename F>
auto guarded_ptr(char** err, F&& f) -> decltype(f()) {
  *err = nullptr;
  try {
    return f();
  } catch (const std::exception& e) {
    *err = strdup(e.what());
  } catch (...) {
    *err = strdup("unknown C++ exception");
  }
  return nullptr;
}

// Runs `f`, which returns a tensor, and hands it to Rust on the heap.
template <typename F>
at::Tensor* guarded(char** err, F&& f) {
  return guarded_ptr(err, [&] { return new at::Tensor(f()); });
}
}  // namespace omni
