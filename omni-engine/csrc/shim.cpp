#include "shim.h"

extern "C" void omni_shim_free_error(char* err) { free(err); }

// ATen ops whose arguments tch's generated bindings leave out.

// leaky_relu with a slope: tch's binding fixes it at 0.01, and the two-op
// composite (maximum of x and slope * x) reads and writes three times the
// memory, which showed in the HiFi-GAN decoders' profiles.
extern "C" at::Tensor* omni_leaky_relu(const at::Tensor* x, double slope, char** err) {
  return omni::guarded(err, [&] { return at::leaky_relu(*x, slope); });
}
