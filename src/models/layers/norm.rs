//! Normalisation layers: RMSNorm, Gemma's RMSNorm with `1 + weight`, and LayerNorm.

use crate::error::Result;
use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

/// One normalisation over the last dimension.
#[derive(Debug, Clone)]
pub enum Norm {
    /// `x / rms(x) * weight`: candle's fused kernel on contiguous input.
    Rms(candle_nn::RmsNorm),
    /// Gemma's RMSNorm as transformers computes it: in F32, scaled by `1 + weight`, then cast
    /// back (GGUF files store `1 + weight` already and use [`Norm::Rms`]).
    GemmaRms {
        /// `1 + weight`, in F32.
        weight_plus_one: Tensor,
        /// Added to the mean square.
        eps: f64,
    },
    /// LayerNorm with weight and bias.
    Layer(candle_nn::LayerNorm),
}

impl Norm {
    /// RMSNorm `weight` `(size,)` from a safetensors prefix.
    pub fn rms(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Norm::Rms(candle_nn::rms_norm(size, eps, vb)?))
    }

    /// Gemma's RMSNorm `weight` `(size,)` from a safetensors prefix.
    pub fn gemma_rms(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(size, "weight")?.to_dtype(DType::F32)?;
        Ok(Norm::GemmaRms {
            weight_plus_one: (weight + 1.0)?,
            eps,
        })
    }

    /// LayerNorm `weight` and `bias` `(size,)` from a safetensors prefix.
    pub fn layer(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Norm::Layer(candle_nn::layer_norm(size, eps, vb)?))
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Norm::Rms(n) => n.forward(x),
            Norm::GemmaRms {
                weight_plus_one,
                eps,
            } => {
                let dtype = x.dtype();
                let x = x.to_dtype(DType::F32)?;
                let var = x.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = x.broadcast_div(&(var + *eps)?.sqrt()?)?;
                normed.broadcast_mul(weight_plus_one)?.to_dtype(dtype)
            }
            Norm::Layer(n) => n.forward(x),
        }
    }
}
