//! The paged KV cache: fixed-size blocks of token slots, a block allocator,
//! and per-layer K/V storage.
//!
//! Storage is one flat slot tensor per layer and for K and V,
//! `[num_blocks * block_size, kv_heads, head_dim]`: token `p` of a sequence
//! lives in slot `block_table[p / block_size] * block_size + p % block_size`.
//! New K/V are written with one `index_copy_` per layer and read back with
//! one `index_select` (see `model/batch.rs`), so paging costs no per-token
//! work (the idea of vLLM's PagedAttention, without a custom kernel).
//!
//! Block 0 is reserved and zeroed: padded gather indices point at it, so
//! masked positions read finite zeros, never stale or uninitialised memory
//! (a masked NaN would still poison the softmax-weighted sum). The other
//! blocks are allocated `empty`, so the process only touches the pages it
//! uses. This module knows nothing of requests; the scheduler owns the
//! [`BlockAllocator`] and the sequences' block tables.
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Hands out KV blocks; block 0 is never handed out (see the module docs).
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    /// Free block ids; popped from the end.
    free: Vec<u32>,
    num_blocks: usize,
    block_size: usize,
}

impl BlockAllocator {
    /// An allocator over `num_blocks` blocks of `block_size` tokens (one of
    /// them reserved).
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Reversed so low ids come out first (easier to read in traces).
        let free = (1..num_blocks as u32).rev().collect();
        Self {
            free,
            num_blocks,
            block_size,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can ever be handed out.
    pub fn num_usable_blocks(&self) -> usize {
        self.num_blocks.saturating_sub(1)
    }

    /// Blocks free now.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Grows `table` so it holds `num_tokens` tokens. All or nothing: returns
    /// `false` and leaves `table` unchanged when too few blocks are free.
    pub fn grow(&mut self, table: &mut Vec<u32>, num_tokens: usize) -> bool {
        let needed = self.blocks_for(num_tokens).saturating_sub(table.len());
        if needed > self.free.len() {
            return false;
        }
        let start = self.free.len() - needed;
        table.extend(self.free.drain(start..).rev());
        true
    }

    /// Returns every block of `table` and empties it.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.extend(table.drain(..).rev());
    }
}

/// Per-layer K and V slot tensors.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer, `[num_slots, kv_heads, head_dim]`.
    pub(crate) k: Vec<Tensor>,
    /// Per layer, `[num_slots, kv_heads, head_dim]`.
    pub(crate) v: Vec<Tensor>,
    num_blocks: usize,
    block_size: usize,
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

    /// Allocates the cache on `device`.
    pub fn new(
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let shape = [
            (num_blocks * block_size) as i64,
            cfg.num_key_value_heads as i64,
            cfg.head_dim as i64,
        ];
        let mut k = Vec::with_capacity(cfg.num_hidden_layers);
        let mut v = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            for store in [&mut k, &mut v] {
                let t = Tensor::f_empty(shape, (kind, device))?;
                // Zero the reserved block 0 (padding reads it).
                let _ = t.f_narrow(0, 0, block_size as i64)?.f_zero_()?;
                store.push(t);
            }
        }
        Ok(Self {
            k,
            v,
            num_blocks,
            block_size,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_is_all_or_nothing_and_release_returns_blocks() {
        let mut a = BlockAllocator::new(5, 4); // 4 usable
        let mut t1 = Vec::new();
        assert!(a.grow(&mut t1, 9)); // 3 blocks
        assert_eq!(t1.len(), 3);
        assert!(!t1.contains(&0));
        let mut t2 = Vec::new();
        assert!(!a.grow(&mut t2, 5)); // needs 2, 1 free
        assert!(t2.is_empty());
        assert!(a.grow(&mut t2, 4));
        assert_eq!(a.num_free_blocks(), 0);
        assert!(a.grow(&mut t1, 12)); // still 3 blocks: no-op
        a.release(&mut t1);
        assert!(t1.is_empty());
        assert_eq!(a.num_free_blocks(), 3);
        let mut all: Vec<u32> = Vec::new();
        assert!(a.grow(&mut all, 12));
        all.extend(&t2);
        all.sort_unstable();
        assert_eq!(all, vec![1, 2, 3, 4]);
    }
}
