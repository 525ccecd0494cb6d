//! `multi`: two models in one pool, each generating alone and then both at once (one replica
//! each): tok/s of each alone and together, and the aggregate together.

use crate::harness::{label_of, model_config, pool_run, secs, start_pool, Bench};
use anyhow::Result;
use serde_json::json;
use std::time::Instant;

pub(crate) async fn run(b: &Bench) -> Result<()> {
    let name_a = b.model_name.clone();
    let mut name_b = label_of(&b.o.model2);
    let pool = match start_pool(
        b,
        vec![
            model_config("a", &b.o.model, 1),
            model_config("b", &b.o.model2, 1),
        ],
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            b.skip(
                "llm-pool",
                "multi",
                &name_b,
                &format!("second model fails to load ({e:#}); using two copies of {name_a}"),
            )?;
            name_b = format!("{name_a} (2nd copy)");
            start_pool(
                b,
                vec![
                    model_config("a", &b.o.model, 1),
                    model_config("b", &b.o.model, 1),
                ],
            )
            .await?
        }
    };
    // The tg prompt (1 token): with the 8-token prompt Gemma-3 ends at once (end of sequence).
    // One token cannot be served from a cache, so it may repeat (pool_run checks all the same).
    let prompt = b.tg_prompt()?;
    let pair = format!("{name_a} + {name_b}");
    let (mut alone_a, mut alone_b, mut tog_a, mut tog_b, mut agg) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut last_tokens = (0, 0);
    for run in 0..b.runs() {
        let a = pool_run(&pool, "a", &prompt, b.gen, Instant::now()).await?;
        let bb = pool_run(&pool, "b", &prompt, b.gen, Instant::now()).await?;
        let t0 = Instant::now();
        let (x, y) = tokio::join!(
            pool_run(&pool, "a", &prompt, b.gen, t0),
            pool_run(&pool, "b", &prompt, b.gen, t0)
        );
        let wall = t0.elapsed();
        let (x, y) = (x?, y?);
        last_tokens = (a.tokens, bb.tokens);
        if run >= b.warmup {
            alone_a.push(a.tokens as f64 / secs(a.total));
            alone_b.push(bb.tokens as f64 / secs(bb.total));
            tog_a.push(x.tokens as f64 / secs(x.total));
            tog_b.push(y.tokens as f64 / secs(y.total));
            agg.push((x.tokens + y.tokens) as f64 / secs(wall));
        }
    }
    let g = b.gen;
    let tokens = json!({"tokens_a": last_tokens.0, "tokens_b": last_tokens.1});
    b.emit(
        "llm-pool",
        "multi",
        &name_a,
        &format!("alone_tg{g}"),
        "tok/s",
        &alone_a,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "multi",
        &name_b,
        &format!("alone_tg{g}"),
        "tok/s",
        &alone_b,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "multi",
        &name_a,
        &format!("together_tg{g}"),
        "tok/s",
        &tog_a,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "multi",
        &name_b,
        &format!("together_tg{g}"),
        "tok/s",
        &tog_b,
        json!({}),
    );
    b.emit(
        "llm-pool",
        "multi",
        &pair,
        &format!("together_aggregate_tg{g}"),
        "tok/s",
        &agg,
        tokens.clone(),
    );
    pool.shutdown().await;
    b.emit_rss(
        "llm-pool",
        "multi",
        &pair,
        llm_pool::resources::peak_rss_bytes(),
    );
    Ok(())
}
