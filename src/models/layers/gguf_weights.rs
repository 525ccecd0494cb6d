//! Reading blocks from a GGUF file by llama.cpp's tensor names, each shape checked first, so
//! a mismatched file fails at load naming the tensor instead of in a matmul later. The GGUF
//! counterpart of candle's `VarBuilder` for the blocks of this module.

use super::linear::{Embedding, Linear};
use super::norm::Norm;
use crate::error::{Error, Result};
use crate::models::gguf::GgufFile;
use candle_core::{Device, Tensor};

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

    /// The file, for checks on its metadata and tensor directory.
    pub fn file(&self) -> &GgufFile {
        self.file
    }

    /// A linear layer over the (quantized) tensor `name` of shape `(out, in)`.
    pub fn linear(&mut self, name: &str, shape: [usize; 2]) -> Result<Linear> {
        let tensor = self.file.read_tensor(name, &shape, self.device)?;
        Linear::from_qtensor(tensor, None)
    }

    /// The tensor `name` of `size` values, dequantized (biases).
    pub fn vector(&mut self, name: &str, size: usize) -> Result<Tensor> {
        let tensor = self.file.read_tensor(name, &[size], self.device)?;
        Ok(tensor.dequantize(self.device)?)
    }

    /// RMSNorm over the weight `name` of `size` values (GGUF files store Gemma's `1 + weight`
    /// already, so every RMSNorm reads as a plain one).
    pub fn rms_norm(&mut self, name: &str, size: usize, eps: f64) -> Result<Norm> {
        Ok(Norm::Rms(candle_nn::RmsNorm::new(
            self.vector(name, size)?,
            eps,
        )))
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
