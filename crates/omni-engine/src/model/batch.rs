//! The per-step index tensors a forward pass needs, built once per step and
//! shared by every layer.
//!
//! Tokens of all sequences are flattened into one `[tokens]` axis, single-token
//! entries (decodes) first, so the linear layers see one matrix. Attention then
//! runs in groups: all single-token entries in one batched
//! `scaled_dot_product_attention` over their gathered, padded contexts (padding
//! points at the zeroed block 0 and is masked), and each multi-token entry
//! (a prefill or a prefill chunk) on its own, which needs no padding at all.
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
}

/// Batched attention over single-token entries.
#[derive(Debug)]
pub(crate) struct DecodeGroup {
    pub count: i64,
    /// Longest context in the group (keys per row after padding).
    pub ctx: i64,
    /// `[count * ctx]` slots to gather, padding at slot 0.
    pub gather: Tensor,
    /// `[count, 1, 1, ctx]`, true where a key is real.
    pub mask: Tensor,
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
    /// Slot of each new token's K/V.
    pub(crate) slots: Tensor,
    pub(crate) decode: Option<DecodeGroup>,
    pub(crate) prefills: Vec<PrefillGroup>,
    /// Flat rows whose logits are wanted.
    pub(crate) logits_rows: Tensor,
    /// For each logits row, the index of its entry in the caller's slice.
    pub logits_entries: Vec<usize>,
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
        let mut slots = Vec::new();
        let mut logits_rows = Vec::new();
        let mut logits_entries = Vec::new();
        let mut prefills = Vec::new();
        for &i in &order {
            let e = &entries[i];
            let offset = ids.len() as i64;
            for (j, &t) in e.tokens.iter().enumerate() {
                let pos = e.start_pos + j;
                ids.push(t as i64);
                positions.push(pos as i64);
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
            let ctx = order[..num_decode]
                .iter()
                .map(|&i| entries[i].start_pos + 1)
                .max()
                .unwrap_or(1);
            let mut gather = vec![0i64; num_decode * ctx];
            let mut mask = vec![false; num_decode * ctx];
            for (row, &i) in order[..num_decode].iter().enumerate() {
                let e = &entries[i];
                for p in 0..=e.start_pos {
                    gather[row * ctx + p] = slot(e.block_table, block_size, p)?;
                    mask[row * ctx + p] = true;
                }
            }
            Some(DecodeGroup {
                count: num_decode as i64,
                ctx: ctx as i64,
                gather: Tensor::from_slice(&gather).f_to_device(device)?,
                mask: Tensor::from_slice(&mask)
                    .f_view([num_decode as i64, 1, 1, ctx as i64])?
                    .f_to_device(device)?,
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
            slots: to(&slots)?,
            decode,
            prefills,
            logits_rows: to(&logits_rows)?,
            logits_entries,
            phase,
        })
    }
}
