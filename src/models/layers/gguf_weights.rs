//! Reading blocks from a GGUF file by llama.cpp's tensor names, each shape checked first, so
//! a mismatched file fails at load naming the tensor instead of in a matmul later. The GGUF
//! counterpart of candle's `VarBuilder` for the blocks of this module.

use super::linear::{Embedding, Linear};
use super::norm::Norm;
use crate::error::{Error, Result};
use crate::kernels::blocks::QK;
use crate::kernels::{QuantizedWeight, WeightType};
use crate::models::gguf::GgufFile;
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// The normalisation a llama.cpp architecture uses throughout (llama.cpp's `LLM_NORM_RMS` and
/// `LLM_NORM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// RMSNorm over `{name}.weight`, its epsilon `{arch}.attention.layer_norm_rms_epsilon`.
    Rms,
    /// LayerNorm over `{name}.weight` and `{name}.bias` (Phi-2), its epsilon
    /// `{arch}.attention.layer_norm_epsilon`.
    Layer,
}

/// A llama.cpp architecture's norms: their kind and the file's epsilon.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GgufNorm {
    /// RMSNorm or LayerNorm.
    pub kind: NormKind,
    /// Added to the variance.
    pub eps: f64,
}

impl GgufNorm {
    /// The norms of `kind`, with the epsilon the file states under llama.cpp's key for it.
    pub fn from_gguf(file: &GgufFile, arch: &str, kind: NormKind) -> Result<Self> {
        let key = match kind {
            NormKind::Rms => format!("{arch}.attention.layer_norm_rms_epsilon"),
            NormKind::Layer => format!("{arch}.attention.layer_norm_epsilon"),
        };
        Ok(GgufNorm {
            kind,
            eps: file.positive(&key, None)?,
        })
    }
}

/// A GGUF file being read onto a device.
pub struct GgufWeights<'a> {
    file: &'a mut GgufFile,
    device: &'a Device,
}

impl<'a> GgufWeights<'a> {
    /// Reads from `file` onto `device`.
    pub fn new(file: &'a mut GgufFile, device: &'a Device) -> Self {
        GgufWeights { file, device }
    }

    /// The device the blocks are read onto.
    pub fn device(&self) -> &Device {
        self.device
    }

    /// The file, for checks on its metadata and tensor directory.
    pub fn file(&self) -> &GgufFile {
        self.file
    }

    /// A linear layer over the (quantized) tensor `name` of shape `(out, in)`.
    pub fn linear(&mut self, name: &str, shape: [usize; 2]) -> Result<Linear> {
        let tensor = self.file.read_tensor(name, &shape, self.device)?;
        Linear::from_qtensor(tensor, None)
    }

    /// One layer over the row-concatenation of the tensors `parts` (name, rows), each
    /// `(rows, in_dim)`: its output is their outputs side by side, in order. Projections that
    /// read the same input (q/k/v, gate/up) then cost one activation quantization and one
    /// parallel dispatch instead of several, with the same products.
    ///
    /// Fused only where our kernels compute all of them: the same weight type, one they
    /// handle, on CPU. `None` otherwise (mixed types, other types or devices, or a tensor
    /// that is missing or mis-shaped), for the caller to read them one by one, which also
    /// names whatever is wrong with them.
    pub fn fused_linear(
        &mut self,
        parts: &[(&str, usize)],
        in_dim: usize,
    ) -> Result<Option<Linear>> {
        if !self.device.is_cpu() || in_dim == 0 || !in_dim.is_multiple_of(QK) {
            return Ok(None);
        }
        let mut ty = None;
        for (name, rows) in parts {
            let Some(info) = self.file.content.tensor_infos.get(*name) else {
                return Ok(None);
            };
            let this = WeightType::from_ggml(info.ggml_dtype);
            if this.is_none()
                || ty.is_some_and(|t| Some(t) != this)
                || info.shape.dims() != [*rows, in_dim]
            {
                return Ok(None);
            }
            ty = this;
        }
        let Some(ty) = ty else { return Ok(None) };
        let rows: usize = parts.iter().map(|(_, r)| r).sum();
        let mut bytes = Vec::with_capacity(rows * (in_dim / QK) * ty.block_bytes());
        for (name, part_rows) in parts {
            let tensor = self
                .file
                .read_tensor(name, &[*part_rows, in_dim], self.device)?;
            bytes.extend_from_slice(&tensor.data()?);
        }
        let weight = QuantizedWeight::from_bytes(ty, &bytes, rows, in_dim)?;
        Ok(Some(Linear::own(Arc::new(weight), None)))
    }

    /// The tensor `name` of `size` values, dequantized (biases).
    pub fn vector(&mut self, name: &str, size: usize) -> Result<Tensor> {
        let tensor = self.file.read_tensor(name, &[size], self.device)?;
        Ok(tensor.dequantize(self.device)?)
    }

    /// The norm `name` over `size` values: RMSNorm over `{name}.weight` (GGUF files store
    /// Gemma's `1 + weight` already, so every RMSNorm reads as a plain one), or LayerNorm over
    /// `{name}.weight` and `{name}.bias`.
    pub fn norm(&mut self, norm: GgufNorm, name: &str, size: usize) -> Result<Norm> {
        let weight = self.vector(&format!("{name}.weight"), size)?;
        Ok(match norm.kind {
            NormKind::Rms => Norm::Rms(candle_nn::RmsNorm::new(weight, norm.eps)),
            NormKind::Layer => {
                let bias = self.vector(&format!("{name}.bias"), size)?;
                Norm::Layer(candle_nn::LayerNorm::new(weight, bias, norm.eps))
            }
        })
    }

    /// The per-head query and key norms `{prefix}.attn_q_norm` and `{prefix}.attn_k_norm`, each
    /// over `head_dim` values (Qwen3, Gemma 3).
    pub fn qk_norms(
        &mut self,
        prefix: &str,
        head_dim: usize,
        norm: GgufNorm,
    ) -> Result<(Norm, Norm)> {
        Ok((
            self.norm(norm, &format!("{prefix}.attn_q_norm"), head_dim)?,
            self.norm(norm, &format!("{prefix}.attn_k_norm"), head_dim)?,
        ))
    }

    /// Divides RoPE's inverse frequencies by the per-pair divisors of the tensor `name` (Llama
    /// 3.1's `rope_freqs.weight`, LongRoPE's `rope_factors_short.weight`), as llama.cpp does;
    /// a divisor that is not a positive number is an error naming the tensor.
    pub fn divide_frequencies(&mut self, freqs: &mut [f32], name: &str) -> Result<()> {
        let divisors = self.vector(name, freqs.len())?.to_vec1::<f32>()?;
        if let Some(bad) = divisors.iter().find(|d| !(d.is_finite() && **d > 0.0)) {
            return Err(Error::model_file(
                &self.file.path,
                format!("{name} holds {bad}; RoPE divisors must be positive"),
            ));
        }
        for (f, d) in freqs.iter_mut().zip(divisors) {
            *f /= d;
        }
        Ok(())
    }

    /// Whether the file has a tensor named `name` (for layouts that vary between files).
    pub fn has(&self, name: &str) -> bool {
        self.file.content.tensor_infos.contains_key(name)
    }

    /// The token embeddings `token_embd.weight` `(vocab, hidden)`, kept quantized, and the
    /// output head: `output.weight`, or the embedding table itself when the file ties them.
    pub fn embeddings_and_head(
        &mut self,
        vocab: usize,
        hidden: usize,
    ) -> Result<(Embedding, Linear)> {
        // Rows are dequantized one by one on lookup, so each must be whole quantization blocks.
        let dtype = self
            .file
            .content
            .tensor_infos
            .get("token_embd.weight")
            .map(|i| i.ggml_dtype);
        if let Some(dtype) = dtype {
            let block = dtype.block_size();
            if !hidden.is_multiple_of(block) {
                return Err(Error::model_file(
                    &self.file.path,
                    format!("token_embd.weight rows ({hidden} values) are not whole {dtype:?} blocks of {block}"),
                ));
            }
        }
        let table = self
            .file
            .read_tensor("token_embd.weight", &[vocab, hidden], self.device)?;
        let embed = Embedding::from_qtensor(table)?;
        let head = if self.file.content.tensor_infos.contains_key("output.weight") {
            self.linear("output.weight", [vocab, hidden])?
        } else {
            // Tied embeddings: the one quantized tensor serves the lookup and the projection.
            embed.tied_head(None)?
        };
        Ok((embed, head))
    }
}
