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
//! When a running sequence needs a block and none is free, the newest running
//! sequence is preempted: its blocks are released and it goes back to the
//! front of the queue with its tokens, to be recomputed later (vLLM's
//! `PreemptionMode.RECOMPUTE`). A sequence that could not fit even with the
//! whole cache to itself finishes with `Length` instead of looping forever.
//!
//! The scheduler knows sequences and blocks, not tensors or models.
use std::collections::VecDeque;

use crate::kv_cache::BlockAllocator;
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

/// Queues, the running batch and the block allocator.
#[derive(Debug)]
pub(crate) struct Scheduler {
    config: SchedulerConfig,
    pub allocator: BlockAllocator,
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    /// Sequences finished outside a forward pass (cache too small for them),
    /// reported by the next step.
    pub finished_early: Vec<Sequence>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, allocator: BlockAllocator) -> Self {
        Self {
            config,
            allocator,
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished_early: Vec::new(),
        }
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.finished_early.is_empty()
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
        self.allocator.release(&mut seq.block_table);
        Some(seq)
    }

    /// Takes finished sequences out of the running batch, releasing blocks.
    pub fn take_finished(&mut self) -> Vec<Sequence> {
        let mut done = std::mem::take(&mut self.finished_early);
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].is_finished() {
                let mut seq = self.running.remove(i);
                self.allocator.release(&mut seq.block_table);
                done.push(seq);
            } else {
                i += 1;
            }
        }
        done
    }

    fn fits_alone(&self, num_tokens: usize) -> bool {
        self.allocator.blocks_for(num_tokens) <= self.allocator.num_usable_blocks()
    }

    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        self.allocator.release(&mut seq.block_table);
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
        self.allocator.release(&mut seq.block_table);
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

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let n = self.running[i].num_uncomputed().min(budget);
            let need = self.running[i].num_computed_tokens + n;
            if !self.fits_alone(need) {
                let seq = self.running.remove(i);
                self.finish_too_long(seq);
                continue;
            }
            let mut scheduled_self = true;
            loop {
                let seq = &mut self.running[i];
                if self.allocator.grow(&mut seq.block_table, need) {
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
            while budget > 0 && self.running.len() < self.config.max_num_seqs {
                let Some(front) = self.waiting.front() else {
                    break;
                };
                if !self.fits_alone(front.tokens.len() + 1) {
                    if let Some(seq) = self.waiting.pop_front() {
                        self.finish_too_long(seq);
                    }
                    continue;
                }
                let n = front.num_uncomputed().min(budget);
                let mut table = Vec::new();
                if !self.allocator.grow(&mut table, n) {
                    break;
                }
                let Some(mut seq) = self.waiting.pop_front() else {
                    break;
                };
                seq.block_table = table;
                seq.status = SequenceStatus::Running;
                self.running.push(seq);
                out.scheduled.push(ScheduledSeq {
                    index: self.running.len() - 1,
                    num_tokens: n,
                });
                budget -= n;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling_params::SamplingParams;

    fn seq(id: &str, len: usize, arrival: u64) -> Sequence {
        Sequence::new(
            id.to_owned(),
            vec![1; len],
            SamplingParams::greedy(),
            0,
            arrival,
        )
    }

    /// Pretends the step ran: computed tokens advance, finished prefills
    /// gain one sampled token.
    fn run(s: &mut Scheduler, out: &SchedulerOutput) {
        for sc in &out.scheduled {
            let seq = &mut s.running[sc.index];
            seq.num_computed_tokens += sc.num_tokens;
            if seq.num_computed_tokens == seq.tokens.len() {
                seq.tokens.push(2);
            }
        }
    }

    #[test]
    fn prefill_chunks_and_decodes_share_the_budget() {
        let cfg = SchedulerConfig {
            max_num_seqs: 4,
            max_num_batched_tokens: 8,
        };
        let mut s = Scheduler::new(cfg, BlockAllocator::new(64, 4));
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
        let cfg = SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
        };
        // 4 usable blocks of 2 tokens.
        let mut s = Scheduler::new(cfg, BlockAllocator::new(5, 2));
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
        assert_eq!(s.allocator.num_free_blocks(), 1);
    }

    #[test]
    fn a_sequence_larger_than_the_cache_finishes_with_length() {
        let cfg = SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
        };
        let mut s = Scheduler::new(cfg, BlockAllocator::new(3, 2)); // 4 tokens
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
}
