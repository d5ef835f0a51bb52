//! `omni-stage`: the worker process of one pipeline stage. The orchestrator
//! starts it as `omni-stage --launch FILE`; it is not meant to be run by
//! hand. Exit codes: 0 after a clean shutdown, 1 on an error (printed to
//! stderr), 2 on bad arguments.

fn main() {
    omni_runtime::stage_main()
}
