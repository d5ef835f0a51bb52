//! The Rust side of the C++ shim in `csrc/` (conventions in `csrc/shim.h`):
//! tensors cross as `at::Tensor*`, errors come back as a message the shim
//! allocated.
use std::ffi::{c_char, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::{Error, Result};

extern "C" {
    fn omni_shim_free_error(err: *mut c_char);
}

/// Turns the shim's (pointer, error) pair into a tensor or an error.
///
/// # Safety
/// `ptr` must be null or a fresh `at::Tensor*` from the shim; `err` null or
/// a message the shim allocated.
pub(crate) unsafe fn from_shim(ptr: *mut C_tensor, err: *mut c_char, what: &str) -> Result<Tensor> {
    if !err.is_null() {
        // SAFETY: the shim wrote a NUL-terminated strdup'd string.
        let msg = unsafe { CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: allocated by the shim with strdup, freed once here.
        unsafe { omni_shim_free_error(err) };
        return Err(Error::Torch(tch::TchError::Torch(format!("{what}: {msg}"))));
    }
    if ptr.is_null() {
        return Err(Error::Torch(tch::TchError::Torch(format!(
            "{what}: no result"
        ))));
    }
    // SAFETY: a heap `at::Tensor` we now own; tch frees it on drop.
    Ok(unsafe { Tensor::from_ptr(ptr) })
}
