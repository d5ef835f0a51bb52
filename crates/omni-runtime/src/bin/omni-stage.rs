//! `omni-stage`: the worker process of one pipeline stage. The orchestrator
//! starts it as `omni-stage --launch FILE`; it is not meant to be run by
//! hand. Exit codes: 0 after a clean shutdown, 1 on an error (printed to
//! stderr), 2 on bad arguments.

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args_os().skip(1);
    let launch = match (args.next(), args.next(), args.next()) {
        (Some(flag), Some(path), None) if flag == "--launch" => PathBuf::from(path),
        (Some(flag), None, None) if flag == "--version" => {
            println!(
                "omni-stage {} (wire protocol {})",
                env!("CARGO_PKG_VERSION"),
                omni_runtime::PROTOCOL_VERSION
            );
            return;
        }
        _ => {
            eprintln!("usage: omni-stage --launch FILE   (started by the Omni orchestrator)");
            std::process::exit(2);
        }
    };
    omni_runtime::init_worker_tracing();
    let code = match omni_runtime::run_stage_worker(&launch) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("omni-stage: error: {e}");
            1
        }
    };
    // Detached helper threads (log forwarding in libraries, a stuck model
    // step) must not keep the process alive after the stage has stopped.
    std::process::exit(code);
}
