//! `step`: the model's batched decode step alone (`Model::forward_batch_into`), per batch size:
//! aggregate tok/s of one token per sequence per step and the ratio to one sequence, the
//! ceiling continuous batching can reach before sampling, queues and HTTP.

use crate::harness::{secs, Bench, Stats};
use anyhow::Result;
use llm_pool::models::{LoadOptions, Model};
use serde_json::json;
use std::time::Instant;

/// `step`: per batch size, `gen` batched decode steps (one token per sequence) after a prefill
/// of the stream prompt in every slot; tok/s of the decode steps and the ratio to batch 1.
pub(crate) fn run(b: &Bench) -> Result<()> {
    use llm_pool::models::SequenceChunk;
    let mut model = Model::load(&b.o.model, &LoadOptions::cpu())?;
    // Every slot is reset before its prefill, which is not timed: one prompt serves them all.
    let prompt = b.stream_prompt();
    b.check_vocab(&prompt)?;
    let sizes = b.o.streams.clone().unwrap_or(if b.o.smoke {
        vec![1, 2]
    } else {
        vec![1, 2, 4, 8, 16]
    });
    let mut logits = Vec::new();
    let mut single = None;
    for &n in &sizes {
        model.set_slots(n)?;
        let mut rates = Vec::with_capacity(b.reps);
        for run in 0..b.runs() {
            for slot in 0..n {
                model.reset_slot(slot)?;
            }
            let chunks: Vec<_> = (0..n)
                .map(|slot| SequenceChunk {
                    slot,
                    tokens: &prompt,
                    position: 0,
                })
                .collect();
            model.forward_batch_into(&chunks, &mut logits)?;
            let started = Instant::now();
            for step in 0..b.gen {
                // The same token for every sequence: a step's cost does not depend on it.
                let token = [prompt[step % prompt.len()]];
                let chunks: Vec<_> = (0..n)
                    .map(|slot| SequenceChunk {
                        slot,
                        tokens: &token,
                        position: prompt.len() + step,
                    })
                    .collect();
                model.forward_batch_into(&chunks, &mut logits)?;
            }
            if run >= b.warmup {
                rates.push((n * b.gen) as f64 / secs(started.elapsed()));
            }
        }
        let median = Stats::of(&rates).median;
        let base = *single.get_or_insert(if n == 1 { median } else { f64::NAN });
        let ratio = median / base;
        b.emit(
            "llm-pool",
            "step",
            &b.model_name,
            &format!("batch{n}"),
            "tok/s",
            &rates,
            json!({"batch": n, "vs_batch1": ratio, "gen": b.gen, "prompt": prompt.len()}),
        );
        if ratio.is_finite() {
            eprintln!("{:>58} {ratio:.2}x batch 1", "");
        }
    }
    Ok(())
}
