//! Continuous batching: which sequences run in the next step, and how many
//! of their tokens.
//!
//! One token budget per step (`max_num_batched_tokens`) is shared by decodes
//! and prefills, as in vLLM's v1 scheduler: running sequences go first, in
//! arrival order, each taking what it still needs (1 token when decoding, the
//! rest of its prompt, in chunks, when prefilling); then waiting sequences are
//! admitted while the budget, `max_num_seqs` and free KV blocks allow. So new
//! requests join between steps, finished ones leave, and one step can mix
//! prefill chunks and decodes.
//!
//! With prefix caching on, an admitted sequence starts past the blocks of its
//! prompt the cache already holds (see `block_pool`). A waiting sequence
//! whose next uncached block is being computed by this very step waits one
//! step, then finds it cached (SGLang's in-batch prefix sharing): requests
//! that arrive together with a common system prompt compute it once.
//!
//! When a running sequence needs a block and none is free, the newest running
//! sequence is preempted: its blocks are released and it goes back to the
//! front of the queue with its tokens, to be recomputed later (vLLM's
//! `PreemptionMode.RECOMPUTE`). A sequence that could not fit even with the
//! whole cache to itself finishes with `Length` instead of looping forever.
//!
//! The scheduler knows sequences and blocks, not tensors or models.
use std::collections::{HashSet, VecDeque};

use crate::block_pool::{BlockHash, BlockPool};
use crate::request::{FinishReason, Sequence, SequenceStatus};

/// Limits of one step.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences in the running batch at most.
    pub max_num_seqs: usize,
    /// Tokens processed by one step at most.
    pub max_num_batched_tokens: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScheduledSeq {
    /// Index into [`Scheduler::running`].
    pub index: usize,
    /// Tokens to process, from `num_computed_tokens` on.
    pub num_tokens: usize,
}

/// The plan for one step.
#[derive(Debug, Default)]
pub(crate) struct SchedulerOutput {
    pub scheduled: Vec<ScheduledSeq>,
    /// Sequences preempted by this step (for logs and metrics).
    pub num_preempted: usize,
}

/// Queues, the running batch and the block pool.
#[derive(Debug)]
pub(crate) struct Scheduler {
    config: SchedulerConfig,
    pub pool: BlockPool,
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    /// Sequences finished outside a forward pass (cache too small for them),
    /// reported by the next step.
    pub finished_early: Vec<Sequence>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, pool: BlockPool) -> Self {
        Self {
            config,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished_early: Vec::new(),
        }
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn has_unfinished(&self) -> bool {
        self.num_unfinished() > 0
    }

    /// Whether a step would do anything: a sequence waits for admission or
    /// can compute, or a finish is to be reported. Sequences waiting only
    /// for their reply stream to grow are unfinished but not runnable.
    pub fn has_runnable(&self) -> bool {
        let running = self
            .running
            .iter()
            .any(|s| s.is_finished() || s.num_schedulable() > 0);
        // A waiting head that finds no room (every slot, or every block,
        // held by sequences waiting for their streams) waits for those
        // streams too: admission never preempts. (With a few blocks free it
        // counts as runnable: a first prefill chunk may fit.)
        let admittable = self.waiting.front().is_some_and(|head| {
            self.running.len() < self.config.max_num_seqs
                && (self.pool.num_free_blocks() > 0 || !self.fits_alone(head.tokens.len() + 1))
        });
        running || admittable || !self.finished_early.is_empty()
    }

    /// A waiting or running sequence.
    pub fn get_mut(&mut self, request_id: &str) -> Option<&mut Sequence> {
        self.waiting
            .iter_mut()
            .chain(self.running.iter_mut())
            .find(|s| s.request_id == request_id)
    }

    /// Requests waiting, running or finished but not yet taken out.
    pub fn num_unfinished(&self) -> usize {
        self.waiting.len() + self.running.len() + self.finished_early.len()
    }

    /// Removes a request wherever it is, releasing its blocks.
    pub fn remove(&mut self, request_id: &str) -> Option<Sequence> {
        let mut seq = if let Some(i) = self.waiting.iter().position(|s| s.request_id == request_id)
        {
            self.waiting.remove(i)
        } else if let Some(i) = self.running.iter().position(|s| s.request_id == request_id) {
            Some(self.running.remove(i))
        } else {
            let i = self
                .finished_early
                .iter()
                .position(|s| s.request_id == request_id)?;
            Some(self.finished_early.remove(i))
        }?;
        self.pool.release(&mut seq.block_table);
        Some(seq)
    }

    /// Takes finished sequences out of the running batch, releasing blocks.
    pub fn take_finished(&mut self) -> Vec<Sequence> {
        let mut done = std::mem::take(&mut self.finished_early);
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].is_finished() {
                let mut seq = self.running.remove(i);
                self.pool.release(&mut seq.block_table);
                done.push(seq);
            } else {
                i += 1;
            }
        }
        done
    }

    fn fits_alone(&self, num_tokens: usize) -> bool {
        self.pool.blocks_for(num_tokens) <= self.pool.num_usable_blocks()
    }

    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        self.pool.release(&mut seq.block_table);
        seq.num_computed_tokens = 0;
        seq.status = SequenceStatus::Waiting;
        seq.metrics.num_preemptions += 1;
        tracing::debug!(
            target: "omni::engine",
            request_id = %seq.request_id,
            tokens = seq.tokens.len(),
            "preempted (will recompute)"
        );
        self.waiting.push_front(seq);
    }

    fn finish_too_long(&mut self, mut seq: Sequence) {
        self.pool.release(&mut seq.block_table);
        tracing::warn!(
            target: "omni::engine",
            request_id = %seq.request_id,
            tokens = seq.tokens.len(),
            "sequence outgrew the whole KV cache; finishing with reason length"
        );
        seq.status = SequenceStatus::Finished(FinishReason::Length);
        self.finished_early.push(seq);
    }

    /// Plans the next step. Never fails: when blocks run out it preempts.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.config.max_num_batched_tokens;
        // Oldest first, so preemption (from the back) hits the newest.
        self.running.sort_by_key(|s| s.arrival_index);
        // Full blocks this step computes, for in-batch prefix sharing.
        let mut pending = HashSet::new();

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let n = self.running[i].num_schedulable().min(budget);
            if n == 0 {
                // Waiting for its reply stream; it keeps its blocks.
                i += 1;
                continue;
            }
            let need = self.running[i].num_computed_tokens + n;
            if !self.fits_alone(need) {
                let seq = self.running.remove(i);
                self.finish_too_long(seq);
                continue;
            }
            let mut scheduled_self = true;
            loop {
                let seq = &mut self.running[i];
                if self.pool.grow(&mut seq.block_table, need) {
                    break;
                }
                let victim = self.running.len() - 1;
                self.preempt(victim);
                out.num_preempted += 1;
                if victim == i {
                    scheduled_self = false;
                    break;
                }
            }
            if !scheduled_self {
                break;
            }
            self.note_pending(i, n, &mut pending);
            out.scheduled.push(ScheduledSeq {
                index: i,
                num_tokens: n,
            });
            budget -= n;
            i += 1;
        }

        // Admit waiting sequences, unless this step already had to preempt
        // (admitting now would only preempt again).
        if out.num_preempted == 0 {
            self.admit(&mut budget, &mut pending, &mut out);
        }
        out
    }

    /// Admits waiting sequences, in order, while the budget, `max_num_seqs`
    /// and free blocks allow.
    fn admit(
        &mut self,
        budget: &mut usize,
        pending: &mut HashSet<BlockHash>,
        out: &mut SchedulerOutput,
    ) {
        let mut j = 0;
        while *budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(len) = self.waiting.get(j).map(|s| s.tokens.len()) else {
                break;
            };
            if !self.fits_alone(len + 1) {
                if let Some(seq) = self.waiting.remove(j) {
                    self.finish_too_long(seq);
                }
                continue;
            }
            let seq = &mut self.waiting[j];
            // Placeholder ids stand for embeddings the ids do not name: such
            // a sequence's blocks are neither looked up nor offered.
            let shares = seq.inputs.is_none();
            if self.pool.prefix_caching() && shares {
                self.pool
                    .extend_hashes(&seq.tokens, &mut seq.block_hashes, usize::MAX);
                let next = self
                    .pool
                    .next_uncached_block(seq.tokens.len(), &seq.block_hashes);
                if next.is_some_and(|h| pending.contains(&h)) {
                    j += 1;
                    continue;
                }
            }
            let mut table = Vec::new();
            // A request that wants the states (or prompt log-probabilities)
            // of every position it reads must read them all: cached blocks
            // would skip them.
            let hit = if seq.params.output_states || seq.params.prompt_logprobs.is_some() || !shares
            {
                0
            } else {
                self.pool
                    .take_cached_prefix(&seq.tokens, &seq.block_hashes, &mut table)
            };
            let n = seq.num_schedulable().saturating_sub(hit).min(*budget);
            if n == 0 {
                self.pool.release(&mut table);
                j += 1;
                continue;
            }
            if !self.pool.grow(&mut table, hit + n) {
                self.pool.release(&mut table);
                break;
            }
            let Some(mut seq) = self.waiting.remove(j) else {
                break;
            };
            self.pool.record_admission(seq.tokens.len(), hit);
            seq.block_table = table;
            seq.num_computed_tokens = hit;
            if seq.metrics.num_preemptions == 0 {
                seq.metrics.num_cached_tokens = hit;
            }
            seq.status = SequenceStatus::Running;
            self.running.push(seq);
            let index = self.running.len() - 1;
            self.note_pending(index, n, pending);
            out.scheduled.push(ScheduledSeq {
                index,
                num_tokens: n,
            });
            *budget -= n;
        }
    }

    /// Records the full blocks that `num_tokens` more tokens of running
    /// sequence `index` complete.
    fn note_pending(&mut self, index: usize, num_tokens: usize, pending: &mut HashSet<BlockHash>) {
        if !self.pool.prefix_caching() || self.running[index].inputs.is_some() {
            return;
        }
        let seq = &mut self.running[index];
        let bs = self.pool.block_size();
        let first = seq.num_computed_tokens / bs;
        let end = (seq.num_computed_tokens + num_tokens) / bs;
        self.pool
            .extend_hashes(&seq.tokens, &mut seq.block_hashes, end);
        pending.extend(seq.block_hashes.iter().take(end).skip(first));
    }

    /// Records that a step computed `num_tokens` more tokens of running
    /// sequence `index`, and offers its newly filled blocks to the cache.
    pub fn advance(&mut self, index: usize, num_tokens: usize) {
        let seq = &mut self.running[index];
        let start = seq.num_computed_tokens;
        seq.num_computed_tokens += num_tokens;
        if seq.inputs.is_some() {
            return;
        }
        self.pool.cache_full_blocks(
            &seq.tokens,
            &mut seq.block_hashes,
            &seq.block_table,
            start..seq.num_computed_tokens,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling_params::SamplingParams;

    fn limits(max_num_seqs: usize, max_num_batched_tokens: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens,
        }
    }

    /// A sequence whose tokens differ from other ids' (unless they share a
    /// first letter), so the prefix cache stays out of the way.
    fn seq(id: &str, len: usize, arrival: u64) -> Sequence {
        let salt = 1000 * u32::from(id.as_bytes()[0]);
        Sequence::new(
            id.to_owned(),
            (0..len as u32).map(|k| salt + k).collect(),
            SamplingParams::greedy(),
            0,
            arrival,
        )
    }

    /// Pretends the step ran: computed tokens advance, finished prefills
    /// gain one sampled token.
    fn run(s: &mut Scheduler, out: &SchedulerOutput) {
        for sc in &out.scheduled {
            s.advance(sc.index, sc.num_tokens);
            let seq = &mut s.running[sc.index];
            if seq.num_computed_tokens == seq.tokens.len() {
                seq.tokens.push(2);
            }
        }
    }

    #[test]
    fn prefill_chunks_and_decodes_share_the_budget() {
        let cfg = limits(4, 8);
        let mut s = Scheduler::new(cfg, BlockPool::new(64, 4, true));
        s.add(seq("a", 3, 0));
        s.add(seq("b", 10, 1));
        let out = s.schedule();
        assert_eq!(
            out.scheduled,
            vec![
                ScheduledSeq {
                    index: 0,
                    num_tokens: 3
                },
                ScheduledSeq {
                    index: 1,
                    num_tokens: 5
                }
            ]
        );
        run(&mut s, &out);
        let out = s.schedule();
        // a decodes (1), b finishes its prompt (5).
        assert_eq!(
            out.scheduled,
            vec![
                ScheduledSeq {
                    index: 0,
                    num_tokens: 1
                },
                ScheduledSeq {
                    index: 1,
                    num_tokens: 5
                }
            ]
        );
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_recomputes() {
        let cfg = limits(8, 64);
        // 4 usable blocks of 2 tokens.
        let mut s = Scheduler::new(cfg, BlockPool::new(5, 2, true));
        s.add(seq("old", 3, 0));
        s.add(seq("new", 3, 1));
        let out = s.schedule();
        assert_eq!(out.scheduled.len(), 2);
        run(&mut s, &out); // both hold 2 blocks, 4 tokens each
        let out = s.schedule(); // both fit: 4 tokens in 2 blocks
        assert_eq!(out.num_preempted, 0);
        run(&mut s, &out); // 5 tokens each: next step needs a 3rd block each
        let out = s.schedule();
        assert_eq!(out.num_preempted, 1);
        assert_eq!(s.running.len(), 1);
        assert_eq!(s.running[0].request_id, "old");
        assert_eq!(s.waiting[0].request_id, "new");
        assert_eq!(s.waiting[0].num_computed_tokens, 0);
        assert!(s.waiting[0].block_table.is_empty());
        assert_eq!(s.pool.num_free_blocks(), 1);
    }

    #[test]
    fn a_sequence_larger_than_the_cache_finishes_with_length() {
        let cfg = limits(8, 64);
        let mut s = Scheduler::new(cfg, BlockPool::new(3, 2, true)); // 4 tokens
        s.add(seq("huge", 9, 0));
        let out = s.schedule();
        assert!(out.scheduled.is_empty());
        let done = s.take_finished();
        assert_eq!(done.len(), 1);
        assert_eq!(
            done[0].status,
            SequenceStatus::Finished(FinishReason::Length)
        );
        assert!(!s.has_unfinished());
    }

    #[test]
    fn requests_sharing_a_prefix_compute_it_once() {
        let cfg = limits(8, 64);
        let mut s = Scheduler::new(cfg, BlockPool::new(64, 4, true));
        // "s1" and "s2" share their first 8 tokens (2 blocks); "x" shares
        // nothing and is not held up.
        let mut s2 = seq("s2", 10, 1);
        s2.tokens[9] = 7;
        s.add(seq("s1", 10, 0));
        s.add(s2);
        s.add(seq("x", 6, 2));
        let out = s.schedule();
        let ids: Vec<&str> = out
            .scheduled
            .iter()
            .map(|sc| s.running[sc.index].request_id.as_str())
            .collect();
        assert_eq!(ids, ["s1", "x"], "s2 waits for s1's blocks");
        run(&mut s, &out);
        let out = s.schedule();
        let last = out.scheduled.last().copied();
        let s2 = last.map(|sc| (&s.running[sc.index], sc.num_tokens));
        let (s2, n) = s2.unwrap_or_else(|| panic!("s2 not admitted"));
        assert_eq!(s2.request_id, "s2");
        assert_eq!((s2.num_computed_tokens, n), (8, 2));
        assert_eq!(s2.metrics.num_cached_tokens, 8);
        assert_eq!(s2.block_table[..2], s.running[0].block_table[..2]);
        assert_eq!(s.pool.stats().hit_tokens, 8);
    }

    #[test]
    fn a_preempted_sequence_finds_its_own_blocks_again() {
        let cfg = limits(8, 64);
        // 5 usable blocks of 2 tokens.
        let mut s = Scheduler::new(cfg, BlockPool::new(6, 2, true));
        s.add(seq("old", 3, 0));
        s.add(seq("new", 5, 1));
        let out = s.schedule(); // old 2 blocks, new 3 blocks
        run(&mut s, &out);
        let out = s.schedule(); // old: 4 tokens; new: 6 tokens -> no more blocks
        assert_eq!(out.num_preempted, 0);
        run(&mut s, &out);
        // old needs a 3rd block: new is preempted, and its tail block, the
        // first to be evicted, goes to old.
        let out = s.schedule();
        assert_eq!(out.num_preempted, 1);
        run(&mut s, &out);
        // old finishes and leaves; new comes back and finds its head blocks.
        s.running[0].status = SequenceStatus::Finished(FinishReason::Length);
        assert_eq!(s.take_finished().len(), 1);
        let out = s.schedule();
        assert_eq!(out.scheduled.len(), 1);
        let new = &s.running[out.scheduled[0].index];
        assert_eq!(new.request_id, "new");
        assert_eq!(new.num_computed_tokens, 4);
        assert_eq!(out.scheduled[0].num_tokens, 3);
    }
}
