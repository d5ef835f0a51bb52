//! `torch.save` pickles, read by libtorch's own unpickler through the C++
//! shim (`csrc/pickle.cpp`): what models ship that is not safetensors, such
//! as Qwen2.5-Omni's `spk_dict.pt`. Nested dicts come back flattened, one
//! entry per tensor or integer, keyed by their path (`Chelsie.cond`), in
//! the file's order.
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::{Error, Result};
use crate::shim::handle_from_shim;

extern "C" {
    fn omni_pickle_load(path: *const c_char, err: *mut *mut c_char) -> *mut c_void;
    fn omni_pickle_len(handle: *const c_void) -> i64;
    fn omni_pickle_entry(
        handle: *const c_void,
        i: i64,
        tensor: *mut *mut C_tensor,
        integer: *mut i64,
    ) -> *const c_char;
    fn omni_pickle_free(handle: *mut c_void);
}

/// One value of a pickle.
#[derive(Debug)]
pub(crate) enum PickleValue {
    /// A tensor (on the CPU).
    Tensor(Tensor),
    /// An integer (or a boolean as 0/1).
    Int(i64),
}

/// The tensors and integers of the pickle at `path`, with their key paths.
pub(crate) fn load(path: &Path) -> Result<Vec<(String, PickleValue)>> {
    let bad = |reason: String| Error::Format {
        path: path.to_path_buf(),
        format: "torch pickle",
        reason,
    };
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| bad("the path has a NUL byte".to_owned()))?;
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: a valid C string and out pointer; the shim catches C++
    // errors, and err is then a message it allocated.
    let handle = unsafe {
        let handle = omni_pickle_load(c_path.as_ptr(), &mut err);
        handle_from_shim(handle, err, "pickle_load")
    }
    .map_err(|e| bad(e.to_string()))?
    .as_ptr();
    // SAFETY: handle is live until omni_pickle_free below; each entry's key
    // lives as long as the handle and is copied before it is freed.
    let out = unsafe {
        let n = omni_pickle_len(handle);
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for i in 0..n {
            let mut tensor: *mut C_tensor = std::ptr::null_mut();
            let mut integer = 0i64;
            let key = omni_pickle_entry(handle, i, &mut tensor, &mut integer);
            let key = CStr::from_ptr(key).to_string_lossy().into_owned();
            let value = if tensor.is_null() {
                PickleValue::Int(integer)
            } else {
                PickleValue::Tensor(Tensor::from_ptr(tensor))
            };
            out.push((key, value));
        }
        omni_pickle_free(handle);
        out
    };
    Ok(out)
}
