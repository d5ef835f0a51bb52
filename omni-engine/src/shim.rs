//! The Rust side of the C++ shim in `csrc/` (conventions in `csrc/shim.h`):
//! tensors cross as `at::Tensor*`, errors come back as a message the shim
//! allocated.
use std::ffi::{c_char, CStr};
use std::ptr::NonNull;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::{Error, Result};

extern "C" {
    fn omni_shim_free_error(err: *mut c_char);
    fn omni_leaky_relu(x: *const C_tensor, slope: f64, err: *mut *mut c_char) -> *mut C_tensor;
}

/// `leaky_relu(x, slope)` (tch's binding has no slope).
pub(crate) fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    let mut err = std::ptr::null_mut();
    // SAFETY: `x` outlives the call, which only reads it.
    let ptr = unsafe { omni_leaky_relu(x.as_ptr(), slope, &mut err) };
    // SAFETY: straight from the shim.
    unsafe { from_shim(ptr, err, "leaky_relu") }
}

/// Turns the shim's (pointer, error) pair into a tensor or an error.
///
/// # Safety
/// `ptr` must be null or a fresh `at::Tensor*` from the shim; `err` null or
/// a message the shim allocated.
pub(crate) unsafe fn from_shim(ptr: *mut C_tensor, err: *mut c_char, what: &str) -> Result<Tensor> {
    // SAFETY: as this function's contract says.
    if let Some(msg) = unsafe { take_error(err) } {
        return Err(shim_error(what, &msg));
    }
    if ptr.is_null() {
        return Err(shim_error(what, "no result"));
    }
    // SAFETY: a heap `at::Tensor` we now own; tch frees it on drop.
    Ok(unsafe { Tensor::from_ptr(ptr) })
}

/// Turns a non-null handle from the shim into `Ok`, or its error into `Err`.
///
/// # Safety
/// `err` must be null or a message the shim allocated.
pub(crate) unsafe fn handle_from_shim<T>(
    handle: *mut T,
    err: *mut c_char,
    what: &str,
) -> Result<NonNull<T>> {
    // SAFETY: as this function's contract says.
    if let Some(msg) = unsafe { take_error(err) } {
        return Err(shim_error(what, &msg));
    }
    NonNull::new(handle).ok_or_else(|| shim_error(what, "no result"))
}

/// Turns the shim's (success flag, error) pair into a result.
///
/// # Safety
/// `err` must be null or a message the shim allocated.
pub(crate) unsafe fn status_from_shim(ok: bool, err: *mut c_char, what: &str) -> Result<()> {
    // SAFETY: as this function's contract says.
    if let Some(msg) = unsafe { take_error(err) } {
        return Err(shim_error(what, &msg));
    }
    if ok {
        Ok(())
    } else {
        Err(shim_error(what, "failed"))
    }
}

fn shim_error(what: &str, msg: &str) -> Error {
    Error::Torch(tch::TchError::Torch(format!("{what}: {msg}")))
}

/// The shim's error message, if any, freed.
///
/// # Safety
/// `err` must be null or a message the shim allocated.
unsafe fn take_error(err: *mut c_char) -> Option<String> {
    if err.is_null() {
        return None;
    }
    // SAFETY: the shim wrote a NUL-terminated strdup'd string.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: allocated by the shim with strdup, freed once here.
    unsafe { omni_shim_free_error(err) };
    Some(msg)
}
