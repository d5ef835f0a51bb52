//! The `omni-stage` worker, built as part of this test package so that
//! `cargo test -p omni-tests` always runs a worker as fresh as the library
//! (cargo does not rebuild another package's binaries for these tests).
//!
//! One addition for the supervision tests: SIGUSR1 makes this copy exit at
//! once with status 3, so a test can have a stage fail by itself at a
//! moment it chooses (the worker itself only handles SIGTERM and SIGINT).

extern "C" fn exit_3(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(3) }
}

fn main() {
    // SAFETY: installs a handler that only calls an async-signal-safe function.
    unsafe {
        libc::signal(libc::SIGUSR1, exit_3 as *const () as libc::sighandler_t);
    }
    omni_runtime::stage_main()
}
