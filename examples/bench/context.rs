//! `context`: not a measurement. The context one sequence of `--model` gets in llm-pool (the
//! model's own, capped by a `max_context` among the `--model-config` lines, as a worker
//! resolves it), for sizing another server to match: llama-server divides its `-c` among its
//! `-np` slots, so `scripts/bench-concurrency` gives it `-c` = slots x this.

use crate::harness::{model_config_with, Bench};
use anyhow::Result;
use llm_pool::models::{LoadOptions, Model};
use serde_json::json;

pub(crate) fn run(b: &Bench) -> Result<()> {
    let name = &b.model_name;
    let model = match Model::load(&b.o.model, &LoadOptions::cpu()) {
        Ok(m) => m,
        Err(e) => return b.skip("llm-pool", "context", name, &format!("{e:#}")),
    };
    let config = model_config_with("m", &b.o.model, 1, &b.o.model_config)?;
    let own = model.info().max_context;
    // As a worker resolves it: 0 keeps the model's own.
    let context = match config.max_context {
        0 => own,
        cap => cap.min(own),
    };
    b.emit(
        "llm-pool",
        "context",
        name,
        "context_per_sequence",
        "tokens",
        &[context as f64],
        json!({"model_context": own, "max_context": config.max_context}),
    );
    Ok(())
}
