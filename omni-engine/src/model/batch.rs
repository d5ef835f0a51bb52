//! The per-step index tensors a forward pass needs, built once per step and
//! shared by every layer.
//!
//! Tokens of all sequences are flattened into one `[tokens]` axis, single-token
//! entries (decodes) first, so the linear layers see one matrix. Attention then
//! runs in groups: all single-token entries together, and each multi-token
//! entry (a prefill or a prefill chunk) on its own, which needs no padding at
//! all. The decode group reads the cache one of two ways ([`DecodeKeys`]):
//! on the CPU a kernel reads it in place through the block tables; elsewhere
//! one batched `scaled_dot_product_attention` runs over gathered, padded
//! contexts (padding points at the zeroed block 0 and is masked).
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// One sequence's part of a forward pass.
#[derive(Debug, Clone, Copy)]
pub struct BatchEntry<'a> {
    /// Tokens to process now; their K/V are written to the cache.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`: how many tokens of this sequence are cached.
    pub start_pos: usize,
    /// The sequence's KV blocks; must cover `start_pos + tokens.len()` tokens.
    pub block_table: &'a [u32],
    /// Whether to compute logits (and the hidden state) of the last token.
    pub wants_logits: bool,
    /// Logits of this many leading tokens are wanted too, apart from the
    /// above ([`crate::ModelOutput::prompt_logits`]): what prompt
    /// log-probabilities are read from.
    pub prompt_logits: usize,
    /// `[tokens, embedding]`: embeddings used in place of the tokens' own.
    pub embeds: Option<&'a Tensor>,
    /// Whether to return every token's input embedding plus final-norm
    /// hidden state ([`crate::ModelOutput::states`]).
    pub wants_states: bool,
    /// Positions (of the sequence) whose states leave their input
    /// embedding out: media rows, which Qwen2.5-Omni's talker reads as the
    /// hidden state alone.
    pub bare_states: &'a [std::ops::Range<usize>],
    /// 3-D rotary positions (multimodal RoPE), when the prompt holds
    /// images or video; `None`: every row is the token's index.
    pub mrope: Option<MropePositions<'a>>,
}

/// A sequence's multimodal RoPE positions: its prompt's, then for every
/// later token its index plus `delta` in all three rows.
#[derive(Debug, Clone, Copy)]
pub struct MropePositions<'a> {
    /// `(temporal, height, width)` of each prompt position.
    pub prompt: &'a [[i64; 3]],
    /// Added to a generated token's index (the prompt's largest position
    /// plus one, minus its length).
    pub delta: i64,
}

impl MropePositions<'_> {
    /// The three positions of the token at `index`.
    pub fn at(&self, index: usize) -> [i64; 3] {
        match self.prompt.get(index) {
            Some(p) => *p,
            None => [index as i64 + self.delta; 3],
        }
    }
}

/// How the decode group's attention reads the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodePath {
    /// In place, through the block tables (the CPU kernel).
    Paged,
    /// Gathered into a padded copy for `scaled_dot_product_attention`.
    Gathered,
}

impl DecodePath {
    /// The faster path on `device`: the paged kernel is CPU code.
    fn for_device(device: Device) -> Self {
        if device == Device::Cpu {
            DecodePath::Paged
        } else {
            DecodePath::Gathered
        }
    }
}

/// The decode group's view of the cache, per [`DecodePath`].
#[derive(Debug)]
pub(crate) enum DecodeKeys {
    Paged {
        /// `[count, max_blocks]`, rows padded with block 0.
        block_tables: Tensor,
        /// `[count]`: keys per row, the new token's included.
        context_lens: Tensor,
    },
    Gathered {
        /// Longest context in the group (keys per row after padding).
        ctx: i64,
        /// `[count * ctx]` slots to gather, padding at slot 0.
        gather: Tensor,
        /// `[count, 1, 1, ctx]`, true where a key is real.
        mask: Tensor,
    },
}

/// Batched attention over single-token entries.
#[derive(Debug)]
pub(crate) struct DecodeGroup {
    pub count: i64,
    pub keys: DecodeKeys,
}

/// Attention of one multi-token entry.
#[derive(Debug)]
pub(crate) struct PrefillGroup {
    /// Where its tokens start on the flat axis.
    pub offset: i64,
    pub len: i64,
    /// When earlier tokens are cached: slots of the whole context and the
    /// causal mask `[1, 1, len, context]`. `None` for a prompt from position 0,
    /// which attends to its own new K/V with `is_causal`.
    pub cached: Option<(Tensor, Tensor)>,
}

/// Everything one forward pass needs besides the weights and the cache.
#[derive(Debug)]
pub struct ForwardBatch {
    pub(crate) input_ids: Tensor,
    pub(crate) positions: Tensor,
    /// `[3, tokens]` multimodal RoPE positions, when an entry has them.
    pub(crate) mrope_positions: Option<Tensor>,
    /// The largest of them (checked against the rotary tables without a
    /// device round trip).
    pub(crate) mrope_max: i64,
    /// Slot of each new token's K/V.
    pub(crate) slots: Tensor,
    pub(crate) decode: Option<DecodeGroup>,
    pub(crate) prefills: Vec<PrefillGroup>,
    /// Flat rows whose logits are wanted.
    pub(crate) logits_rows: Tensor,
    /// For each logits row, the index of its entry in the caller's slice.
    pub logits_entries: Vec<usize>,
    /// Flat rows whose logits are wanted for prompt log-probabilities.
    pub(crate) prompt_logit_rows: Option<Tensor>,
    /// Per entry wanting them, in the order of `prompt_logit_rows`: its
    /// index in the caller's slice and its number of rows.
    pub prompt_logit_entries: Vec<(usize, usize)>,
    /// Flat rows whose embeddings are given, and the embeddings.
    pub(crate) embeds: Option<(Tensor, Tensor)>,
    /// Flat rows whose states are wanted.
    pub(crate) state_rows: Option<Tensor>,
    /// Indices into `state_rows` whose states are the hidden state alone.
    pub(crate) bare_state_rows: Option<Tensor>,
    /// Per entry wanting states, in the order of `state_rows`: its index in
    /// the caller's slice and its number of rows.
    pub state_entries: Vec<(usize, usize)>,
    /// Tokens in the pass.
    pub num_tokens: usize,
    /// Entries in the pass.
    pub batch_size: usize,
    /// `prefill`, `decode` or `mixed` (for tracing).
    pub phase: &'static str,
}

fn slot(table: &[u32], block_size: usize, pos: usize) -> Result<i64> {
    let block = table
        .get(pos / block_size)
        .ok_or_else(|| Error::InvalidConfig {
            field: "block_table".to_owned(),
            value: format!("{} blocks", table.len()),
            reason: format!("does not cover position {pos} (block size {block_size})"),
        })?;
    Ok(*block as i64 * block_size as i64 + (pos % block_size) as i64)
}

impl ForwardBatch {
    /// Builds the index tensors for `entries` on `device`.
    pub fn new(entries: &[BatchEntry<'_>], block_size: usize, device: Device) -> Result<Self> {
        Self::with_decode_path(entries, block_size, device, DecodePath::for_device(device))
    }

    /// As [`ForwardBatch::new`], with the decode group's path chosen (tests
    /// compare the two).
    pub(crate) fn with_decode_path(
        entries: &[BatchEntry<'_>],
        block_size: usize,
        device: Device,
        path: DecodePath,
    ) -> Result<Self> {
        let mut order: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].tokens.len() == 1)
            .collect();
        let num_decode = order.len();
        order.extend((0..entries.len()).filter(|&i| entries[i].tokens.len() > 1));
        if let Some(i) = (0..entries.len()).find(|&i| entries[i].tokens.is_empty()) {
            return Err(Error::InvalidConfig {
                field: format!("batch entry {i}"),
                value: "0 tokens".to_owned(),
                reason: "every entry needs at least one token".to_owned(),
            });
        }

        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let any_mrope = entries.iter().any(|e| e.mrope.is_some());
        let mut mrope: [Vec<i64>; 3] = Default::default();
        let mut slots = Vec::new();
        let mut logits_rows = Vec::new();
        let mut logits_entries = Vec::new();
        let mut prompt_logit_rows = Vec::new();
        let mut prompt_logit_entries = Vec::new();
        let mut prefills = Vec::new();
        let mut embed_rows = Vec::new();
        let mut embed_values = Vec::new();
        let mut state_rows = Vec::new();
        let mut bare_state_rows = Vec::new();
        let mut state_entries = Vec::new();
        for &i in &order {
            let e = &entries[i];
            let offset = ids.len() as i64;
            let rows = offset..offset + e.tokens.len() as i64;
            if let Some(x) = &e.embeds {
                embed_rows.extend(rows.clone());
                embed_values.push(x.shallow_clone());
            }
            if e.prompt_logits > 0 {
                let n = e.prompt_logits.min(e.tokens.len());
                prompt_logit_rows.extend(offset..offset + n as i64);
                prompt_logit_entries.push((i, n));
            }
            if e.wants_states {
                for j in 0..e.tokens.len() {
                    let pos = e.start_pos + j;
                    if e.bare_states.iter().any(|r| r.contains(&pos)) {
                        bare_state_rows.push((state_rows.len() + j) as i64);
                    }
                }
                state_rows.extend(rows);
                state_entries.push((i, e.tokens.len()));
            }
            for (j, &t) in e.tokens.iter().enumerate() {
                let pos = e.start_pos + j;
                ids.push(t as i64);
                positions.push(pos as i64);
                if any_mrope {
                    let p = e.mrope.map_or([pos as i64; 3], |m| m.at(pos));
                    for (row, v) in mrope.iter_mut().zip(p) {
                        row.push(v);
                    }
                }
                slots.push(slot(e.block_table, block_size, pos)?);
            }
            if e.wants_logits {
                logits_rows.push(ids.len() as i64 - 1);
                logits_entries.push(i);
            }
            if e.tokens.len() > 1 {
                let len = e.tokens.len() as i64;
                let cached = if e.start_pos == 0 {
                    None
                } else {
                    let ctx = e.start_pos + e.tokens.len();
                    let gather = (0..ctx)
                        .map(|p| slot(e.block_table, block_size, p))
                        .collect::<Result<Vec<_>>>()?;
                    let mut mask = Vec::with_capacity(e.tokens.len() * ctx);
                    for q in 0..e.tokens.len() {
                        mask.extend((0..ctx).map(|k| k <= e.start_pos + q));
                    }
                    Some((
                        Tensor::from_slice(&gather).f_to_device(device)?,
                        Tensor::from_slice(&mask)
                            .f_view([1, 1, len, ctx as i64])?
                            .f_to_device(device)?,
                    ))
                };
                prefills.push(PrefillGroup {
                    offset,
                    len,
                    cached,
                });
            }
        }

        let decode = if num_decode > 0 {
            let rows = &order[..num_decode];
            let keys = match path {
                DecodePath::Paged => decode_tables(entries, rows, block_size, device)?,
                DecodePath::Gathered => decode_gather(entries, rows, block_size, device)?,
            };
            Some(DecodeGroup {
                count: num_decode as i64,
                keys,
            })
        } else {
            None
        };

        let phase = match (num_decode > 0, !prefills.is_empty()) {
            (true, false) => "decode",
            (false, _) => "prefill",
            (true, true) => "mixed",
        };
        let to = |v: &[i64]| -> Result<Tensor> {
            Ok(Tensor::from_slice(v)
                .f_to_kind(Kind::Int64)?
                .f_to_device(device)?)
        };
        Ok(Self {
            num_tokens: ids.len(),
            batch_size: entries.len(),
            input_ids: to(&ids)?,
            positions: to(&positions)?,
            mrope_max: mrope.iter().flatten().copied().max().unwrap_or(0),
            mrope_positions: if any_mrope {
                Some(to(&mrope.concat())?.f_view([3, -1])?)
            } else {
                None
            },
            slots: to(&slots)?,
            decode,
            prefills,
            logits_rows: to(&logits_rows)?,
            logits_entries,
            prompt_logit_rows: if prompt_logit_rows.is_empty() {
                None
            } else {
                Some(to(&prompt_logit_rows)?)
            },
            prompt_logit_entries,
            embeds: if embed_values.is_empty() {
                None
            } else {
                Some((
                    to(&embed_rows)?,
                    Tensor::f_cat(&embed_values, 0)?.f_to_device(device)?,
                ))
            },
            state_rows: if state_rows.is_empty() {
                None
            } else {
                Some(to(&state_rows)?)
            },
            bare_state_rows: if bare_state_rows.is_empty() {
                None
            } else {
                Some(to(&bare_state_rows)?)
            },
            state_entries,
            phase,
        })
    }
}

/// Block tables and context lengths of the decode rows, for the paged kernel.
fn decode_tables(
    entries: &[BatchEntry<'_>],
    rows: &[usize],
    block_size: usize,
    device: Device,
) -> Result<DecodeKeys> {
    let lens: Vec<i64> = rows
        .iter()
        .map(|&i| (entries[i].start_pos + 1) as i64)
        .collect();
    let max_blocks = lens
        .iter()
        .map(|&l| (l as usize).div_ceil(block_size))
        .max()
        .unwrap_or(1);
    let mut tables = vec![0i64; rows.len() * max_blocks];
    for (row, &i) in rows.iter().enumerate() {
        let e = &entries[i];
        let needed = (e.start_pos + 1).div_ceil(block_size);
        if e.block_table.len() < needed {
            // The same error `slot` gives for an uncovered position.
            slot(e.block_table, block_size, e.start_pos)?;
        }
        for (b, &block) in e.block_table[..needed].iter().enumerate() {
            tables[row * max_blocks + b] = block as i64;
        }
    }
    Ok(DecodeKeys::Paged {
        block_tables: Tensor::from_slice(&tables)
            .f_view([rows.len() as i64, max_blocks as i64])?
            .f_to_device(device)?,
        context_lens: Tensor::from_slice(&lens).f_to_device(device)?,
    })
}

/// Gather slots and padding mask of the decode rows, for batched SDPA.
fn decode_gather(
    entries: &[BatchEntry<'_>],
    rows: &[usize],
    block_size: usize,
    device: Device,
) -> Result<DecodeKeys> {
    let n = rows.len();
    let ctx = rows
        .iter()
        .map(|&i| entries[i].start_pos + 1)
        .max()
        .unwrap_or(1);
    let mut gather = vec![0i64; n * ctx];
    let mut mask = vec![false; n * ctx];
    for (row, &i) in rows.iter().enumerate() {
        let e = &entries[i];
        for p in 0..=e.start_pos {
            gather[row * ctx + p] = slot(e.block_table, block_size, p)?;
            mask[row * ctx + p] = true;
        }
    }
    Ok(DecodeKeys::Gathered {
        ctx: ctx as i64,
        gather: Tensor::from_slice(&gather).f_to_device(device)?,
        mask: Tensor::from_slice(&mask)
            .f_view([n as i64, 1, 1, ctx as i64])?
            .f_to_device(device)?,
    })
}
