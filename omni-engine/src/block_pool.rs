//! The KV block pool: which blocks are free, who holds which, and the prefix
//! cache over full blocks (vLLM's automatic prefix caching).
//!
//! A block that a sequence has filled with computed K/V is registered under
//! the hash of its tokens chained with the hash of the block before it, so
//! the key stands for the whole prefix up to the block's end. A later
//! sequence whose prompt starts with the same tokens takes those blocks
//! instead of computing them: the block's reference count goes up and the
//! sequence's `num_computed_tokens` starts past them. Shared blocks are
//! always full and before the sharer's first computed position, so no one
//! ever writes into a block someone else reads.
//!
//! A released block keeps its K/V and its key until the pool needs it for
//! something else. Free blocks without a key are handed out first; keyed
//! ones are evicted least recently released first, tail blocks of a sequence
//! before its head (a head is likelier to be shared).
//!
//! Keys hold the block's tokens themselves, not only their hash, so a hit is
//! exact for the block; the chain to the parent is a 64-bit hash.
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// A full block's identity: its parent's chain hash and its own tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    parent: Option<BlockHash>,
    tokens: Box<[u32]>,
}

/// The chain hash of a full block: stands for every token up to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BlockHash(u64);

impl BlockKey {
    fn hash(&self) -> BlockHash {
        // SipHash with fixed keys: deterministic across runs and processes.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        Hash::hash(self, &mut h);
        BlockHash(h.finish())
    }
}

#[derive(Debug, Clone, Default)]
struct BlockState {
    ref_count: u32,
    /// Set while the block is registered in the prefix cache.
    key: Option<(BlockHash, BlockKey)>,
    /// Set while the block is free and keyed (its place in the eviction order).
    free_stamp: Option<u64>,
}

/// Prefix-cache counters since the pool was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up at admission.
    pub queried_tokens: u64,
    /// Of those, tokens whose K/V came from the cache.
    pub hit_tokens: u64,
}

/// Hands out KV blocks, counts their holders and caches full blocks by
/// content. Block 0 is never handed out (see `kv_cache`).
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<BlockState>,
    /// Free blocks without a key; popped from the end.
    free_plain: Vec<u32>,
    /// Free blocks with a key, oldest release first.
    free_keyed: BTreeMap<u64, u32>,
    next_stamp: u64,
    /// Registered full blocks (free or held).
    cached: HashMap<BlockHash, u32>,
    caching: bool,
    stats: PrefixCacheStats,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks of `block_size` tokens (one of them
    /// reserved); `prefix_caching` turns the prefix cache on.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self {
            block_size,
            blocks: vec![BlockState::default(); num_blocks],
            // Reversed so low ids come out first (easier to read in traces).
            free_plain: (1..num_blocks as u32).rev().collect(),
            free_keyed: BTreeMap::new(),
            next_stamp: 0,
            cached: HashMap::new(),
            caching: prefix_caching,
            stats: PrefixCacheStats::default(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can ever be handed out.
    pub fn num_usable_blocks(&self) -> usize {
        self.blocks.len().saturating_sub(1)
    }

    /// Blocks free now, cached ones included (they are evicted on demand).
    pub fn num_free_blocks(&self) -> usize {
        self.free_plain.len() + self.free_keyed.len()
    }

    /// Blocks registered in the prefix cache, free or held.
    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Whether the prefix cache is on.
    pub fn prefix_caching(&self) -> bool {
        self.caching
    }

    /// Prefix-cache counters.
    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Grows `table` with fresh blocks so it holds `num_tokens` tokens. All
    /// or nothing: returns `false` and leaves `table` unchanged when too few
    /// blocks are free.
    pub fn grow(&mut self, table: &mut Vec<u32>, num_tokens: usize) -> bool {
        let needed = self.blocks_for(num_tokens).saturating_sub(table.len());
        if needed > self.num_free_blocks() {
            return false;
        }
        for _ in 0..needed {
            let block = match self.free_plain.pop() {
                Some(b) => b,
                None => self.evict_oldest(),
            };
            self.blocks[block as usize].ref_count = 1;
            table.push(block);
        }
        true
    }

    /// Takes the least recently released keyed block out of the cache.
    fn evict_oldest(&mut self) -> u32 {
        let Some((_, block)) = self.free_keyed.pop_first() else {
            unreachable!("grow checked that enough blocks are free");
        };
        let state = &mut self.blocks[block as usize];
        state.free_stamp = None;
        if let Some((hash, _)) = state.key.take() {
            self.cached.remove(&hash);
        }
        block
    }

    /// Drops one reference to every block of `table` and empties it. Blocks
    /// no one holds become free; cached ones stay findable until evicted.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        // Tail first: the tail is evicted before the head.
        for block in table.drain(..).rev() {
            let state = &mut self.blocks[block as usize];
            state.ref_count = state.ref_count.saturating_sub(1);
            if state.ref_count > 0 {
                continue;
            }
            if state.key.is_some() {
                state.free_stamp = Some(self.next_stamp);
                self.free_keyed.insert(self.next_stamp, block);
                self.next_stamp += 1;
            } else {
                self.free_plain.push(block);
            }
        }
    }

    /// Extends `hashes` (the chain hashes of `tokens`' leading full blocks)
    /// to cover the first `num_blocks` full blocks.
    pub(crate) fn extend_hashes(
        &self,
        tokens: &[u32],
        hashes: &mut Vec<BlockHash>,
        num_blocks: usize,
    ) {
        let bs = self.block_size;
        let num_blocks = num_blocks.min(tokens.len() / bs);
        while hashes.len() < num_blocks {
            let i = hashes.len();
            let key = BlockKey {
                parent: hashes.last().copied(),
                tokens: tokens[i * bs..(i + 1) * bs].into(),
            };
            hashes.push(key.hash());
        }
    }

    /// How many leading blocks of `hashes` the cache holds now.
    pub(crate) fn num_cached_prefix_blocks(&self, hashes: &[BlockHash]) -> usize {
        if !self.caching {
            return 0;
        }
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Full blocks of a `num_tokens`-token sequence that a cache hit may
    /// cover: at least one token is left to compute, so the step that
    /// admits it produces logits.
    fn hit_limit(&self, num_tokens: usize) -> usize {
        num_tokens.saturating_sub(1) / self.block_size
    }

    /// The block a hit on a `num_tokens`-token sequence with full-block
    /// `hashes` would take next if it were cached: the first uncached one
    /// within [`BlockPool::hit_limit`]. `None` when caching is off or the
    /// hit is already as long as it may be.
    pub(crate) fn next_uncached_block(
        &self,
        num_tokens: usize,
        hashes: &[BlockHash],
    ) -> Option<BlockHash> {
        if !self.caching {
            return None;
        }
        let cached = self.num_cached_prefix_blocks(hashes);
        hashes
            .get(cached)
            .copied()
            .filter(|_| cached < self.hit_limit(num_tokens))
    }

    /// Takes a reference to the cached blocks of the longest cached prefix of
    /// `tokens` that leaves at least one token to compute (the step must
    /// produce logits), and appends them to the empty `table`. `hashes` must
    /// hold the chain hashes of `tokens`' full blocks (see
    /// [`BlockPool::extend_hashes`]). Returns the tokens covered.
    pub(crate) fn take_cached_prefix(
        &mut self,
        tokens: &[u32],
        hashes: &[BlockHash],
        table: &mut Vec<u32>,
    ) -> usize {
        debug_assert!(table.is_empty());
        if !self.caching {
            return 0;
        }
        for (i, hash) in hashes.iter().take(self.hit_limit(tokens.len())).enumerate() {
            let Some(&block) = self.cached.get(hash) else {
                break;
            };
            let state = &mut self.blocks[block as usize];
            // The key holds the tokens: a hit is exact for this block.
            let same = state.key.as_ref().is_some_and(|(_, key)| {
                *key.tokens == tokens[i * self.block_size..(i + 1) * self.block_size]
            });
            if !same {
                break;
            }
            if let Some(stamp) = state.free_stamp.take() {
                self.free_keyed.remove(&stamp);
            }
            state.ref_count += 1;
            table.push(block);
        }
        table.len() * self.block_size
    }

    /// Counts one admitted sequence of `tokens` tokens, `hit` of them from
    /// the cache (admissions that fail for lack of blocks are retried, so
    /// they count when they succeed).
    pub(crate) fn record_admission(&mut self, tokens: usize, hit: usize) {
        self.stats.queried_tokens += tokens as u64;
        self.stats.hit_tokens += hit as u64;
    }

    /// Registers the blocks of `table` that a step filled, computing tokens
    /// `computed.start..computed.end` (`hashes` as in
    /// [`BlockPool::take_cached_prefix`], extended here). A block whose
    /// content another block already holds stays unregistered.
    pub(crate) fn cache_full_blocks(
        &mut self,
        tokens: &[u32],
        hashes: &mut Vec<BlockHash>,
        table: &[u32],
        computed: std::ops::Range<usize>,
    ) {
        if !self.caching {
            return;
        }
        let bs = self.block_size;
        let full = (computed.end / bs).min(table.len());
        self.extend_hashes(tokens, hashes, full);
        for i in computed.start / bs..full {
            let block = table[i];
            let state = &mut self.blocks[block as usize];
            if state.key.is_some() || self.cached.contains_key(&hashes[i]) {
                continue;
            }
            let key = BlockKey {
                parent: i.checked_sub(1).map(|p| hashes[p]),
                tokens: tokens[i * bs..(i + 1) * bs].into(),
            };
            state.key = Some((hashes[i], key));
            self.cached.insert(hashes[i], block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_is_all_or_nothing_and_release_returns_blocks() {
        let mut a = BlockPool::new(5, 4, false); // 4 usable
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

    /// Admits `tokens` as the engine does: cached prefix, then fresh blocks
    /// for the rest; "computes" it and registers its full blocks.
    fn admit(pool: &mut BlockPool, tokens: &[u32]) -> (Vec<u32>, usize) {
        let mut hashes = Vec::new();
        pool.extend_hashes(tokens, &mut hashes, usize::MAX);
        let mut table = Vec::new();
        let hit = pool.take_cached_prefix(tokens, &hashes, &mut table);
        assert!(pool.grow(&mut table, tokens.len()));
        pool.record_admission(tokens.len(), hit);
        pool.cache_full_blocks(tokens, &mut hashes, &table, hit..tokens.len());
        (table, hit)
    }

    #[test]
    fn a_shared_prefix_is_found_shared_and_never_the_last_token() {
        let mut pool = BlockPool::new(32, 4, true);
        let a: Vec<u32> = (0..10).collect(); // blocks [0..4) [4..8), 2 left over
        let (ta, hit) = admit(&mut pool, &a);
        assert_eq!(hit, 0);
        assert_eq!(pool.num_cached_blocks(), 2);
        // Same first block, different second one.
        let mut b = a.clone();
        b[5] = 99;
        let (tb, hit) = admit(&mut pool, &b);
        assert_eq!(hit, 4);
        assert_eq!(tb[0], ta[0]);
        assert_ne!(tb[1], ta[1]);
        // The same 8 tokens exactly: the last full block is recomputed so
        // one token is left to produce logits.
        let (tc, hit) = admit(&mut pool, &a[..8]);
        assert_eq!(hit, 4);
        assert_eq!(tc[0], ta[0]);
        // A prefix that matches a later block but not the first: no hit.
        let mut d = a.clone();
        d[0] = 77;
        assert_eq!(admit(&mut pool, &d).1, 0);
        assert_eq!(pool.stats().hit_tokens, 8);
        assert_eq!(pool.stats().queried_tokens, 38);
    }

    #[test]
    fn released_blocks_stay_cached_until_evicted_plain_ones_go_first() {
        let mut pool = BlockPool::new(5, 2, true); // 4 usable
        let a = [1, 2, 3, 4, 5];
        let (mut ta, _) = admit(&mut pool, &a); // 3 blocks, 2 cached
        pool.release(&mut ta);
        assert_eq!(pool.num_free_blocks(), 4);
        assert_eq!(pool.num_cached_blocks(), 2);
        // One fresh block: the plain ones go first, the cache survives.
        let mut t = Vec::new();
        assert!(pool.grow(&mut t, 2));
        assert_eq!(pool.num_cached_blocks(), 2);
        let (mut tb, hit) = admit(&mut pool, &a);
        assert_eq!(hit, 4);
        pool.release(&mut tb);
        pool.release(&mut t);
        // Needing every block evicts the cache, tail block first.
        let mut big = Vec::new();
        assert!(pool.grow(&mut big, 6));
        assert_eq!(pool.num_cached_blocks(), 1);
        let mut hashes = Vec::new();
        pool.extend_hashes(&a, &mut hashes, usize::MAX);
        assert_eq!(pool.num_cached_prefix_blocks(&hashes), 1);
        assert!(pool.grow(&mut big, 8));
        assert_eq!(pool.num_cached_blocks(), 0);
        assert_eq!(pool.num_free_blocks(), 0);
    }

    #[test]
    fn a_held_cached_block_is_not_free_and_not_evicted() {
        let mut pool = BlockPool::new(4, 2, true); // 3 usable
        let a = [1, 2, 3];
        let (mut ta, _) = admit(&mut pool, &a); // 2 blocks, 1 cached
        let (tb, hit) = admit(&mut pool, &a); // shares block 0, 1 fresh
        assert_eq!(hit, 2);
        assert_eq!(pool.num_free_blocks(), 0);
        pool.release(&mut ta);
        // Block 0 is still held by b: only a's tail is free.
        assert_eq!(pool.num_free_blocks(), 1);
        let mut t = Vec::new();
        assert!(pool.grow(&mut t, 2));
        assert!(!t.contains(&tb[0]));
        assert_eq!(pool.num_cached_blocks(), 1);
    }

    #[test]
    fn caching_off_never_hits() {
        let mut pool = BlockPool::new(16, 2, false);
        let a = [1, 2, 3, 4, 5];
        admit(&mut pool, &a);
        assert_eq!(admit(&mut pool, &a).1, 0);
        assert_eq!(pool.num_cached_blocks(), 0);
    }
}
