//! Linear layers and token embeddings: the one place that decides how a projection computes.
//!
//! Every projection of every architecture that runs its own network is a [`Linear`]: a dense
//! F32/F16/BF16 weight multiplied by candle's matmul, or a GGUF-quantized weight, plus an
//! optional bias. A GGUF weight on CPU of a type our kernels handle (Q4_1, Q5_0, Q8_0; see
//! [`crate::kernels`]) is multiplied by them; any other type, and any other device, stays on
//! candle's `QMatMul`. The choice is made once, at load, and every architecture gets it.

use crate::error::Result;
use crate::kernels::QuantizedWeight;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// `y = x W^T + b` over the last dimension of `x`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// How the weight is stored, and so how it is multiplied.
#[derive(Debug, Clone)]
enum Weight {
    /// `(out, in)` in the model dtype: candle's matmul, as `candle_nn::Linear` does it.
    Dense(candle_nn::Linear),
    /// A GGUF tensor: candle's quantized matmul (which dequantizes F32/F16 tensors).
    Quantized(QMatMul),
    /// A GGUF tensor on CPU that our own kernels multiply (shared with a tied embedding).
    Own(Arc<QuantizedWeight>),
}

impl Linear {
    /// A dense layer from a weight `(out, in)` and an optional bias `(out,)`.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Dense(candle_nn::Linear::new(weight, None)),
            bias,
        }
    }

    /// A layer over a GGUF tensor, with an optional (dense) bias.
    pub fn quantized(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Quantized(weight),
            bias,
        }
    }

    /// Loads `weight` (and `bias` when `bias` is set) of shape `(out_dim, in_dim)` from a
    /// safetensors prefix such as `model.layers.0.self_attn.q_proj`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Linear::dense(weight, bias))
    }

    /// A layer over a GGUF tensor: our kernels when they handle its type on its device,
    /// candle's `QMatMul` otherwise.
    pub fn from_qtensor(tensor: QTensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(match QuantizedWeight::from_qtensor(&tensor)? {
            Some(w) => Linear::own(Arc::new(w), bias),
            None => Linear::quantized(QMatMul::from_qtensor(tensor)?, bias),
        })
    }

    /// A layer over a weight our kernels multiply.
    pub fn own(weight: Arc<QuantizedWeight>, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Own(weight),
            bias,
        }
    }

    /// Whether our own kernels compute this layer (for tests and diagnostics).
    pub fn uses_own_kernels(&self) -> bool {
        matches!(self.weight, Weight::Own(_))
    }

    /// The same layer plus a bias, for GGUF files that store it as a tensor of its own.
    pub fn with_bias(mut self, bias: Tensor) -> Self {
        self.bias = Some(bias);
        self
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The bias is added as candle's own `Linear` adds it.
        let y = match &self.weight {
            Weight::Dense(l) => l.forward(x)?,
            Weight::Quantized(w) => w.forward(x)?,
            Weight::Own(w) => w.forward(x)?,
        };
        match &self.bias {
            None => Ok(y),
            Some(b) => y.broadcast_add(b),
        }
    }
}

/// The token embedding table; a tied output head multiplies by the same weights.
#[derive(Debug, Clone)]
pub enum Embedding {
    /// A dense `(vocab, hidden)` table.
    Dense(candle_nn::Embedding),
    /// A GGUF table, kept quantized: rows are dequantized on lookup, as llama.cpp does,
    /// instead of holding a dequantized F32 copy of the whole table.
    Quantized {
        /// The lookup.
        table: QMatMul,
        /// The tensor, for a tied output head to share.
        tensor: Arc<QTensor>,
    },
    /// A GGUF table of a type our kernels handle, on CPU: rows are dequantized from its blocks
    /// on lookup, and a tied head multiplies the same blocks (one copy of the table).
    Own(Arc<QuantizedWeight>),
}

impl Embedding {
    /// Loads `weight` `(vocab, hidden)` from a safetensors prefix such as `model.embed_tokens`.
    pub fn load(vb: VarBuilder, vocab: usize, hidden: usize) -> Result<Self> {
        Ok(Embedding::Dense(candle_nn::embedding(vocab, hidden, vb)?))
    }

    /// A GGUF table `(vocab, hidden)`, kept quantized: our kernels' blocks when they handle
    /// its type on its device (the rows dequantized on lookup), candle's `QMatMul` otherwise.
    pub fn from_qtensor(tensor: QTensor) -> Result<Self> {
        if let Some(w) = QuantizedWeight::from_qtensor(&tensor)? {
            return Ok(Embedding::Own(Arc::new(w)));
        }
        let tensor = Arc::new(tensor);
        Ok(Embedding::Quantized {
            table: QMatMul::from_arc(tensor.clone())?,
            tensor,
        })
    }

    /// The dtype of the vectors it looks up (and so of the activations): the table's own when
    /// dense, F32 when dequantized from GGUF blocks.
    pub fn dtype(&self) -> candle_core::DType {
        match self {
            Embedding::Dense(e) => e.embeddings().dtype(),
            Embedding::Quantized { .. } | Embedding::Own(_) => candle_core::DType::F32,
        }
    }

    /// The output head that reuses this table (tied embeddings), with an optional bias.
    pub fn tied_head(&self, bias: Option<Tensor>) -> Result<Linear> {
        Ok(match self {
            Embedding::Dense(e) => Linear::dense(e.embeddings().clone(), bias),
            Embedding::Quantized { tensor, .. } => {
                Linear::quantized(QMatMul::from_arc(tensor.clone())?, bias)
            }
            Embedding::Own(w) => Linear::own(w.clone(), bias),
        })
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(e) => e.forward(ids),
            Embedding::Quantized { table, .. } => table.embedding(ids),
            Embedding::Own(w) => w.embedding(ids),
        }
    }
}
