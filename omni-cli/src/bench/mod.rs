//! `omni bench`: end-to-end pipeline throughput (against HF transformers),
//! what profiling costs, and serving latency. These are benchmarks, not
//! tests: they print Markdown tables (or JSON with `--json`) for
//! BENCHMARKS.md.
mod audio;
mod encoder;
mod load;
mod pipeline;
mod profile;
mod serve;
mod voice;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use omni_core::{ChatMessage, OmniEngineArgs, OmniLLM, PipelineConfig, Prompt, SamplingParams};

use crate::progress;

/// Benchmarks: pipeline throughput, profiling cost, serving latency.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// End-to-end throughput (prompts/s, generated tok/s over all final
    /// stages) of a pipeline run through OmniLLM, side by side in the same
    /// run with HF transformers running the same stages one after the other
    /// (`--reference hf`, default pipeline only). Also the run's sustained
    /// GFLOP/s (the work each stage's decoder did, from its token counts,
    /// prefix-cache hits left out) against the GEMM peak: the model's own
    /// layer GEMMs alone on the same cores, measured right before and right
    /// after each batch with the stages idle (the larger counts).
    #[command(
        after_help = "Example:\n  omni bench pipeline --pipeline default --prompts 16,64 --max-tokens 32"
    )]
    Pipeline(PipelineBench),
    /// Decode throughput of a pipeline with profiling compiled in but off,
    /// with the noop backend, and with the chrome and torch backends
    /// recording; plus start_profile / stop_profile latency across all
    /// stages. Configurations run interleaved, round by round.
    #[command(
        after_help = "Example:\n  omni bench profile --pipeline default --prompts 16 --max-tokens 32 --rounds 3"
    )]
    Profile(profile::ProfileBench),
    /// Requests/s and time to first token of `omni serve` (started in
    /// process on a loopback port) at several numbers of concurrent
    /// streaming clients.
    #[command(
        after_help = "Example:\n  omni bench serve --pipeline default --concurrency 1,8,32 --max-tokens 16"
    )]
    Serve(serve::ServeBench),
    /// Reliability under load: `omni serve` (in process, loopback) flooded
    /// by 64, 256 and 1024 concurrent clients (streaming, whole answers,
    /// and streams hung up mid-way), then an optional steady soak that
    /// watches every process's memory. Fails unless every request was
    /// answered or refused with 429 + Retry-After, no stage holds a request
    /// afterwards, and memory stayed within the margin.
    #[command(
        after_help = "Examples:\n  omni bench load --clients 64,256,1024\n  omni bench load --clients 64 --soak-seconds 600 --soak-clients 16"
    )]
    Load(load::LoadBench),
    /// Speech: the Piper VITS stage's speed (audio seconds per wall second)
    /// at 1 and 8 concurrent requests, side by side in the same run with
    /// Piper's own Python path (piper-phonemize + onnxruntime) on the same
    /// sentences; and the `speak` pipeline's time to first audio.
    #[command(after_help = "Example:\n  omni bench voice --concurrency 1,8 --rounds 3")]
    Voice(voice::VoiceBench),
    /// Qwen2.5-Omni: the qwen2_5_omni pipeline's wall time, audio seconds
    /// per wall second and per-stage time at 1 and 8 concurrent requests,
    /// side by side in the same run with transformers running the same
    /// folder; and the HiFi-GAN vocoder stage against PyTorch.
    #[command(after_help = "Example:\n  omni bench audio --concurrency 1,8 --rounds 3")]
    Audio(audio::AudioBench),
    /// Qwen2.5-Omni's audio input: Whisper features and the thinker's
    /// audio encoder, milliseconds per second of audio at several clip
    /// lengths, side by side in the same run with transformers' processor
    /// and audio tower on the same samples.
    #[command(after_help = "Example:\n  omni bench encoder --seconds 4,30,120 --rounds 3")]
    Encoder(encoder::EncoderBench),
}

/// What `omni bench pipeline` compares against.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reference {
    /// HF transformers `generate` (fp32, same GGUF weights), stage after
    /// stage, in a Python child process.
    Hf,
    /// Omni itself on the local backend (child processes): what another
    /// `--backend` costs.
    Local,
    /// Omni alone.
    None,
}

/// Flags of `omni bench pipeline`.
#[derive(Args, Debug)]
pub struct PipelineBench {
    /// A built-in pipeline or a pipeline file.
    #[arg(long, default_value = omni_core::DEFAULT_PIPELINE)]
    pub pipeline: String,
    /// Batch sizes to run, e.g. 16,64.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub prompts: Vec<usize>,
    /// Tokens every stage generates per prompt (greedy, EOS ignored, so
    /// both systems generate the same number of tokens).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// The reference run in the same invocation.
    #[arg(long, value_enum, default_value = "hf")]
    pub reference: Reference,
    /// Where Omni's stages run: `local` or `ray` (the cluster at
    /// `RAY_ADDRESS`); the pipeline's own `runtime.backend` when absent.
    #[arg(long, value_enum)]
    pub backend: Option<crate::BackendArg>,
    #[command(flatten)]
    pub python: PythonFlags,
    /// Print one JSON object per system and batch size.
    #[arg(long)]
    pub json: bool,
}

/// Where the Python reference runs.
#[derive(Args, Debug)]
pub struct PythonFlags {
    /// The Python with transformers and gguf (`OMNI_BENCH_DEPS=1
    /// scripts/setup` installs them). Default: `$OMNI_VENV/bin/python`,
    /// else `python3`.
    #[arg(long, env = "OMNI_BENCH_PYTHON")]
    pub python: Option<PathBuf>,
    /// Intra-op threads of the reference (torch.set_num_threads).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

impl PythonFlags {
    fn interpreter(&self) -> PathBuf {
        if let Some(p) = &self.python {
            return p.clone();
        }
        std::env::var_os("OMNI_VENV")
            .map(|v| PathBuf::from(v).join("bin/python"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("python3"))
    }
}

impl PythonFlags {
    /// Runs a reference `script` (fed on stdin, so an installed `omni`
    /// needs no file beside it) with `args` under a spinner, and reads the
    /// JSON object of each line it prints that starts with `{`. `needs`
    /// says what to install when it fails.
    fn run_reference<T: serde::de::DeserializeOwned>(
        &self,
        label: &str,
        script: &str,
        args: &[std::ffi::OsString],
        needs: &str,
    ) -> anyhow::Result<Vec<T>> {
        use std::io::Write as _;
        let python = self.interpreter();
        let bar = progress::spinner(format!("{label} ({})", python.display()));
        let mut child = std::process::Command::new(&python)
            .arg("-")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", python.display()))?;
        child
            .stdin
            .take()
            .context("no stdin to the reference")?
            .write_all(script.as_bytes())
            .context("sending the reference script")?;
        let out = child
            .wait_with_output()
            .context("waiting for the reference")?;
        bar.finish_and_clear();
        if !out.status.success() {
            anyhow::bail!(
                "the {label} ({}) failed with {}; it needs {needs}",
                python.display(),
                out.status
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).with_context(|| format!("reference printed {l:?}")))
            .collect()
    }
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Pipeline(b) => pipeline::run(b),
        BenchCommand::Profile(b) => profile::run(b),
        BenchCommand::Voice(b) => voice::run(b),
        BenchCommand::Audio(b) => audio::run(b),
        BenchCommand::Encoder(b) => encoder::run(b),
        BenchCommand::Serve(b) => tokio_runtime()?.block_on(serve::run(b)),
        BenchCommand::Load(b) => tokio_runtime()?.block_on(load::run(b)),
    }
}

/// `omni serve` running in this process on a loopback port, for the
/// benchmarks that drive it over HTTP.
struct LocalServer {
    addr: String,
    state: std::sync::Arc<crate::serve::AppState>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl LocalServer {
    /// Starts the pipeline `args` names (under a spinner) and serves it.
    async fn start(args: omni_core::OmniEngineArgs) -> anyhow::Result<Self> {
        use std::sync::Arc;
        let listener = crate::serve::bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .context("binding loopback")?;
        let addr = listener.local_addr()?.to_string();
        let name = args.model.clone();
        let bar = progress::spinner(format!("starting pipeline {name:?}"));
        let omni = omni_core::AsyncOmni::from_engine_args(args).await;
        bar.finish_and_clear();
        let omni = omni.context("cannot start the pipeline")?;
        let state = Arc::new(crate::serve::AppState::new(
            omni,
            &name,
            crate::serve::GenerationConfig::Pipeline,
        ));
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::serve::serve(
            listener,
            Arc::clone(&state),
            async move {
                let _ = stop_rx.await;
            },
            std::time::Duration::from_secs(30),
        ));
        Ok(Self {
            addr,
            state,
            stop,
            task,
        })
    }

    /// Stops serving and shuts the pipeline down.
    async fn stop(self) -> anyhow::Result<()> {
        // The server stops the pipeline once it holds the last handle.
        drop(self.state);
        let _ = self.stop.send(());
        self.task.await.context("server task")?
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// Varied questions, so batches are not one prompt repeated.
const TOPICS: [&str; 16] = [
    "the ocean",
    "volcanoes",
    "honey bees",
    "the moon",
    "bicycles",
    "rainbows",
    "coffee",
    "penguins",
    "libraries",
    "thunderstorms",
    "chess",
    "bread",
    "glaciers",
    "owls",
    "trains",
    "gardens",
];

/// Question forms; with [`TOPICS`], 64 distinct prompts. Distinct, so the
/// prefix cache only gains what real traffic shares (the chat template), not
/// whole repeated prompts.
const FORMS: [(&str, &str); 4] = [
    ("Tell me one interesting fact about ", "."),
    ("What would surprise most people about ", "?"),
    ("Explain briefly why people care about ", "."),
    ("Describe ", " to a curious child."),
];

/// The i-th benchmark prompt (`bench/hf_pipeline.py` builds the same).
pub fn bench_prompt(i: usize) -> String {
    let (head, tail) = FORMS[(i / TOPICS.len()) % FORMS.len()];
    format!("{head}{}{tail}", TOPICS[i % TOPICS.len()])
}

fn chat(text: &str) -> Prompt {
    Prompt::Chat(vec![ChatMessage {
        role: "user".into(),
        content: text.into(),
    }])
}

/// Greedy, exactly `max_tokens` tokens in every stage.
fn fixed_length(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

/// Starts a pipeline from a config under a spinner.
fn start(config: PipelineConfig, label: String) -> anyhow::Result<OmniLLM> {
    let args = OmniEngineArgs::new(&config.name);
    progress::with_spinner(
        format!("starting {label}"),
        |_: &OmniLLM| format!("{label} ready"),
        || OmniLLM::from_config(config, &args),
    )
    .with_context(|| format!("starting {label}"))
}

/// One batch through the pipeline: wall seconds and generated tokens.
fn run_batch(omni: &OmniLLM, n: usize, max_tokens: usize) -> anyhow::Result<(f64, usize)> {
    let (wall, outputs) = run_batch_outputs(omni, n, max_tokens)?;
    Ok((wall, outputs.iter().map(|o| o.token_ids.len()).sum()))
}

/// One batch through the pipeline: wall seconds and the final outputs.
fn run_batch_outputs(
    omni: &OmniLLM,
    n: usize,
    max_tokens: usize,
) -> anyhow::Result<(f64, Vec<omni_core::OmniRequestOutput>)> {
    let prompts: Vec<Prompt> = (0..n).map(|i| chat(&bench_prompt(i))).collect();
    let start = std::time::Instant::now();
    let outputs = omni
        .generate(prompts, fixed_length(max_tokens))
        .context("generating")?;
    Ok((start.elapsed().as_secs_f64(), outputs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_64_bench_prompts_are_distinct() {
        let all: std::collections::HashSet<String> = (0..64).map(bench_prompt).collect();
        assert_eq!(all.len(), 64);
        assert_eq!(
            bench_prompt(0),
            "Tell me one interesting fact about the ocean."
        );
        assert_eq!(bench_prompt(63), "Describe gardens to a curious child.");
    }
}
