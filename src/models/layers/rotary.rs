//! Rotary position embeddings, computed for the positions of each forward.
//!
//! Nothing is tabulated: each forward computes cos and sin for exactly its own positions, so
//! memory does not grow with the context a model declares (a table for Gemma 3's 128k
//! positions at head size 256 is 128 MiB). The angles are F32 positions times F32 inverse
//! frequencies, as transformers computes them (a table in BF16 would round the positions
//! themselves); only cos and sin are cast to the activations' dtype.
//!
//! The variants the architectures need are settings of one [`Rotary`]: the inverse
//! frequencies (plain, or scaled by the architecture's rule: linear, LongRoPE, YaRN), a factor
//! on the positions (llama.cpp's linear scaling), a factor on cos and sin (LongRoPE's and
//! YaRN's attention factor), partial rotation (Phi) and interleaved pairs (DeepSeek).

use crate::error::Result;
use crate::models::gguf::RopeSettings;
use candle_core::{DType, Device, Tensor, D};

/// How the inverse frequencies `1 / theta^(2i / dim)` are rounded to F32. They agree to an
/// ulp; each architecture keeps the rounding its logits were checked with, so that moving it
/// onto these blocks changed no logit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Computed in f64, rounded once.
    F64,
    /// `theta^(2i / dim)` in f64 rounded to f32, then inverted in f32 (as candle's Qwen2,
    /// Mixtral and StarCoder2 files compute them, which ours were adapted from).
    F32Inverse,
    /// f32 throughout, as llama.cpp and candle's quantized models compute them.
    F32,
}

/// The inverse frequencies of RoPE over `dim` dimensions, one per rotated pair.
pub fn inv_freq(dim: usize, theta: f64, rounding: Rounding) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .map(|i| match rounding {
            Rounding::F64 => (1.0 / theta.powf(i as f64 / dim as f64)) as f32,
            Rounding::F32Inverse => 1f32 / theta.powf(i as f64 / dim as f64) as f32,
            Rounding::F32 => 1f32 / (theta as f32).powf(i as f32 / dim as f32),
        })
        .collect()
}

/// Linear RoPE scaling as transformers applies it: the inverse frequencies divided by
/// `factor`, computed in f64 and rounded once (a factor of 1 gives [`Rounding::F64`]'s).
pub fn inv_freq_linear(dim: usize, theta: f64, factor: f64) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .map(|i| (1.0 / theta.powf(i as f64 / dim as f64) / factor) as f32)
        .collect()
}

/// Which dimensions of a head are paired for rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairing {
    /// `x[i]` with `x[i + d/2]`: GPT-NeoX style, what most checkpoints use.
    Halves,
    /// `x[2i]` with `x[2i + 1]`: the complex-number form (DeepSeek).
    Interleaved,
}

/// RoPE over the first `2 * inv_freq.len()` dimensions of each head.
#[derive(Debug, Clone)]
pub struct Rotary {
    /// `(1, rotary_dim / 2)`, F32.
    inv_freq: Tensor,
    rotary_dim: usize,
    /// Multiplies the positions (1 for none).
    position_scale: f64,
    /// Multiplies cos and sin (1 for none).
    attention_factor: f64,
    pairing: Pairing,
}

/// cos and sin for the positions of one forward, each `(seq_len, rotary_dim / 2)`.
#[derive(Debug, Clone)]
pub struct CosSin {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// RoPE with these inverse frequencies (one per rotated pair), rotating the halves of the
    /// first `2 * inv_freq.len()` dimensions.
    pub fn new(inv_freq: Vec<f32>, device: &Device) -> Result<Self> {
        let n = inv_freq.len();
        Ok(Rotary {
            inv_freq: Tensor::from_vec(inv_freq, (1, n), device)?,
            rotary_dim: 2 * n,
            position_scale: 1.0,
            attention_factor: 1.0,
            pairing: Pairing::Halves,
        })
    }

    /// Multiplies the positions by `scale` before the angles are taken (llama.cpp's linear
    /// scaling, `1 / factor`).
    pub fn with_position_scale(mut self, scale: f64) -> Self {
        self.position_scale = scale;
        self
    }

    /// Multiplies cos and sin by `factor` (LongRoPE's and YaRN's attention factor).
    pub fn with_attention_factor(mut self, factor: f64) -> Self {
        self.attention_factor = factor;
        self
    }

    /// Applies the scaling a GGUF file states ([`RopeSettings`]): its position scale and
    /// its attention factor.
    pub fn with_settings(self, rope: &RopeSettings) -> Self {
        self.with_position_scale(rope.position_scale)
            .with_attention_factor(rope.attention_factor)
    }

    /// Rotates interleaved pairs instead of halves.
    pub fn with_pairing(mut self, pairing: Pairing) -> Self {
        self.pairing = pairing;
        self
    }

    /// cos and sin for positions `position..position + seq_len`, in `dtype`.
    pub fn cos_sin(&self, position: usize, seq_len: usize, dtype: DType) -> Result<CosSin> {
        let positions: Vec<u32> = (position as u32..(position + seq_len) as u32).collect();
        self.cos_sin_at(&positions, dtype)
    }

    /// cos and sin for each of `positions` (one row each, in that order), in `dtype`: the
    /// rows of a batched step, whose sequences each start at their own position.
    pub fn cos_sin_at(&self, positions: &[u32], dtype: DType) -> Result<CosSin> {
        let device = self.inv_freq.device();
        let t = Tensor::from_slice(positions, positions.len(), device)?
            .to_dtype(DType::F32)?
            .reshape((positions.len(), 1))?;
        let t = if self.position_scale == 1.0 {
            t
        } else {
            (t * self.position_scale)?
        };
        let freqs = t.matmul(&self.inv_freq)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let (cos, sin) = if self.attention_factor == 1.0 {
            (cos, sin)
        } else {
            (
                (cos * self.attention_factor)?,
                (sin * self.attention_factor)?,
            )
        };
        Ok(CosSin {
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
        })
    }

    /// The rows `start..start + len` of a batch's cos and sin: one sequence's.
    pub fn rows(cs: &CosSin, start: usize, len: usize) -> Result<CosSin> {
        Ok(CosSin {
            cos: cs.cos.narrow(0, start, len)?,
            sin: cs.sin.narrow(0, start, len)?,
        })
    }

    /// Rotates `x`, `(batch, heads, seq_len, head_dim)`; dimensions past the rotary part pass
    /// through unchanged.
    pub fn apply(&self, x: &Tensor, cs: &CosSin) -> Result<Tensor> {
        let rope = |x: &Tensor| match self.pairing {
            Pairing::Halves => candle_nn::rotary_emb::rope(x, &cs.cos, &cs.sin),
            Pairing::Interleaved => candle_nn::rotary_emb::rope_i(x, &cs.cos, &cs.sin),
        };
        let head_dim = x.dim(D::Minus1)?;
        if self.rotary_dim == head_dim {
            return Ok(rope(&x.contiguous()?)?);
        }
        let rot = rope(&x.narrow(D::Minus1, 0, self.rotary_dim)?.contiguous()?)?;
        let pass = x.narrow(D::Minus1, self.rotary_dim, head_dim - self.rotary_dim)?;
        Ok(Tensor::cat(&[&rot, &pass], D::Minus1)?.contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computing the angles for a window of positions gives exactly the rows of a table
    /// computed for all positions at once.
    #[test]
    fn per_forward_angles_equal_the_table_rows() {
        let rotary = Rotary::new(inv_freq(16, 10_000.0, Rounding::F64), &Device::Cpu).unwrap();
        let all = rotary.cos_sin(0, 40, DType::F32).unwrap();
        let part = rotary.cos_sin(29, 5, DType::F32).unwrap();
        let rows = all.cos.narrow(0, 29, 5).unwrap();
        let diff = (rows - part.cos).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn partial_rotation_leaves_the_rest_of_the_head() {
        let rotary = Rotary::new(inv_freq(4, 10_000.0, Rounding::F64), &Device::Cpu).unwrap();
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 8))
            .unwrap();
        let cs = rotary.cos_sin(3, 2, DType::F32).unwrap();
        let y = rotary.apply(&x, &cs).unwrap();
        let tail = |t: &Tensor| t.narrow(D::Minus1, 4, 4).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(tail(&x.squeeze(0).unwrap()), tail(&y.squeeze(0).unwrap()));
    }
}
