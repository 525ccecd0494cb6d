//! Yi from a Hugging Face directory.
//!
//! Yi checkpoints are Llama-shaped (GQA, RMSNorm, SwiGLU, untied head); the original ones name
//! themselves `model_type: "Yi"`. candle's own `yi` model cannot be configured from a
//! config.json (its config fields are private, with only two hard-coded presets), so this
//! adapter runs the Llama implementation, which computes the same network.

use super::llama::{config_from_hf, Network};
use crate::error::Result;
use crate::models::hf::HfConfig;
use crate::models::{Adapter, Architecture, LoadOptions, ModelSource, Names};

/// Yi, as registered: Llama's network under its own name.
pub struct Yi;

impl Architecture for Yi {
    const NAMES: Names = Names::hf("yi", &["Yi", "yi"], &["YiForCausalLM"]);
    type Network = Network;

    fn load(source: ModelSource, options: &LoadOptions) -> Result<Adapter<Self>> {
        let config = |c: &HfConfig| config_from_hf(c, Self::NAME);
        Adapter::load_hf(source, options, config, Network::load)
    }
}
