//! Safe wrappers over the C++ shim (`csrc/kineto_shim.cpp`) around libtorch's
//! Kineto profiler (`torch::autograd::profiler::{prepareProfiler,
//! enableProfiler, disableProfiler}`) and `at::RecordFunction`.
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;

use crate::{Error, ProfileOptions, Result};

extern "C" {
    fn omni_kineto_init(err: *mut *mut c_char) -> c_int;
    fn omni_kineto_start(
        cuda: c_int,
        record_shapes: c_int,
        profile_memory: c_int,
        with_stack: c_int,
        with_flops: c_int,
        all_threads: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn omni_kineto_stop(
        path: *const c_char,
        flops_path: *const c_char,
        err: *mut *mut c_char,
    ) -> c_int;
    fn omni_rf_begin(name: *const c_char) -> *mut c_void;
    fn omni_rf_end(handle: *mut c_void);
    fn omni_kineto_free_str(s: *mut c_char);
}

/// Takes the shim's error message (and frees it).
fn take_error(err: *mut c_char, what: &str) -> Error {
    if err.is_null() {
        return Error::Kineto(format!("{what} failed"));
    }
    // SAFETY: the shim returns a NUL-terminated string from malloc, which we
    // own and free exactly once, after copying it.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { omni_kineto_free_str(err) };
    Error::Kineto(format!("{what}: {msg}"))
}

/// Initialises Kineto on the calling thread, once per process (later calls
/// do nothing). See [`crate::init_main_thread`].
pub(crate) fn init() -> Result<()> {
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: a valid out pointer; the shim catches C++ exceptions.
    let rc = unsafe { omni_kineto_init(&mut err) };
    if rc == 0 {
        Ok(())
    } else {
        Err(take_error(err, "kineto init"))
    }
}

/// Enables Kineto: CPU activities always, CUDA activities when `cuda`.
///
/// Kineto's default, thread-local mode, as `torch.profiler.profile` uses:
/// torch ops of the calling thread are recorded, and [`stop_and_save`] must
/// run on the same thread. (`profile_all_threads` would record every
/// thread, but then `profile_memory` records nothing: the memory reporter
/// is found through the enabling thread's debug info.) Spans of other
/// threads still reach the trace through the span recorder.
pub(crate) fn start(options: &ProfileOptions, cuda: bool) -> Result<()> {
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: plain ints and a valid out pointer; the shim catches C++
    // exceptions.
    let rc = unsafe {
        omni_kineto_start(
            c_int::from(cuda),
            c_int::from(options.record_shapes),
            c_int::from(options.profile_memory),
            c_int::from(options.with_stack),
            c_int::from(options.with_flops),
            0,
            &mut err,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(take_error(err, "enableProfiler"))
    }
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| Error::Kineto(format!("trace path {} contains a NUL byte", path.display())))
}

/// Disables Kineto and saves its Chrome trace to `path`, and, with
/// `flops_path`, the ops' FLOP estimates (`<start ns>\t<flops>\t<name>`
/// lines) there.
pub(crate) fn stop_and_save(path: &Path, flops_path: Option<&Path>) -> Result<()> {
    let c_trace = c_path(path)?;
    let c_flops = flops_path.map(c_path).transpose()?;
    let flops_ptr = c_flops.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: valid C strings (or null) and out pointer; the shim catches
    // exceptions.
    let rc = unsafe { omni_kineto_stop(c_trace.as_ptr(), flops_ptr, &mut err) };
    if rc == 0 {
        Ok(())
    } else {
        Err(take_error(err, "disableProfiler/save"))
    }
}

/// An open `RecordFunction` range (`USER_SCOPE`). Not `Send`: it must end on
/// the thread that opened it, which dropping it does.
pub(crate) struct Range(NonNull<c_void>);

impl Range {
    /// Opens a range named `name` on this thread; `None` when no profiler
    /// callback is active on it (nothing would be recorded).
    pub(crate) fn begin(name: &str) -> Option<Range> {
        let c_name = CString::new(name.replace('\0', " ")).ok()?;
        // SAFETY: a valid C string; RecordFunction copies the name.
        let handle = unsafe { omni_rf_begin(c_name.as_ptr()) };
        NonNull::new(handle).map(Range)
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        // SAFETY: the handle came from omni_rf_begin and is ended once.
        unsafe { omni_rf_end(self.0.as_ptr()) };
    }
}
