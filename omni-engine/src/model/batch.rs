//! The per-step index tensors a forward pass needs, built once per step and
//! shared by every layer.
//!
//! Tokens of all sequences are flattened into one `[tokens]` axis, single-token
//! entries (decodes) first, so the linear layers see one matrix. Attention then
//! runs in groups: one batched call over many rows ([`RowGroup`]), and each
//! other multi-token entry (a prefill or a prefill chunk) on its own, which
//! needs no padding at all. The batched group reads the cache one of two ways
//! ([`RowKeys`]): on the CPU a kernel reads it in place through the block
//! tables, and takes the rows of short prefills too (each row attending up to
//! its own position), so a step of many short prompts makes one attention
//! call per layer instead of one per prompt plus a gather of each one's cached
//! prefix; elsewhere one batched `scaled_dot_product_attention` runs over
//! the decodes' gathered, padded contexts (padding points at the zeroed block
//! 0 and is masked).
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

impl<'a> BatchEntry<'a> {
    /// Text tokens from `start_pos` on, wanting the last one's logits and
    /// nothing else: the common entry, which callers adjust.
    pub fn text(tokens: &'a [u32], start_pos: usize, block_table: &'a [u32]) -> Self {
        Self {
            tokens,
            start_pos,
            block_table,
            wants_logits: true,
            prompt_logits: 0,
            embeds: None,
            wants_states: false,
            bare_states: &[],
            mrope: None,
        }
    }
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

/// Longest multi-token entry whose rows join the paged kernel's call
/// ([`DecodePath::Paged`]), and the longest context it may reach (its
/// cached prefix plus its tokens); others run `scaled_dot_product_attention`
/// on their own. The kernel treats each row alone, so each of a prefill's
/// L rows rereads the context: for the short prompts of a batched step,
/// whose context stays in the caches (2048 positions of SmolLM2's K and V
/// are 3 MB), that is less than what SDPA costs them (a call, a transpose
/// per tensor and a gather of the cached prefix per prompt and layer); for
/// long chunks or long contexts SDPA's blocked kernel, which reads each key
/// once per block of queries, wins.
pub(crate) const PAGED_PREFILL_MAX_TOKENS: usize = 128;
/// See [`PAGED_PREFILL_MAX_TOKENS`].
pub(crate) const PAGED_PREFILL_MAX_CONTEXT: usize = 2048;

/// How the batched group's attention reads the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodePath {
    /// In place, through the block tables (the CPU kernel).
    Paged,
    /// Gathered into a padded copy for `scaled_dot_product_attention`.
    Gathered,
}

impl DecodePath {
    /// The faster path on `device`: the paged kernel is CPU code.
    /// [`DecodePath::Paged`] also means the new K/V are written by row
    /// copies rather than `index_copy_`.
    fn for_device(device: Device) -> Self {
        if device == Device::Cpu {
            DecodePath::Paged
        } else {
            DecodePath::Gathered
        }
    }
}

/// The batched group's view of the cache, per [`DecodePath`].
#[derive(Debug)]
pub(crate) enum RowKeys {
    Paged {
        /// `[entries, max_blocks]`: each entry's table, padded with block 0.
        block_tables: Tensor,
        /// `[count]`: the table of each row.
        row_tables: Tensor,
        /// `[count]`: keys per row, its own token's included.
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

/// Rows whose attention runs in one batched call, leading the flat axis:
/// every single-token entry's, and on the paged path every row of the
/// short multi-token entries ([`PAGED_PREFILL_MAX_TOKENS`]).
#[derive(Debug)]
pub(crate) struct RowGroup {
    /// Rows (tokens) in the group.
    pub count: i64,
    pub keys: RowKeys,
}

/// Attention of one multi-token entry outside the batched group.
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
    pub(crate) batched: Option<RowGroup>,
    /// Whether the K/V of new tokens are written by the paged kernel's row
    /// copies ([`DecodePath::Paged`]).
    pub(crate) paged: bool,
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

    /// As [`ForwardBatch::new`], with the batched group's path chosen (tests
    /// compare the two).
    pub(crate) fn with_decode_path(
        entries: &[BatchEntry<'_>],
        block_size: usize,
        device: Device,
        path: DecodePath,
    ) -> Result<Self> {
        let len = |i: usize| entries[i].tokens.len();
        // Multi-token entries that attend in the batched group.
        let joins = |i: usize| {
            path == DecodePath::Paged
                && len(i) > 1
                && len(i) <= PAGED_PREFILL_MAX_TOKENS
                && entries[i].start_pos + len(i) <= PAGED_PREFILL_MAX_CONTEXT
        };
        let mut order: Vec<usize> = (0..entries.len()).filter(|&i| len(i) == 1).collect();
        let num_decode = order.len();
        order.extend((0..entries.len()).filter(|&i| joins(i)));
        let num_batched = order.len();
        order.extend((0..entries.len()).filter(|&i| len(i) > 1 && !joins(i)));
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
            if e.tokens.len() > 1 && !joins(i) {
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

        let batched = if num_batched > 0 {
            let group = &order[..num_batched];
            let keys = match path {
                DecodePath::Paged => paged_tables(entries, group, block_size, device)?,
                DecodePath::Gathered => decode_gather(entries, group, block_size, device)?,
            };
            Some(RowGroup {
                count: group.iter().map(|&i| len(i) as i64).sum(),
                keys,
            })
        } else {
            None
        };

        let phase = match (num_decode > 0, order.len() > num_decode) {
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
            batched,
            paged: path == DecodePath::Paged,
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

/// Block tables of the group's entries and each row's table and context
/// length, for the paged kernel: a decode row attends to its whole
/// sequence, a prefill's row `j` to positions up to `start_pos + j`.
fn paged_tables(
    entries: &[BatchEntry<'_>],
    group: &[usize],
    block_size: usize,
    device: Device,
) -> Result<RowKeys> {
    let ends: Vec<usize> = group
        .iter()
        .map(|&i| entries[i].start_pos + entries[i].tokens.len())
        .collect();
    let max_blocks = ends
        .iter()
        .map(|&end| end.div_ceil(block_size))
        .max()
        .unwrap_or(1);
    let mut tables = vec![0i64; group.len() * max_blocks];
    let mut row_tables = Vec::new();
    let mut lens = Vec::new();
    for (t, (&i, &end)) in group.iter().zip(&ends).enumerate() {
        let e = &entries[i];
        let needed = end.div_ceil(block_size);
        if e.block_table.len() < needed {
            // The same error `slot` gives for an uncovered position.
            slot(e.block_table, block_size, end - 1)?;
        }
        for (b, &block) in e.block_table[..needed].iter().enumerate() {
            tables[t * max_blocks + b] = block as i64;
        }
        for pos in e.start_pos..end {
            row_tables.push(t as i64);
            lens.push(pos as i64 + 1);
        }
    }
    Ok(RowKeys::Paged {
        block_tables: Tensor::from_slice(&tables)
            .f_view([group.len() as i64, max_blocks as i64])?
            .f_to_device(device)?,
        row_tables: Tensor::from_slice(&row_tables).f_to_device(device)?,
        context_lens: Tensor::from_slice(&lens).f_to_device(device)?,
    })
}

/// Gather slots and padding mask of the decode rows, for batched SDPA.
fn decode_gather(
    entries: &[BatchEntry<'_>],
    rows: &[usize],
    block_size: usize,
    device: Device,
) -> Result<RowKeys> {
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
    Ok(RowKeys::Gathered {
        ctx: ctx as i64,
        gather: Tensor::from_slice(&gather).f_to_device(device)?,
        mask: Tensor::from_slice(&mask)
            .f_view([n as i64, 1, 1, ctx as i64])?
            .f_to_device(device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ints(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t).unwrap_or_default()
    }

    /// The flat axis is decodes, then the short prefills that join the
    /// paged call, then the rest; every per-row index follows that order
    /// and names its entry by its place in the caller's slice.
    #[test]
    fn rows_are_ordered_decodes_short_prefills_then_the_rest() -> Result<()> {
        let table: Vec<u32> = (1..=200).collect();
        let long: Vec<u32> = (0..130).collect();
        let short: Vec<u32> = vec![7; 5];
        let far: Vec<u32> = vec![9; 3];
        let mut first = BatchEntry::text(&long, 0, &table);
        first.prompt_logits = 2;
        first.wants_states = true;
        let entries = [
            first,                                // 130 tokens: past the token limit
            BatchEntry::text(&short, 4, &table),  // joins
            BatchEntry::text(&far, 2046, &table), // 3 tokens, context 2049: past the context limit
            BatchEntry::text(&[5], 20, &table),   // a decode
        ];
        let b = ForwardBatch::with_decode_path(&entries, 16, Device::Cpu, DecodePath::Paged)?;
        assert_eq!(b.num_tokens, 139);
        assert_eq!(b.phase, "mixed");
        // Rows: decode 0, short 1..6, long 6..136, far 136..139.
        assert_eq!(b.logits_entries, [3, 1, 0, 2]);
        assert_eq!(ints(&b.logits_rows), [0, 5, 135, 138]);
        assert_eq!(b.prompt_logit_entries, [(0, 2)]);
        assert_eq!(ints(b.prompt_logit_rows.as_ref().expect("rows")), [6, 7]);
        assert_eq!(b.state_entries, [(0, 130)]);
        assert_eq!(ints(b.state_rows.as_ref().expect("rows"))[0], 6);
        let slots = ints(&b.slots);
        assert_eq!(slots[0], 16 * 2 + 4); // position 20: table[1] = 2
        assert_eq!(slots[1], 16 + 4); // position 4: table[0] = 1
        assert_eq!(slots[6], 16);
        let group = b.batched.as_ref().expect("a batched group");
        assert_eq!(group.count, 6);
        match &group.keys {
            RowKeys::Paged {
                row_tables,
                context_lens,
                ..
            } => {
                assert_eq!(ints(row_tables), [0, 1, 1, 1, 1, 1]);
                assert_eq!(ints(context_lens), [21, 5, 6, 7, 8, 9]);
            }
            RowKeys::Gathered { .. } => panic!("the CPU path reads in place"),
        }
        let prefills: Vec<(i64, i64, bool)> = b
            .prefills
            .iter()
            .map(|p| (p.offset, p.len, p.cached.is_some()))
            .collect();
        assert_eq!(prefills, [(6, 130, false), (136, 3, true)]);

        // The gathered path batches the decode alone.
        let g = ForwardBatch::with_decode_path(&entries, 16, Device::Cpu, DecodePath::Gathered)?;
        assert_eq!(g.batched.as_ref().map(|r| r.count), Some(1));
        assert_eq!(g.logits_entries, [3, 0, 1, 2]);
        assert_eq!(g.prefills.len(), 3);
        Ok(())
    }
}
