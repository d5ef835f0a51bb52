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
//!   boundaries and simply concatenated.
//!
//! A chunk is ready once the codes cover its window (`(i + 1) chunk +
//! future` frames) or the codes are complete, so the pieces depend only on
//! the codes, never on when they arrived.
use tch::{Device, Kind, Tensor};

use super::{DitInput, SampleOptions, Token2Wav};
use crate::error::{Error, Result};

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
}

impl ChunkPlan {
    fn new(block: i64, repeats: i64) -> Self {
        // Whole codes: every window edge falls between two codes.
        let block = block.max(1);
        let r = repeats.max(1);
        let whole = |frames: i64| (frames + r - 1) / r * r;
        ChunkPlan {
            chunk: whole(2 * block),
            past: whole(2 * block),
            future: whole(block),
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
        let jobs: Vec<Option<ChunkJob>> = streams.iter().map(|s| self.plan_chunk(s)).collect();
        // The kept mel of each job, `[mel_dim, frames]`.
        let mut mels: Vec<Option<Tensor>> = (0..streams.len()).map(|_| None).collect();
        let mut lengths: Vec<i64> = jobs
            .iter()
            .flatten()
            .filter(|j| j.keep_end > j.keep_start)
            .map(|j| j.window_end - j.start)
            .collect();
        lengths.sort_unstable();
        lengths.dedup();
        for len in lengths {
            let members: Vec<usize> = (0..streams.len())
                .filter(|&k| {
                    jobs[k]
                        .as_ref()
                        .is_some_and(|j| j.keep_end > j.keep_start && j.window_end - j.start == len)
                })
                .collect();
            let mut inputs = Vec::with_capacity(members.len());
            let mut held = Vec::with_capacity(members.len());
            for &k in &members {
                let (s, j) = (
                    &mut *streams[k],
                    jobs[k].as_ref().expect("a member has a job"),
                );
                let voice = self.speakers.get(s.speaker.as_deref())?;
                let repeats = self.dit.repeats();
                let codes = Tensor::from_slice(
                    &s.codes[(j.start / repeats) as usize..(j.window_end / repeats) as usize],
                );
                let noise = s.noise.frames(j.start, j.window_end);
                held.push((codes, voice, noise));
            }
            for (codes, voice, noise) in &held {
                inputs.push(DitInput {
                    codes,
                    cond: &voice.cond,
                    ref_mel: &voice.ref_mel,
                    noise,
                });
            }
            let mel = self.dit.sample_batch(&inputs, SampleOptions::default())?;
            for (row, &k) in members.iter().enumerate() {
                let j = jobs[k].as_ref().expect("a member has a job");
                mels[k] = Some(
                    mel.get(row as i64)
                        .narrow(1, j.keep_start - j.start, j.keep_end - j.keep_start)
                        .to_device(Device::Cpu),
                );
            }
        }
        let mut pieces = Vec::with_capacity(streams.len());
        for (k, s) in streams.iter_mut().enumerate() {
            pieces.push(
                jobs[k]
                    .as_ref()
                    .map(|j| self.finish_chunk(s, j, mels[k].take())),
            );
        }
        Ok(pieces)
    }

    /// The window of a stream's next chunk, if one is ready.
    fn plan_chunk(&self, s: &CodeStream) -> Option<ChunkJob> {
        if !self.piece_ready(s) {
            return None;
        }
        let plan = self.chunk_plan();
        let total = s.codes.len() as i64 * self.dit.repeats();
        let keep_end = if s.complete && s.mel_done + plan.chunk + plan.future >= total {
            // The last chunk keeps everything to the end.
            total
        } else {
            s.mel_done + plan.chunk
        };
        Some(ChunkJob {
            start: (s.mel_done - plan.past).max(0),
            window_end: (s.mel_done + plan.chunk + plan.future).min(total),
            keep_start: s.mel_done,
            keep_end,
            total,
        })
    }

    /// Takes a chunk's kept mel (none for an empty last chunk) and returns
    /// the samples that are final now.
    fn finish_chunk(&self, s: &mut CodeStream, j: &ChunkJob, kept: Option<Tensor>) -> Tensor {
        if let Some(kept) = kept {
            s.mel = Tensor::cat(&[&s.mel, &kept], 1);
            s.mel_done = j.keep_end;
        }
        let end_of_speech = s.mel_done == j.total && s.complete;
        // Samples of frames up to `upto` are final once the vocoder has
        // seen VOCODER_CONTEXT frames past them.
        let upto = if end_of_speech {
            s.mel_done
        } else {
            s.mel_done - VOCODER_CONTEXT
        };
        let piece = if upto > s.audio_done {
            let from = (s.audio_done - VOCODER_CONTEXT).max(0);
            let mel = s.mel.narrow(1, from - s.mel_from, s.mel_done - from);
            let wav = self
                .bigvgan
                .forward(&mel.to_device(self.device))
                .to_device(Device::Cpu);
            let hop = self.bigvgan.hop();
            let piece = wav.narrow(0, (s.audio_done - from) * hop, (upto - s.audio_done) * hop);
            s.audio_done = upto;
            // Keep only the context the next piece needs.
            let keep_from = (s.audio_done - VOCODER_CONTEXT).max(0);
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
