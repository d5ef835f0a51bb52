//! The `omni` command-line front end of Omni, as a library: the binary
//! (`src/main.rs`) only calls [`main`]; the HTTP server is public as
//! [`serve`] so tests can drive its `Router` without a socket.
//!
//! Thin glue over `omni-core`: `generate`, `serve` (OpenAI-compatible HTTP),
//! `pipelines`, `profile` (summarize, merge) and `bench`. It must not know
//! engine internals.
//!
//! Exit codes: 0 success; 1 the run failed (a stage died, I/O, ...);
//! 2 bad usage or bad input (flags, prompts, sampling params, pipeline
//! files, stage ids).
mod audio;
mod bench;
mod generate;
mod http_client;
mod logging;
mod pipelines;
mod profile;
mod progress;
mod sampling_flags;
pub mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Omni: multi-stage (omni-modal) inference on libtorch, with cross-stage
/// profiling.
///
/// Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) to see more.
/// Exit codes: 0 success, 1 failure, 2 bad usage or input.
#[derive(Parser, Debug)]
#[command(name = "omni", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Generate(Box<generate::GenerateArgs>),
    Serve(serve_cmd::ServeArgs),
    Pipelines(pipelines::PipelinesArgs),
    #[command(subcommand)]
    Profile(profile::ProfileCommand),
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    Spectrogram(SpectrogramArgs),
}

/// Draw a WAV file's spectrogram as a PNG picture.
///
/// Time runs left to right (256 samples a column), frequency bottom to top
/// from 0 to half the sample rate, and brightness is power over 80 dB.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:
  omni spectrogram answers/prompt0_stage1.wav -o answer.png")]
struct SpectrogramArgs {
    /// A WAV file (16-bit PCM or 32-bit float; the first channel).
    wav: std::path::PathBuf,
    /// Where the PNG goes.
    #[arg(short, long)]
    output: std::path::PathBuf,
}

fn spectrogram(args: SpectrogramArgs) -> anyhow::Result<()> {
    let audio = audio::read_wav(&args.wav).map_err(|e| BadInput(format!("{e:#}")))?;
    audio::write_spectrogram(&args.output, &audio)?;
    println!("{}", args.output.display());
    Ok(())
}

mod serve_cmd;

/// Exit code for a failed run.
const EXIT_FAILURE: u8 = 1;
/// Exit code for bad usage or bad input.
const EXIT_BAD_INPUT: u8 = 2;

/// Parses the command line, runs the command, returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init();
    let result = match cli.command {
        Command::Generate(a) => generate::run(*a),
        Command::Serve(a) => serve_cmd::run(a),
        Command::Pipelines(a) => pipelines::run(a),
        Command::Profile(c) => profile::run(c),
        Command::Bench(c) => bench::run(c),
        Command::Spectrogram(a) => spectrogram(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// 2 when the caller's input was at fault, 1 otherwise.
fn exit_code(e: &anyhow::Error) -> u8 {
    let bad_input = e.chain().any(|c| {
        c.downcast_ref::<omni_core::Error>()
            .is_some_and(|e| e.is_invalid_input() || matches!(e, omni_core::Error::Pipeline { .. }))
            || c.downcast_ref::<BadInput>().is_some()
    });
    if bad_input {
        EXIT_BAD_INPUT
    } else {
        EXIT_FAILURE
    }
}

/// An error in the command's input found by the CLI itself.
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// `--backend`: where the stages run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendArg {
    /// Child processes of this one, on this host.
    Local,
    /// The nodes of the Ray cluster at `RAY_ADDRESS`.
    Ray,
}

impl From<BackendArg> for omni_core::runtime::Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Local => omni_core::runtime::Backend::Local,
            BackendArg::Ray => omni_core::runtime::Backend::Ray,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_help_has_an_example() {
        let mut cmd = Cli::command();
        let mut missing = Vec::new();
        fn walk(c: &mut clap::Command, path: String, missing: &mut Vec<String>) {
            let subs: Vec<String> = c
                .get_subcommands()
                .map(|s| s.get_name().to_string())
                .collect();
            if subs.is_empty() || path.is_empty() {
                let help = c.render_long_help().to_string();
                if !path.is_empty() && !help.contains("Example") {
                    missing.push(path.clone());
                }
            }
            for name in subs {
                if name == "help" {
                    continue;
                }
                if let Some(sub) = c.find_subcommand_mut(&name) {
                    walk(sub, format!("{path} {name}"), missing);
                }
            }
        }
        walk(&mut cmd, String::new(), &mut missing);
        assert!(
            missing.is_empty(),
            "subcommands without an example: {missing:?}"
        );
    }

    #[test]
    fn exit_codes_tell_bad_input_from_failure() {
        let bad = anyhow::Error::new(omni_core::Error::EmptyPrompts).context("generating");
        assert_eq!(exit_code(&bad), EXIT_BAD_INPUT);
        let failed = anyhow::Error::new(omni_core::Error::Incomplete {
            request_id: "0".into(),
            stage_id: 1,
        });
        assert_eq!(exit_code(&failed), EXIT_FAILURE);
    }
}
