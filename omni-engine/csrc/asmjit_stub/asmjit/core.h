// Stand-in for asmjit, which PyTorch wheels do not ship.
//
// fbgemm's FbgemmFP16.h reaches asmjit only through SimdUtils.h, which names
// asmjit's register types in `simd_info<...>::vec_reg_t`. The fp16 packing
// and GEMM entry points that fbgemm_fp16.cpp uses never touch those types,
// and no asmjit code is compiled or linked: these declarations only let the
// header parse. Version 1.0 selects SimdUtils.h's plain `using` branch.
#pragma once

#define ASMJIT_LIBRARY_MAKE_VERSION(major, minor, patch) \
  (((major) << 16) | ((minor) << 8) | (patch))
#define ASMJIT_LIBRARY_VERSION ASMJIT_LIBRARY_MAKE_VERSION(1, 0, 0)

namespace asmjit {
namespace x86 {
struct Xmm {};
struct Ymm {};
struct Zmm {};
}  // namespace x86
}  // namespace asmjit
