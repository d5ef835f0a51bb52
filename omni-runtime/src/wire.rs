//! The versioned wire protocol between the orchestrator and stage workers,
//! and between stages.
//!
//! A message is one ZeroMQ multipart message: frame 0 is a JSON header, the
//! following frames are the raw little-endian bytes of the tensors that ride
//! inline, in header order.
//!
//! ```text
//! {"v": 1, "type": "stage_input", "body": {...},
//!  "tensors": [{"name": "hidden_states", "dtype": "f32", "shape": [12, 576],
//!               "nbytes": 27648, "shm": null}]}
//! ```
//!
//! A tensor with `"shm": {"name": ..., "len": ...}` has no frame: its bytes
//! are in a shared-memory segment (see [`crate::shm`]). The decoder trusts
//! nothing: every size is capped and checked against the frames actually
//! received before anything is allocated or mapped, and every failure is an
//! [`Error::Wire`] naming what was wrong, never a panic.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde_json::Value;

use omni_engine::{
    FinishReason, Prompt, PromptLogprobs, SamplingParams, StopReason, TokenLogprobs,
};

use crate::error::{Error, Result};
use crate::shm::{self, ShmHandle, ShmWriter};
use crate::tensor::{byte_len, DType, HostTensor};

/// The protocol version this build speaks; a message with another version
/// is rejected.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every message type, as spelled in the header's `type`.
pub const MESSAGE_TYPES: &[&str] = &[
    "generate",
    "stage_input",
    "abort",
    "start_profile",
    "stop_profile",
    "health",
    "shutdown",
    "ready",
    "output",
    "request_error",
    "ack",
    "health_reply",
    "protocol_error",
];

/// Caps on what a peer may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest JSON header, in bytes.
    pub max_header_bytes: usize,
    /// Most tensors in one message.
    pub max_tensors: usize,
    /// Largest rank of a tensor.
    pub max_rank: usize,
    /// Largest tensor, in bytes.
    pub max_tensor_bytes: usize,
    /// Largest sum of all tensors of one message, in bytes.
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 4 << 20,
            max_tensors: 64,
            max_rank: 8,
            max_tensor_bytes: 4 << 30,
            max_message_bytes: 8 << 30,
        }
    }
}

impl Limits {
    /// The most bytes one multipart message may carry on a socket: the
    /// header, every tensor in frames, and room for routing frames. Sockets
    /// refuse a longer message before buffering it (see
    /// the runtime's socket options), so a peer cannot make a
    /// process reserve memory by announcing a huge frame.
    pub fn max_socket_message_bytes(&self) -> usize {
        self.max_header_bytes
            .saturating_add(self.max_message_bytes)
            .saturating_add(64 << 10)
    }
}

/// Why a request finished, with the engine's spelling.
pub type WireFinishReason = FinishReason;

/// Timing and token counts of one request in one stage, measured by the
/// stage worker. Times are microseconds since the UNIX epoch, so that stages
/// in different processes share one clock.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageMetrics {
    /// When the stage received the request (or its input from upstream).
    pub arrival_unix_us: u64,
    /// When the engine admitted it (after the input processor).
    pub admitted_unix_us: u64,
    /// When the first output token came out.
    pub first_token_unix_us: Option<u64>,
    /// When it finished.
    pub finished_unix_us: Option<u64>,
    /// Prompt length in tokens (as the stage's engine saw it).
    pub num_prompt_tokens: usize,
    /// Tokens generated.
    pub num_generated_tokens: usize,
    /// Engine queue time: admitted until first scheduled, microseconds.
    pub queue_us: Option<u64>,
    /// Engine compute time: first scheduled until finished, microseconds.
    pub compute_us: Option<u64>,
    /// Time to first token inside the engine, microseconds.
    pub ttft_us: Option<u64>,
    /// How often the engine preempted the request.
    pub num_preemptions: usize,
    /// Prompt tokens whose K/V the engine's prefix cache held.
    #[serde(default)]
    pub num_cached_tokens: usize,
}

/// Start a request on an entry stage.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GenerateMsg {
    /// Unique within the pipeline while in flight.
    pub request_id: String,
    /// The user's prompt.
    pub prompt: Prompt,
    /// One per stage, indexed by stage id; travels along to every stage.
    pub sampling_params: Vec<SamplingParams>,
}

/// What an upstream stage produced for one request.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct UpstreamOutput {
    /// The upstream stage.
    pub stage_id: usize,
    /// Its generated text.
    pub text: String,
    /// Its generated token ids.
    pub token_ids: Vec<u32>,
    /// Why it stopped.
    pub finish_reason: Option<FinishReason>,
}

/// One upstream stage's output, sent directly to a downstream stage.
/// Tensors (e.g. `hidden_states`) ride in the envelope.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StageInputMsg {
    /// The request.
    pub request_id: String,
    /// The user's original prompt.
    pub prompt: Prompt,
    /// One per stage, indexed by stage id.
    pub sampling_params: Vec<SamplingParams>,
    /// What the upstream stage produced: all of it, or on a streamed edge
    /// what it produced since the previous piece (its new token ids, text
    /// and state rows).
    pub output: UpstreamOutput,
    /// Which piece this is, on a streamed edge (`runtime.edges`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub piece: Option<StreamPiece>,
}

/// A piece of a streamed stage input. Pieces after the first carry no
/// prompt (an empty token-id list) and no sampling params: the receiver
/// keeps the first piece's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamPiece {
    /// 0, 1, 2, ... per request and edge: a piece out of order is a
    /// protocol error.
    pub index: u64,
    /// The upstream stage has finished the request: nothing follows.
    pub last: bool,
}

/// Start profiling in a stage.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StartProfileMsg {
    /// Correlates the ack.
    pub seq: u64,
    /// The stage's trace directory.
    pub dir: PathBuf,
    /// Process name shown in the trace.
    pub process_name: String,
    /// The profiler options (`omni_profiler::ProfileOptions` as JSON).
    pub options: Value,
    /// The stage's clock against the orchestrator's, as the orchestrator
    /// estimated it: recorded in the trace, so that the tools line the
    /// stages up across hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset: Option<omni_profiler::ClockOffset>,
}

/// A stage is up: its engine is loaded and its sockets are connected.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReadyMsg {
    /// The stage.
    pub stage_id: usize,
    /// The engine's model name.
    pub model_name: String,
    /// The worker's process id.
    pub pid: u32,
    /// The engine's device, e.g. `cpu`, `cuda:0`.
    pub device: String,
    /// The worker's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The engine's context length in tokens.
    pub max_model_len: usize,
}

/// A step's worth of one request's output from a final-output stage.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct OutputMsg {
    /// The request.
    pub request_id: String,
    /// The stage.
    pub stage_id: usize,
    /// Text added since the previous message.
    pub delta_text: String,
    /// Token ids added since the previous message.
    pub delta_token_ids: Vec<u32>,
    /// Whether this is the stage's last output for the request.
    pub finished: bool,
    /// Why it finished.
    pub finish_reason: Option<FinishReason>,
    /// The stop string or stop token id that ended it, if one did.
    #[serde(default)]
    pub stop_reason: Option<StopReason>,
    /// Log-probabilities of `delta_token_ids`, when the request asked.
    #[serde(default)]
    pub delta_logprobs: Option<Vec<TokenLogprobs>>,
    /// Prompt log-probabilities, on the stage's first output, when the
    /// request asked.
    #[serde(default)]
    pub prompt_logprobs: Option<PromptLogprobs>,
    /// Set on the last output.
    pub metrics: Option<StageMetrics>,
}

/// Answer to a control command (`start_profile`, `stop_profile`, `shutdown`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct AckMsg {
    /// The command's seq.
    pub seq: u64,
    /// The stage.
    pub stage_id: usize,
    /// Set when the command failed.
    pub error: Option<String>,
    /// Files written (trace files, for `stop_profile`).
    pub files: Vec<PathBuf>,
}

/// Answer to `health`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HealthMsg {
    /// The command's seq.
    pub seq: u64,
    /// The stage.
    pub stage_id: usize,
    /// The worker's pid.
    pub pid: u32,
    /// Requests inside the engine or waiting for upstream inputs.
    pub running_requests: usize,
    /// Requests the engine itself still holds (queued, running or finishing).
    #[serde(default)]
    pub engine_requests: usize,
    /// Tokens sampled by the stage's engine since it started.
    #[serde(default)]
    pub generated_tokens: u64,
    /// Aborts that found their request still in the stage.
    #[serde(default)]
    pub aborted_requests: u64,
    /// Malformed messages rejected since start.
    pub rejected_messages: u64,
    /// Whether a profiler window is open.
    pub profiling: bool,
    /// How long the stage's model thread has been on its current round
    /// (commands, one engine step, sending outputs); 0 while it waits for
    /// work. The socket thread answers health even when the model thread is
    /// stuck: this says whether it is.
    #[serde(default)]
    pub model_busy_ms: u64,
    /// Prompt tokens the engine looked up in its prefix cache since start.
    #[serde(default)]
    pub prefix_cache_queried_tokens: u64,
    /// Of those, tokens whose K/V the cache held.
    #[serde(default)]
    pub prefix_cache_hit_tokens: u64,
    /// The stage's trace clock when it answered (µs since the UNIX epoch,
    /// `omni_profiler::now_unix_us`): the orchestrator estimates the offset
    /// between its clock and the stage's from it. 0: not reported.
    #[serde(default)]
    pub clock_us: f64,
}

/// Every message of the protocol. New variants may come in later versions.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", content = "body", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Message {
    /// Orchestrator -> entry stage: start a request.
    Generate(GenerateMsg),
    /// Stage -> downstream stage: an upstream output.
    StageInput(StageInputMsg),
    /// Orchestrator -> every stage: drop these requests.
    Abort {
        /// The requests.
        request_ids: Vec<String>,
    },
    /// Orchestrator -> stage: open a profiler window.
    StartProfile(StartProfileMsg),
    /// Orchestrator -> stage: close the profiler window, write the trace.
    StopProfile {
        /// Correlates the ack.
        seq: u64,
    },
    /// Anyone -> stage: are you alive?
    Health {
        /// Correlates the reply.
        seq: u64,
    },
    /// Orchestrator -> stage: exit cleanly.
    Shutdown,
    /// Stage -> orchestrator: up and serving.
    Ready(ReadyMsg),
    /// Final-output stage -> orchestrator: streamed output.
    Output(OutputMsg),
    /// Stage -> orchestrator: a request failed in this stage.
    RequestError {
        /// The request.
        request_id: String,
        /// The stage.
        stage_id: usize,
        /// What went wrong.
        message: String,
        /// True when the stage refused the request itself (bad prompt or
        /// params, prompt too long): the caller's fault, not the stage's.
        #[serde(default)]
        rejected: bool,
    },
    /// Stage -> orchestrator: a control command is done.
    Ack(AckMsg),
    /// Stage -> asker: health.
    HealthReply(HealthMsg),
    /// Stage -> sender of a message it could not decode.
    ProtocolError {
        /// The stage that rejected it.
        stage_id: usize,
        /// The rejected message's seq, when it could be read.
        seq: Option<u64>,
        /// What was wrong.
        reason: String,
    },
}

impl Message {
    /// The header's `type` of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Generate(_) => "generate",
            Message::StageInput(_) => "stage_input",
            Message::Abort { .. } => "abort",
            Message::StartProfile(_) => "start_profile",
            Message::StopProfile { .. } => "stop_profile",
            Message::Health { .. } => "health",
            Message::Shutdown => "shutdown",
            Message::Ready(_) => "ready",
            Message::Output(_) => "output",
            Message::RequestError { .. } => "request_error",
            Message::Ack(_) => "ack",
            Message::HealthReply(_) => "health_reply",
            Message::ProtocolError { .. } => "protocol_error",
        }
    }
}

/// A message with its tensors.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The message.
    pub message: Message,
    /// Named tensors (`hidden_states`, `audio`, ...), in header order.
    pub tensors: Vec<(String, HostTensor)>,
}

impl Envelope {
    /// A message without tensors.
    pub fn new(message: Message) -> Self {
        Envelope {
            message,
            tensors: Vec::new(),
        }
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorMeta {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    nbytes: usize,
    #[serde(default)]
    shm: Option<ShmHandle>,
}

/// Turns an envelope into frames. Tensors that `shm` wants go through
/// shared memory; the rest ride inline (zero-copy: the frames share the
/// tensors' buffers).
pub fn encode(envelope: &Envelope, shm: Option<&ShmWriter>) -> Result<Vec<Bytes>> {
    let mut header = match serde_json::to_value(&envelope.message) {
        Ok(Value::Object(m)) => m,
        Ok(other) => {
            return Err(Error::Wire(format!(
                "message encodes to a non-object {other}"
            )))
        }
        Err(e) => {
            return Err(Error::Wire(format!(
                "cannot encode {}: {e}",
                envelope.message.type_name()
            )))
        }
    };
    header.insert("v".into(), PROTOCOL_VERSION.into());
    let mut frames = vec![Bytes::new()];
    let mut metas = Vec::with_capacity(envelope.tensors.len());
    for (name, t) in &envelope.tensors {
        let handle = match shm {
            // A full /dev/shm (Docker gives 64 MiB) is no reason to fail:
            // the tensor travels in the frames instead.
            Some(w) if w.wants(t.data.len()) => match w.write(&t.data) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(target: "omni::runtime", tensor = %name, "shared memory refused {} bytes, sending them inline: {e}", t.data.len());
                    None
                }
            },
            _ => {
                frames.push(t.data.clone());
                None
            }
        };
        metas.push(TensorMeta {
            name: name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            nbytes: t.data.len(),
            shm: handle,
        });
    }
    header.insert(
        "tensors".into(),
        serde_json::to_value(&metas)
            .map_err(|e| Error::Wire(format!("cannot encode tensor metadata: {e}")))?,
    );
    frames[0] = Bytes::from(
        serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Wire(e.to_string()))?,
    );
    Ok(frames)
}

/// Where the decoder may find shared-memory segments, and its caps.
#[derive(Debug, Clone, Default)]
pub struct DecodeContext {
    /// The shared-memory directory; `None` rejects shared-memory tensors.
    pub shm_dir: Option<PathBuf>,
    /// Caps on declared sizes.
    pub limits: Limits,
    /// Shared-memory slots this receiver has mapped (shared by clones).
    pub slots: shm::SlotMaps,
}

/// What the decoder could read of a message it rejects (for the error reply).
#[derive(Debug, Clone, Default)]
pub struct Rejected {
    /// The message's `seq`, when its header had one.
    pub seq: Option<u64>,
    /// The message's `request_id`, when its header had one.
    pub request_id: Option<String>,
    /// What was wrong.
    pub error: String,
}

/// Decodes frames into an envelope, or says why not.
pub fn decode(frames: Vec<Bytes>, ctx: &DecodeContext) -> std::result::Result<Envelope, Rejected> {
    let mut rejected = Rejected::default();
    match decode_inner(frames, ctx, &mut rejected) {
        Ok(e) => Ok(e),
        Err(e) => {
            rejected.error = match e {
                Error::Wire(s) => s,
                other => other.to_string(),
            };
            Err(rejected)
        }
    }
}

fn wire<T>(msg: String) -> Result<T> {
    Err(Error::Wire(msg))
}

fn decode_inner(
    frames: Vec<Bytes>,
    ctx: &DecodeContext,
    rejected: &mut Rejected,
) -> Result<Envelope> {
    let limits = &ctx.limits;
    let Some(head) = frames.first() else {
        return wire("empty message (no header frame)".into());
    };
    if head.len() > limits.max_header_bytes {
        return wire(format!(
            "header frame of {} bytes exceeds the limit of {} bytes",
            head.len(),
            limits.max_header_bytes
        ));
    }
    let header: Value = match serde_json::from_slice(head) {
        Ok(v) => v,
        Err(e) => return wire(format!("header frame is not JSON: {e}")),
    };
    let Value::Object(mut header) = header else {
        return wire(format!(
            "header must be a JSON object, got {}",
            short(&header)
        ));
    };
    // Grab correlation fields first so that even a rejection can be matched.
    if let Some(body) = header.get("body").and_then(Value::as_object) {
        rejected.seq = body.get("seq").and_then(Value::as_u64);
        rejected.request_id = body
            .get("request_id")
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    match header.remove("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(PROTOCOL_VERSION as u64) => {}
        Some(other) => {
            return wire(format!(
                "unsupported protocol version {} (this build speaks {PROTOCOL_VERSION})",
                short(&other)
            ))
        }
        None => {
            return wire(format!(
                "header has no protocol version `v` (this build speaks {PROTOCOL_VERSION})"
            ))
        }
    }
    let type_name = match header.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return wire(format!(
                "header field `type` must be a string, got {}",
                short(other)
            ))
        }
        None => return wire("header has no message `type`".into()),
    };
    if !MESSAGE_TYPES.contains(&type_name.as_str()) {
        return wire(format!(
            "unknown message type {type_name:?} (known: {})",
            MESSAGE_TYPES.join(", ")
        ));
    }
    let metas_value = header.remove("tensors").unwrap_or(Value::Array(Vec::new()));
    let metas_len = metas_value.as_array().map(Vec::len).unwrap_or(0);
    if metas_len > limits.max_tensors {
        return wire(format!(
            "{metas_len} tensors exceed the limit of {}",
            limits.max_tensors
        ));
    }
    let metas: Vec<TensorMeta> = match serde_path_to_error::deserialize(&metas_value) {
        Ok(m) => m,
        Err(e) => {
            return wire(format!(
                "bad tensor metadata at tensors{}: {}",
                path_suffix(e.path()),
                e.inner()
            ))
        }
    };
    let mut names = BTreeSet::new();
    let mut total: usize = 0;
    let mut inline = 0usize;
    for (i, m) in metas.iter().enumerate() {
        if !names.insert(m.name.as_str()) {
            return wire(format!("tensor name {:?} appears twice", m.name));
        }
        if m.shape.len() > limits.max_rank {
            return wire(format!(
                "tensor {:?} has rank {} above the limit of {}",
                m.name,
                m.shape.len(),
                limits.max_rank
            ));
        }
        let need = byte_len(m.dtype, &m.shape)?;
        if need != m.nbytes {
            return wire(format!(
                "tensor {:?} declares {} bytes but dtype {:?} and shape {:?} need {need}",
                m.name, m.nbytes, m.dtype, m.shape
            ));
        }
        if m.nbytes > limits.max_tensor_bytes {
            return wire(format!(
                "tensor {:?} of {} bytes exceeds the limit of {}",
                m.name, m.nbytes, limits.max_tensor_bytes
            ));
        }
        total = total.saturating_add(m.nbytes);
        if total > limits.max_message_bytes {
            return wire(format!(
                "tensors total more than the limit of {} bytes",
                limits.max_message_bytes
            ));
        }
        match &m.shm {
            None => {
                inline += 1;
                let Some(frame) = frames.get(inline) else {
                    return wire(format!(
                        "tensor {i} ({:?}) has no frame ({} frames after the header)",
                        m.name,
                        frames.len() - 1
                    ));
                };
                if frame.len() != m.nbytes {
                    return wire(format!(
                        "tensor {:?} declares {} bytes but its frame has {}",
                        m.name,
                        m.nbytes,
                        frame.len()
                    ));
                }
            }
            Some(h) => {
                if h.len != m.nbytes {
                    return wire(format!(
                        "tensor {:?} declares {} bytes but its segment handle says {}",
                        m.name, m.nbytes, h.len
                    ));
                }
                if ctx.shm_dir.is_none() {
                    return wire(format!(
                        "tensor {:?} is in shared memory, but this socket takes no shared memory",
                        m.name
                    ));
                }
            }
        }
    }
    if frames.len() != inline + 1 {
        return wire(format!(
            "{} frames after the header for {inline} inline tensors",
            frames.len() - 1
        ));
    }
    // The body last but before mapping segments, so a bad body does not
    // consume (unlink) the segments it points to.
    let header = Value::Object(header);
    let message: Message = match serde_json::from_value::<Message>(header.clone()) {
        Ok(m) => m,
        Err(e) => {
            let field = culprit(&header, &e.to_string());
            return wire(match field {
                Some(f) => format!("bad body of {type_name:?} message, field `{f}`: {e}"),
                None => format!("bad body of {type_name:?} message: {e}"),
            });
        }
    };
    let mut tensors = Vec::with_capacity(metas.len());
    let mut frame_iter = frames.into_iter().skip(1);
    for m in metas {
        let data = match &m.shm {
            None => frame_iter.next().unwrap_or_default(),
            Some(h) => shm::take(
                ctx.shm_dir.as_deref().unwrap_or(Path::new("/nonexistent")),
                h,
                &ctx.slots,
            )?,
        };
        tensors.push((m.name, HostTensor::new(m.dtype, m.shape, data)?));
    }
    Ok(Envelope { message, tensors })
}

/// The body field an error is about. Serde loses the path inside a tagged
/// enum, so each field is left out in turn: the one whose absence changes
/// the error is the one at fault.
fn culprit(header: &Value, error: &str) -> Option<String> {
    let body = header.get("body")?.as_object()?;
    body.keys().find_map(|k| {
        let mut h = header.clone();
        h.get_mut("body")?.as_object_mut()?.remove(k);
        match serde_json::from_value::<Message>(h) {
            Err(e) if e.to_string() == error => None,
            _ => Some(k.clone()),
        }
    })
}

fn path_suffix(p: &serde_path_to_error::Path) -> String {
    let s = p.to_string();
    if s == "." {
        String::new()
    } else if s.starts_with('[') {
        s
    } else {
        format!(".{s}")
    }
}

fn short(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 80 {
        let mut cut = 77;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Name of the tensor that carries audio clip `i` of a prompt's media.
fn audio_tensor_name(i: usize) -> String {
    format!("media.audio.{i}")
}

/// Name of the tensor that carries image `i` of a prompt's media.
fn image_tensor_name(i: usize) -> String {
    format!("media.image.{i}")
}

/// Name of the tensor that carries frame `j` of video `i`.
fn frame_tensor_name(i: usize, j: usize) -> String {
    format!("media.video.{i}.{j}")
}

/// Every image and video frame of `data`, with the name of the tensor that
/// carries its pixels on the wire.
fn pictures(
    data: &mut omni_engine::MultiModalData,
) -> impl Iterator<Item = (String, &mut omni_engine::ImageInput)> {
    let images = data
        .image
        .iter_mut()
        .enumerate()
        .map(|(i, image)| (image_tensor_name(i), image));
    let frames = data.video.iter_mut().enumerate().flat_map(|(i, v)| {
        v.frames
            .iter_mut()
            .enumerate()
            .map(move |(j, f)| (frame_tensor_name(i, j), f))
    });
    images.chain(frames)
}

/// Moves the samples of `prompt`'s media into tensors, so that they travel
/// as raw frames and the JSON header keeps only their sample rates.
pub fn detach_media(prompt: &mut Prompt) -> Result<Vec<(String, HostTensor)>> {
    let Prompt::MultiModal(m) = prompt else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(m.multi_modal_data.audio.len());
    for (i, clip) in m.multi_modal_data.audio.iter_mut().enumerate() {
        let samples = std::mem::take(&mut clip.samples);
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        out.push((
            audio_tensor_name(i),
            HostTensor::new(DType::F32, vec![samples.len()], Bytes::from(bytes))?,
        ));
    }
    for (name, image) in pictures(&mut m.multi_modal_data) {
        let rgb = std::mem::take(&mut image.rgb);
        out.push((
            name,
            HostTensor::new(DType::U8, vec![rgb.len()], Bytes::from(rgb))?,
        ));
    }
    Ok(out)
}

/// Puts back what [`detach_media`] took out; a tensor that is missing or
/// not a 1-D f32 list of samples is an error naming it.
pub fn attach_media(prompt: &mut Prompt, tensors: &[(String, HostTensor)]) -> Result<()> {
    let Prompt::MultiModal(m) = prompt else {
        return Ok(());
    };
    let by_name: std::collections::HashMap<&str, &HostTensor> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let find = |name: &str| -> Result<&HostTensor> {
        by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::Wire(format!("generate: tensor {name} is missing")))
    };
    for (i, clip) in m.multi_modal_data.audio.iter_mut().enumerate() {
        let name = audio_tensor_name(i);
        let t = find(&name)?;
        if t.dtype != DType::F32 || t.shape.len() != 1 || !clip.samples.is_empty() {
            return Err(Error::Wire(format!(
                "generate: tensor {name} must be 1-D f32 samples (got {:?} {:?}), and the \
                 header's samples empty",
                t.dtype, t.shape
            )));
        }
        clip.samples = t
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
    }
    for (name, image) in pictures(&mut m.multi_modal_data) {
        let t = find(&name)?;
        let want = omni_engine::ImageInput::byte_len(image.width, image.height);
        if t.dtype != DType::U8
            || Some(t.shape.as_slice()) != want.as_ref().map(std::slice::from_ref)
            || !image.rgb.is_empty()
        {
            return Err(Error::Wire(format!(
                "generate: tensor {name} must be {} u8 RGB bytes for a {} x {} image \
                 (got {:?} {:?}), and the header's rgb empty",
                want.map_or_else(|| "too many".to_owned(), |n| n.to_string()),
                image.width,
                image.height,
                t.dtype,
                t.shape
            )));
        }
        image.rgb = t.data.to_vec();
    }
    Ok(())
}

/// Shorthand: encode a tensor-less message.
pub fn encode_message(message: Message) -> Result<Vec<Bytes>> {
    encode(&Envelope::new(message), None)
}

#[cfg(test)]
mod tests {
    use omni_engine::{AudioInput, MultiModalData};

    use super::*;

    fn with_clip(samples: Vec<f32>) -> Prompt {
        Prompt::with_media(
            Prompt::Text("<|AUDIO|> what is said?".into()),
            MultiModalData {
                audio: vec![AudioInput::new(samples, 16_000)],
                ..MultiModalData::default()
            },
        )
    }

    #[test]
    fn media_samples_travel_as_frames_and_come_back() -> Result<()> {
        let samples = vec![0.25f32, -1.0, 0.5, f32::MIN_POSITIVE];
        let mut prompt = with_clip(samples.clone());
        let tensors = detach_media(&mut prompt)?;
        let header = serde_json::to_string(&prompt).map_err(|e| Error::Wire(e.to_string()))?;
        assert!(header.contains("\"samples\":[]"), "{header}");
        let message = Message::Generate(GenerateMsg {
            request_id: "r".into(),
            prompt,
            sampling_params: Vec::new(),
        });
        let frames = encode(&Envelope { message, tensors }, None)?;
        let env = decode(frames, &DecodeContext::default()).map_err(|r| Error::Wire(r.error))?;
        let Message::Generate(mut g) = env.message else {
            return Err(Error::Wire("not a generate".into()));
        };
        attach_media(&mut g.prompt, &env.tensors)?;
        assert_eq!(g.prompt, with_clip(samples));
        Ok(())
    }

    #[test]
    fn missing_or_wrong_media_tensors_are_named() {
        let mut prompt = with_clip(Vec::new());
        let e = attach_media(&mut prompt, &[]).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("media.audio.0 is missing")),
            "{e:?}"
        );
        let ints = HostTensor::new(DType::I32, vec![1], Bytes::from(vec![0u8; 4]));
        let e = ints
            .and_then(|t| attach_media(&mut prompt, &[("media.audio.0".into(), t)]))
            .err()
            .map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("1-D f32")), "{e:?}");
    }
}
