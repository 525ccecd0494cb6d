//! Phi-2 GGUF files (`general.architecture = phi2`), run by candle's `quantized_phi`.
//!
//! What this adapter hides about candle's model:
//!
//! - It has no `clear_kv_cache`, and its causal-mask cache grows with every new
//!   `(prompt length, cache length)` pair. The reset therefore swaps in a pristine clone taken
//!   at load time ([`Pristine`]): the clone shares the weights, RoPE tables and the `-inf`
//!   constant (all read-only: candle never writes them in place), and brings back an empty KV
//!   cache (`Option`, replaced rather than written on every step) and an empty mask cache.
//! - Its RoPE table is fixed at 4096 positions and its RoPE base at 10000, whatever the file
//!   says. The context reported here is capped at the table, and a file declaring another base
//!   or a RoPE scaling is refused instead of silently computing something else.
//! - It splits the fused `attn_qkv` projection as `(3, heads, head_dim)`, so it cannot run
//!   grouped-query attention, and it needs the fused tensor (files converted from the newer
//!   Hugging Face layout carry separate `attn_q`/`attn_k`/`attn_v`). Both are checked here so
//!   the error names the problem instead of a shape mismatch deep in a forward pass.

use crate::error::{Error, Result};
use crate::models::adapter::{Pristine, StockGguf};
use crate::models::gguf::GgufFile;
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};
use candle_transformers::models::quantized_phi::{ModelWeights as Weights, MAX_SEQ_LEN};

/// `general.architecture` of the files this adapter loads.
const ARCH: &str = "phi2";
/// The RoPE base candle's `quantized_phi` hard-codes.
const ROPE_BASE: f64 = 10_000.0;

/// Quantized Phi-2, as registered: candle's model, reset to a pristine clone.
pub struct QuantizedPhi2;

/// The vocabulary size and the context (capped at candle's RoPE table), after checking
/// everything candle's loader reads (and what it silently ignores).
fn config_from_gguf(file: &mut GgufFile) -> Result<(usize, usize)> {
    let heads = file.count("phi2.attention.head_count")?;
    let kv_heads = file.count("phi2.attention.head_count_kv")?;
    file.count("phi2.block_count")?;
    let rope_dim = file.count("phi2.rope.dimension_count")?;
    file.positive("phi2.attention.layer_norm_epsilon", None)?;
    if kv_heads != heads {
        return Err(file.config_error("phi2.attention.head_count_kv",
            format!("is {kv_heads} but candle's quantized phi2 needs it equal to head_count ({heads}): it has no grouped-query attention"),
        ));
    }
    let head_dim = file.derived_head_dim(ARCH, heads)?;
    if rope_dim > head_dim || rope_dim % 2 != 0 {
        return Err(file.config_error(
            "phi2.rope.dimension_count",
            format!("must be even and at most the head size {head_dim}, found {rope_dim}"),
        ));
    }
    check_rope_base(file, ARCH)?;
    file.rope_scaling(ARCH, &["none"])?;
    let tensors = &file.content.tensor_infos;
    if !tensors.contains_key("blk.0.attn_qkv.weight") && tensors.contains_key("blk.0.attn_q.weight")
    {
        return Err(Error::model_file(
            &file.path,
            "this phi2 file has separate attn_q/attn_k/attn_v tensors; candle's quantized phi2 needs the fused blk.N.attn_qkv layout",
        ));
    }
    Ok((
        file.checked_vocab_size(ARCH, false)?,
        file.context_length(ARCH, MAX_SEQ_LEN)?,
    ))
}

/// candle's model, after our checks of the metadata.
const STOCK: StockGguf<Weights> = StockGguf {
    config: config_from_gguf,
    from_gguf: Weights::from_gguf,
    forward: Weights::forward,
};

/// candle's quantized Phi models hard-code their RoPE base; a file that states another one is
/// refused rather than run with the wrong one.
pub(super) fn check_rope_base(file: &GgufFile, arch: &str) -> Result<()> {
    let key = format!("{arch}.rope.freq_base");
    match file.opt_f64(&key)? {
        Some(base) if (base - ROPE_BASE).abs() > 1e-3 => Err(file.config_error(
            &key,
            format!("is {base}, but candle's quantized {arch} hard-codes {ROPE_BASE}"),
        )),
        _ => Ok(()),
    }
}

impl Architecture for QuantizedPhi2 {
    const NAMES: Names = Names::gguf("quantized_phi2", &[ARCH]);
    type Network = Pristine<Weights>;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        Adapter::load_stock_gguf(source, options, STOCK)
    }
}
