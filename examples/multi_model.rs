//! Two models generating in parallel from one pool, each on its own worker thread.
//!
//! ```sh
//! scripts/fetch-models
//! cargo run --release --example multi_model
//! ```

use llm_pool::config::{Config, ModelConfig};
use llm_pool::pool::{GenerateRequest, Pool};
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config {
        models: vec![
            ModelConfig::new("smollm2", "models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ModelConfig::new("gemma3", "models/gemma-3-270m-q4_k_m.gguf"),
        ],
        ..Config::default()
    };
    let pool = Pool::start(config).await?;
    let started = Instant::now();
    let (a, b) = tokio::join!(
        pool.generate(
            "smollm2",
            GenerateRequest::text("Once upon a time").max_tokens(32)
        ),
        pool.generate(
            "gemma3",
            GenerateRequest::text("Once upon a time").max_tokens(32)
        ),
    );
    let elapsed = started.elapsed();
    for (name, result) in [("smollm2", a?), ("gemma3", b?)] {
        println!(
            "{name}: {:?} ({} tokens in {:.2}s)",
            result.text.as_deref().unwrap_or_default(),
            result.completion_tokens(),
            result.duration.as_secs_f64()
        );
    }
    println!("both done in {:.2}s", elapsed.as_secs_f64());
    pool.shutdown().await;
    Ok(())
}
