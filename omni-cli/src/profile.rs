//! `omni profile`: read the traces a profiled run wrote. The work is done
//! by `omni-profiler`'s tools (re-exported by `omni-core`).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use omni_core::profile_tools;

use crate::BadInput;

/// Summarize, compare or merge the traces of a profiled run.
#[derive(Subcommand, Debug)]
pub enum ProfileCommand {
    /// Per stage, the top operations by total time, its busy and idle time
    /// (idle by cause: holding, blocked, starved, empty) and how full its
    /// batches were; the stage that limits the pipeline; per request where
    /// its time went (stage by stage: transfer, queue, compute), what
    /// dominated it, and its time to first audio in a speech pipeline.
    #[command(
        after_help = "Example:\n  omni profile summarize /tmp/traces\n  omni profile summarize /tmp/traces --json | jq .bottleneck"
    )]
    Summarize {
        /// The profiler directory ($VLLM_TORCH_PROFILER_DIR of the run).
        dir: PathBuf,
        /// Print the whole analysis as one JSON object (every request and
        /// operation; schema: omni-profiler/schema/analysis.schema.json).
        #[arg(long)]
        json: bool,
    },
    /// What got slower or faster from profile A to profile B: per stage
    /// (its steps' time), per operation category and per operation, total
    /// and per step, largest change first.
    #[command(after_help = "Example:\n  omni profile diff /tmp/traces-before /tmp/traces-after")]
    Diff {
        /// The profile compared against (before).
        a: PathBuf,
        /// The profile compared (after).
        b: PathBuf,
        /// Print the whole comparison as one JSON object (schema:
        /// omni-profiler/schema/diff.schema.json).
        #[arg(long)]
        json: bool,
    },
    /// One Chrome trace of all stages, with flow arrows that follow each
    /// request from stage to stage; open it in https://ui.perfetto.dev.
    #[command(after_help = "Example:\n  omni profile merge /tmp/traces -o /tmp/merged.json")]
    Merge {
        /// The profiler directory ($VLLM_TORCH_PROFILER_DIR of the run).
        dir: PathBuf,
        /// The merged trace to write.
        #[arg(short, long)]
        output: PathBuf,
    },
}

pub fn run(cmd: ProfileCommand) -> anyhow::Result<()> {
    match cmd {
        ProfileCommand::Summarize { dir, json } => {
            check_dir(&dir)?;
            let analysis = profile_tools::analyze(&dir)
                .with_context(|| format!("summarizing the traces in {}", dir.display()))?;
            if json {
                println!("{}", serde_json::to_string(&analysis)?);
            } else {
                print!("{analysis}");
            }
        }
        ProfileCommand::Diff { a, b, json } => {
            check_dir(&a)?;
            check_dir(&b)?;
            let diff = profile_tools::diff(&a, &b).with_context(|| {
                format!(
                    "comparing the traces in {} and {}",
                    a.display(),
                    b.display()
                )
            })?;
            if json {
                println!("{}", serde_json::to_string(&diff)?);
            } else {
                print!("{diff}");
            }
        }
        ProfileCommand::Merge { dir, output } => {
            check_dir(&dir)?;
            let written = profile_tools::merge(&dir, &output)
                .with_context(|| format!("merging the traces in {}", dir.display()))?;
            println!("{}", written.display());
            eprintln!("open it in https://ui.perfetto.dev (Open trace file) or chrome://tracing");
        }
    }
    Ok(())
}

fn check_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.is_dir() {
        return Err(BadInput(format!("{} is not a directory", dir.display())).into());
    }
    Ok(())
}

/// Points `VLLM_TORCH_PROFILER_DIR` at `dir` (when given) before any stage
/// starts, or checks that it is set.
pub fn set_profiler_dir(dir: Option<&Path>) -> anyhow::Result<()> {
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the profiler directory {}", dir.display()))?;
            let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            // Single-threaded still: no runtime or stage exists yet, and the
            // stage processes inherit the variable.
            std::env::set_var("VLLM_TORCH_PROFILER_DIR", dir);
            Ok(())
        }
        None if std::env::var_os("VLLM_TORCH_PROFILER_DIR").is_some_and(|d| !d.is_empty()) => {
            Ok(())
        }
        None => Err(BadInput(
            "--profile needs a trace directory: set VLLM_TORCH_PROFILER_DIR or pass --profile-dir"
                .into(),
        )
        .into()),
    }
}

/// Prints the trace files of a profiled run and how to open them.
pub fn print_traces(traces: &BTreeMap<usize, Vec<PathBuf>>, json: bool) {
    if json {
        let map: BTreeMap<String, Vec<String>> = traces
            .iter()
            .map(|(s, p)| {
                (
                    s.to_string(),
                    p.iter().map(|p| p.display().to_string()).collect(),
                )
            })
            .collect();
        println!("{}", serde_json::json!({ "traces": map }));
        return;
    }
    println!("=== traces ===");
    for (stage, paths) in traces {
        for p in paths {
            println!("stage {stage}: {}", p.display());
        }
    }
    if traces.values().all(Vec::is_empty) {
        println!("(no trace files were written)");
    }
    println!(
        "Open a trace in Perfetto: https://ui.perfetto.dev -> \"Open trace file\" (or chrome://tracing).\n\
         One timeline of all stages: omni profile merge \"$VLLM_TORCH_PROFILER_DIR\" -o merged.json"
    );
}
