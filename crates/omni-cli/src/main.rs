//! `omni`: the command-line front end of Omni.
//!
//! Thin glue over `omni-core`: `generate`, `serve` (OpenAI-compatible HTTP),
//! `pipelines`, `profile` (summarize, merge) and `bench`. It must not know
//! engine internals.
use clap::Parser;

/// Omni: multi-stage (omni-modal) inference on libtorch, with cross-stage profiling.
#[derive(Parser, Debug)]
#[command(name = "omni", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
