//! The paged KV cache's storage: fixed-size blocks of token slots, per layer,
//! for K and V. Which block holds what is `block_pool`'s business.
//!
//! Storage is one tensor, handed out as a flat slot view per layer and for K
//! and V, `[num_blocks * block_size, kv_heads, head_dim]`: token `p` of a
//! sequence lives in slot
//! `block_table[p / block_size] * block_size + p % block_size`.
//! New K/V are written by row (`paged_kv_write` on the CPU, one `index_copy_`
//! per layer elsewhere) and read back in place through the block tables (the
//! CPU kernel) or with one `index_select` (see `model/batch.rs`), so paging
//! costs no per-token work (the idea of vLLM's PagedAttention).
//!
//! Block 0 is reserved and zeroed: padded gather indices point at it, so
//! masked positions read finite zeros, never stale or uninitialised memory
//! (a masked NaN would still poison the softmax-weighted sum). On the CPU
//! every block is zeroed at allocation (see [`KvCache::new`]). This module
//! knows nothing of requests; the scheduler owns the [`crate::BlockPool`] and
//! the sequences' block tables.
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Per-layer K and V slot tensors.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer, `[num_slots, kv_heads, head_dim]`.
    pub(crate) k: Vec<Tensor>,
    /// Per layer, `[num_slots, kv_heads, head_dim]`.
    pub(crate) v: Vec<Tensor>,
    num_blocks: usize,
    block_size: usize,
    kind: Kind,
}

impl KvCache {
    /// Bytes one block takes across all layers, K and V.
    pub fn bytes_per_block(cfg: &ModelConfig, block_size: usize, kind: Kind) -> u64 {
        let elem = kind.elt_size_in_bytes() as u64;
        2 * cfg.num_hidden_layers as u64
            * block_size as u64
            * cfg.num_key_value_heads as u64
            * cfg.head_dim as u64
            * elem
    }

    /// How many blocks fit into `budget_bytes`; an error when not even two
    /// (the reserved one and one usable) fit.
    pub fn num_blocks_for_budget(
        cfg: &ModelConfig,
        block_size: usize,
        kind: Kind,
        budget_bytes: u64,
    ) -> Result<usize> {
        let per_block = Self::bytes_per_block(cfg, block_size, kind).max(1);
        let n = (budget_bytes / per_block) as usize;
        if n < 2 {
            return Err(Error::InvalidConfig {
                field: "engine_args.kv_cache_memory_bytes".to_owned(),
                value: budget_bytes.to_string(),
                reason: format!(
                    "holds fewer than 2 KV blocks of {block_size} tokens ({per_block} bytes each)"
                ),
            });
        }
        Ok(n)
    }

    /// Allocates the cache on `device`: one tensor for every layer's K and
    /// V, handed out as per-layer views.
    ///
    /// On the CPU the whole cache is zeroed here (on the intra-op threads),
    /// as vLLM v1 does with its `torch.zeros`: the budget is resident from
    /// the start, so a machine that cannot hold it runs out of memory while
    /// loading (Linux overcommits, so as an OOM kill, not an error) rather
    /// than mid-request, and no step pays for first touching a block. Left
    /// `empty`, blocks were first touched one by one as the prefix cache grew
    /// through the budget: 10-18% of a batch's step time in the pipeline
    /// bench (BENCHMARKS.md). Transparent huge pages were slower to fault in
    /// here (direct compaction), so the pages stay the allocator's.
    /// CUDA memory is committed when allocated, so there only the reserved
    /// block is zeroed.
    pub fn new(
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let shape = [
            2,
            cfg.num_hidden_layers as i64,
            (num_blocks * block_size) as i64,
            cfg.num_key_value_heads as i64,
            cfg.head_dim as i64,
        ];
        let mut all = Tensor::f_empty(shape, (kind, device))?;
        if device == Device::Cpu {
            let _ = all.f_zero_()?;
        } else {
            // Zero the reserved block 0 (padding reads it).
            let _ = all.f_narrow(2, 0, block_size as i64)?.f_zero_()?;
        }
        // Dimension 0 has two entries, K and V; each unbinds into its layers.
        let kv = all.f_unbind(0)?;
        Ok(Self {
            k: kv[0].f_unbind(0)?,
            v: kv[1].f_unbind(0)?,
            num_blocks,
            block_size,
            kind,
        })
    }

    /// Blocks, including the reserved one.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The dtype K and V are stored in.
    pub fn kind(&self) -> Kind {
        self.kind
    }
}
