//! The `omni-stage` worker, built as part of this test package so that
//! `cargo test -p omni-tests` always runs a worker as fresh as the library
//! (cargo does not rebuild another package's binaries for these tests).
fn main() {
    omni_runtime::stage_main()
}
