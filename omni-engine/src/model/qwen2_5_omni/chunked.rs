//! code2wav chunk by chunk, while the talker is still generating codes:
//! the scheme of Qwen's own streaming engine (the `Qwen2Code2wav` of its
//! vLLM fork, which vLLM-Omni ported), so the first audio comes after a
//! chunk of codes instead of after all of them.
//!
//! * **DiT.** Mel frames are made `chunk` frames at a time (2 attention
//!   blocks). Each chunk's ODE runs on a window of the codes with `past`
//!   frames of left context (2 blocks) and `future` frames of look-ahead (1
//!   block); the window starts on a block boundary, so its block attention
//!   lines up with the whole sequence's, and only the chunk's own frames
//!   are kept. The initial noise is the whole sequence's, sliced by
//!   absolute frame (see [`NoiseTape`]). It is not exact: over the 36
//!   velocity evaluations of the ODE a frame's receptive field grows past
//!   any window, so the chunks differ from the whole-sequence mel by a
//!   small, measured amount (the engine tests state it).
//! * **BigVGAN.** The vocoder runs on the mel made so far with
//!   [`VOCODER_CONTEXT`] frames of left context, and holds back the last
//!   [`VOCODER_CONTEXT`] frames (whose samples depend on mel not made yet)
//!   until the next chunk or the end; the pieces are cut on frame
//!   boundaries and simply concatenated. (With half a chunk of context on
//!   the tiny test model, whose chunks are 16 frames, its first chunk would
//!   speak, but the pieces drifted to 2.2% of the peak from the whole
//!   waveform, against 0.04% with 20 frames: the vocoder's receptive field
//!   is what sets the context, not the chunk.)
//!
//! A chunk is ready once the codes cover its window (`(i + 1) chunk +
//! future` frames) or the codes are complete, so the pieces depend only on
//! the codes, never on when they arrived.
use tch::{Device, Kind, Tensor};

use super::{DitInput, SampleOptions, Token2Wav};
use crate::error::{Error, Result};

/// Chunks of one stream that one step makes at most (when its codes ran
/// ahead of code2wav, or came whole).
pub const MAX_CHUNKS_PER_STEP: usize = 8;

/// Mel frames of vocoder context on each side of a piece (Qwen's
/// `future_size`: 200 ms at the released model's 100 frames a second).
pub const VOCODER_CONTEXT: i64 = 20;

/// The chunk sizes, in mel frames, from the DiT's attention block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlan {
    /// Frames a chunk keeps (2 blocks).
    pub chunk: i64,
    /// Left context of a chunk's window (2 blocks).
    pub past: i64,
    /// Look-ahead of a chunk's window (1 block).
    pub future: i64,
    /// Vocoder context on each side of a piece ([`VOCODER_CONTEXT`]).
    pub vocoder_context: i64,
}

impl ChunkPlan {
    fn new(block: i64, repeats: i64) -> Self {
        // Whole codes: every window edge falls between two codes.
        let block = block.max(1);
        let r = repeats.max(1);
        let whole = |frames: i64| (frames + r - 1) / r * r;
        let chunk = whole(2 * block);
        ChunkPlan {
            chunk,
            past: whole(2 * block),
            future: whole(block),
            vocoder_context: VOCODER_CONTEXT,
        }
    }
}

/// The whole sequence's initial noise, drawn as [`Token2Wav::synthesize`]
/// draws it, without knowing how long the sequence will be: a seeded
/// standard normal draw of `n` values is the first `n` of a longer draw
/// from the same seed when both are multiples of 16 (libtorch's CPU
/// `normal_` fills blocks of 16), which `[frames, mel_dim]` is for the
/// released 80 bins. The tape redraws twice as long when a chunk needs
/// more, so it costs at most twice the final draw.
#[derive(Debug)]
pub struct NoiseTape {
    seed: u64,
    mel_dim: i64,
    max_frames: i64,
    drawn: Tensor,
}

impl NoiseTape {
    fn new(seed: u64, mel_dim: i64, max_frames: i64) -> Self {
        NoiseTape {
            seed,
            mel_dim,
            max_frames,
            drawn: Tensor::zeros([1, 0, mel_dim], (Kind::Float, Device::Cpu)),
        }
    }

    /// Frames `start..end` of the noise, `[1, end - start, mel_dim]`.
    fn frames(&mut self, start: i64, end: i64) -> Tensor {
        let have = self.drawn.size()[1];
        if end > have {
            let want = (2 * have).max(end).min(self.max_frames.max(end));
            self.drawn = super::seeded_noise(self.seed, want, self.mel_dim);
        }
        self.drawn.narrow(1, start, end - start)
    }
}

/// One request's chunked synthesis: the codes so far and what has been
/// made of them.
#[derive(Debug)]
pub struct CodeStream {
    speaker: Option<String>,
    codes: Vec<i64>,
    /// No more codes come.
    complete: bool,
    /// A leading codec BOS may still come (nothing read yet).
    at_start: bool,
    noise: NoiseTape,
    /// Mel frames made (`chunks made × chunk`, or all at the end).
    mel_done: i64,
    /// Made mel frames from `mel_from` on, `[mel_dim, frames]`, kept for the
    /// vocoder's context.
    mel: Tensor,
    mel_from: i64,
    /// Mel frames whose samples were handed out.
    audio_done: i64,
    finished: bool,
}

impl CodeStream {
    /// Codes taken so far.
    pub fn num_codes(&self) -> usize {
        self.codes.len()
    }

    /// Whether every piece has been handed out.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

impl Token2Wav {
    /// The chunk sizes of [`Token2Wav::start_stream`].
    pub fn chunk_plan(&self) -> ChunkPlan {
        ChunkPlan::new(self.dit.block_size(), self.dit.repeats())
    }

    /// Starts a chunked synthesis in the voice `speaker` with the noise of
    /// seed `seed` (as [`Token2Wav::synthesize`]); codes come through
    /// [`Token2Wav::push_codes`].
    pub fn start_stream(&self, speaker: Option<&str>, seed: u64) -> Result<CodeStream> {
        self.speakers.get(speaker)?;
        Ok(CodeStream {
            speaker: speaker.map(str::to_owned),
            codes: Vec::new(),
            complete: false,
            at_start: true,
            noise: NoiseTape::new(seed, self.dit.mel_dim(), self.dit.max_frames()),
            mel_done: 0,
            mel: Tensor::zeros([self.dit.mel_dim(), 0], (Kind::Float, Device::Cpu)),
            mel_from: 0,
            audio_done: 0,
            finished: false,
        })
    }

    /// More of the talker's output (its ids as generated: a leading codec
    /// BOS is dropped, and a codec end or pad ends the codes, as in
    /// [`Token2Wav::codes_of_talker_output`]); `last`: nothing follows.
    pub fn push_codes(&self, s: &mut CodeStream, ids: &[i64], last: bool) -> Result<()> {
        let mut ids = ids;
        if s.at_start && !ids.is_empty() {
            ids = ids.strip_prefix(&[self.codec_bos]).unwrap_or(ids);
            s.at_start = false;
        }
        if !s.complete {
            let end = ids.iter().position(|c| self.codec_stops.contains(c));
            let limit = self.dit.num_codes();
            let take = &ids[..end.unwrap_or(ids.len())];
            if let Some(bad) = take.iter().find(|&&c| c < 0 || c >= limit) {
                return Err(Error::InvalidConfig {
                    field: "codec id".to_owned(),
                    value: bad.to_string(),
                    reason: format!("outside the codec vocabulary 0..{limit} of code2wav"),
                });
            }
            self.check_length(s.codes.len() + take.len())
                .map_err(|reason| Error::InvalidConfig {
                    field: "codes".to_owned(),
                    value: format!("{} codes", s.codes.len() + take.len()),
                    reason,
                })?;
            s.codes.extend_from_slice(take);
            s.complete = end.is_some();
        }
        s.complete |= last;
        Ok(())
    }

    /// Whether [`Token2Wav::next_piece`] has a chunk to make now.
    pub fn piece_ready(&self, s: &CodeStream) -> bool {
        if s.finished {
            return false;
        }
        let plan = self.chunk_plan();
        let frames = s.codes.len() as i64 * self.dit.repeats();
        s.complete || frames >= s.mel_done + plan.chunk + plan.future
    }

    /// Makes the next chunk, if it is ready, and returns its samples (`[n]`,
    /// f32, CPU; possibly empty while the vocoder holds the chunk back for
    /// its context). After the last piece the stream is finished.
    pub fn next_piece(&self, s: &mut CodeStream) -> Result<Option<Tensor>> {
        Ok(self.next_pieces(&mut [s])?.pop().flatten())
    }

    /// [`Token2Wav::next_piece`] for several streams at once: the DiT
    /// windows of one length (every middle chunk's) run as one batch. A
    /// stream's piece does not depend on what it was batched with, up to
    /// the float rounding of the larger matrix products.
    pub fn next_pieces(&self, streams: &mut [&mut CodeStream]) -> Result<Vec<Option<Tensor>>> {
        let jobs: Vec<Vec<ChunkJob>> = streams.iter().map(|s| self.plan_chunks(s)).collect();
        // The kept mel of each job, `[mel_dim, frames]`.
        let mut mels: Vec<Vec<Option<Tensor>>> = jobs
            .iter()
            .map(|js| js.iter().map(|_| None).collect())
            .collect();
        let work: Vec<(usize, usize)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(k, js)| {
                js.iter()
                    .enumerate()
                    .filter(|(_, j)| j.keep_end > j.keep_start)
                    .map(move |(n, _)| (k, n))
            })
            .collect();
        let len = |&(k, n): &(usize, usize)| jobs[k][n].window_end - jobs[k][n].start;
        let mut lengths: Vec<i64> = work.iter().map(len).collect();
        lengths.sort_unstable();
        lengths.dedup();
        let repeats = self.dit.repeats();
        for l in lengths {
            let members: Vec<(usize, usize)> =
                work.iter().copied().filter(|w| len(w) == l).collect();
            let mut held = Vec::with_capacity(members.len());
            for &(k, n) in &members {
                let (s, j) = (&mut *streams[k], &jobs[k][n]);
                let voice = self.speakers.get(s.speaker.as_deref())?;
                let codes = Tensor::from_slice(
                    &s.codes[(j.start / repeats) as usize..(j.window_end / repeats) as usize],
                );
                let noise = s.noise.frames(j.start, j.window_end);
                held.push((codes, voice, noise));
            }
            let inputs: Vec<DitInput<'_>> = held
                .iter()
                .map(|(codes, voice, noise)| DitInput {
                    codes,
                    cond: &voice.cond,
                    ref_mel: &voice.ref_mel,
                    noise,
                })
                .collect();
            let mel = self.dit.sample_batch(&inputs, SampleOptions::default())?;
            for (row, &(k, n)) in members.iter().enumerate() {
                let j = &jobs[k][n];
                mels[k][n] = Some(
                    mel.get(row as i64)
                        .narrow(1, j.keep_start - j.start, j.keep_end - j.keep_start)
                        .to_device(Device::Cpu),
                );
            }
        }
        // The vocoder runs chunk by chunk, in order: its pieces are the
        // same however many chunks a step made.
        let mut pieces = Vec::with_capacity(streams.len());
        for (k, s) in streams.iter_mut().enumerate() {
            if jobs[k].is_empty() {
                pieces.push(None);
                continue;
            }
            let made: Vec<Tensor> = jobs[k]
                .iter()
                .zip(mels[k].iter_mut())
                .map(|(j, mel)| self.finish_chunk(s, j, mel.take()))
                .collect();
            pieces.push(Some(Tensor::cat(&made, 0)));
        }
        Ok(pieces)
    }

    /// The windows of a stream's ready chunks, in order: up to
    /// [`MAX_CHUNKS_PER_STEP`] (before its first audio, only the chunks that
    /// audio needs), as far as its codes go. A chunk's DiT window depends on
    /// the codes alone, so chunks that are ready together run together.
    fn plan_chunks(&self, s: &CodeStream) -> Vec<ChunkJob> {
        let mut jobs = Vec::new();
        if s.finished {
            return jobs;
        }
        let plan = self.chunk_plan();
        let total = s.codes.len() as i64 * self.dit.repeats();
        let mut done = s.mel_done;
        // Until the first audio is out, no more chunks than it needs: the
        // first piece should not wait for a batch.
        let limit = if s.audio_done == 0 {
            let needed = (plan.vocoder_context + 1 - s.mel_done).max(1);
            ((needed + plan.chunk - 1) / plan.chunk) as usize
        } else {
            MAX_CHUNKS_PER_STEP
        };
        while jobs.len() < limit.min(MAX_CHUNKS_PER_STEP) {
            let reach = done + plan.chunk + plan.future;
            if !(s.complete || total >= reach) {
                break;
            }
            let last = s.complete && reach >= total;
            // The last chunk keeps everything to the end.
            let keep_end = if last { total } else { done + plan.chunk };
            jobs.push(ChunkJob {
                start: (done - plan.past).max(0),
                window_end: reach.min(total),
                keep_start: done,
                keep_end,
                total,
            });
            if last {
                break;
            }
            done = keep_end;
        }
        jobs
    }

    /// Takes a chunk's kept mel (none for an empty last chunk) and returns
    /// the samples that are final now.
    fn finish_chunk(&self, s: &mut CodeStream, j: &ChunkJob, kept: Option<Tensor>) -> Tensor {
        let context = self.chunk_plan().vocoder_context;
        if let Some(kept) = kept {
            s.mel = Tensor::cat(&[&s.mel, &kept], 1);
            s.mel_done = j.keep_end;
        }
        let end_of_speech = s.mel_done == j.total && s.complete;
        // Samples of frames up to `upto` are final once the vocoder has
        // seen `context` frames past them.
        let upto = if end_of_speech {
            s.mel_done
        } else {
            s.mel_done - context
        };
        let piece = if upto > s.audio_done {
            let from = (s.audio_done - context).max(0);
            let mel = s.mel.narrow(1, from - s.mel_from, s.mel_done - from);
            let wav = self
                .bigvgan
                .forward(&mel.to_device(self.device))
                .to_device(Device::Cpu);
            let hop = self.bigvgan.hop();
            let piece = wav.narrow(0, (s.audio_done - from) * hop, (upto - s.audio_done) * hop);
            s.audio_done = upto;
            // Keep only the context the next piece needs.
            let keep_from = (s.audio_done - context).max(0);
            if keep_from > s.mel_from {
                s.mel = s
                    .mel
                    .narrow(1, keep_from - s.mel_from, s.mel_done - keep_from)
                    .copy();
                s.mel_from = keep_from;
            }
            piece
        } else {
            Tensor::zeros([0], (Kind::Float, Device::Cpu))
        };
        s.finished = end_of_speech;
        piece
    }
}

/// The frames of one chunk: its DiT window and the part of it kept.
#[derive(Debug, Clone, Copy)]
struct ChunkJob {
    start: i64,
    window_end: i64,
    keep_start: i64,
    keep_end: i64,
    /// Frames of all the codes so far.
    total: i64,
}
