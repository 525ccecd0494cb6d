//! GGUF files as llama.cpp writes them: opening with validation (a truncated or corrupt file is
//! a clear error before any tensor is read) and typed metadata getters.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// An opened and validated GGUF file.
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// Metadata and tensor directory.
    pub content: Content,
    /// A reader positioned anywhere (for reading tensors, and for candle's `from_gguf` where a
    /// test compares with candle's models).
    pub reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .finish()
    }
}

impl GgufFile {
    /// Opens `path`, reads the header, and checks that every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(file);
        let file_size = reader
            .seek(SeekFrom::End(0))
            .and_then(|n| reader.seek(SeekFrom::Start(0)).map(|_| n))
            .map_err(|e| Error::io(path, e))?;
        // candle's reader bounds every declared length by the file's size; it can still
        // divide by a zero `general.alignment`, so a panic there is an error about the file too.
        let content =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)))
                .unwrap_or_else(|_| Err(candle_core::Error::Msg("the header is malformed".into())))
                .map_err(|e| Error::model_file(path, format!("not a valid GGUF file: {e}")))?;
        for (name, info) in &content.tensor_infos {
            let dims = info.shape.dims();
            // A zero dimension or a product past usize is a corrupt directory entry; candle
            // would build a misaligned empty slice from the first, and overflow on the second.
            let elems = dims
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    Error::model_file(
                        path,
                        format!("tensor {name}: shape {dims:?} is empty or too large"),
                    )
                })?;
            let block = info.ggml_dtype.block_size();
            if block == 0 || elems % block != 0 {
                return Err(Error::model_file(
                    path,
                    format!("tensor {name}: {elems} elements is not a multiple of the {:?} block size {block}", info.ggml_dtype),
                ));
            }
            let bytes = ((elems / block) as u64).saturating_mul(info.ggml_dtype.type_size() as u64);
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > file_size {
                return Err(Error::model_file(
                    path,
                    format!("file is truncated: tensor {name} ends at byte {end} but the file has {file_size} bytes"),
                ));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String> {
        Ok(self.string("general.architecture")?.to_string())
    }

    /// A raw metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// An error about a metadata key of this file.
    pub fn config_error(&self, key: &str, message: impl Into<String>) -> Error {
        Error::config(
            format!("{} (GGUF metadata): {key}", self.path.display()),
            message,
        )
    }

    fn err(&self, key: &str, message: String) -> Error {
        self.config_error(key, message)
    }

    /// A required, non-zero count (heads, layers, lengths), at most
    /// [`MAX_CONFIG_INTEGER`](crate::models::hf::MAX_CONFIG_INTEGER): counts size allocations
    /// (layer lists, caches), so a corrupt one must be an error, not an aborting allocation.
    pub fn count(&self, key: &str) -> Result<usize> {
        match self.u64(key)? {
            0 => Err(self.config_error(key, "must be at least 1")),
            n if n > crate::models::hf::MAX_CONFIG_INTEGER => Err(self.config_error(
                key,
                format!(
                    "is {n}, more than the largest supported value {}",
                    crate::models::hf::MAX_CONFIG_INTEGER
                ),
            )),
            n => Ok(n as usize),
        }
    }

    /// Reads a tensor after checking it exists with the expected (rows-first) shape, so a
    /// mismatched file fails at load with the tensor's name, not in a matmul later.
    pub fn read_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        device: &candle_core::Device,
    ) -> Result<candle_core::quantized::QTensor> {
        match self.content.tensor_infos.get(name) {
            None => {
                return Err(Error::model_file(
                    &self.path,
                    format!("tensor {name} is missing"),
                ))
            }
            Some(info) if info.shape.dims() != shape => {
                return Err(Error::model_file(
                    &self.path,
                    format!(
                        "tensor {name} has shape {:?}, expected {shape:?}",
                        info.shape.dims()
                    ),
                ))
            }
            Some(_) => {}
        }
        Ok(self.content.tensor(&mut self.reader, name, device)?)
    }

    /// A required string.
    pub fn string(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            None => Err(self.err(key, "is missing".into())),
            Some(v) => v
                .to_string()
                .map(String::as_str)
                .map_err(|_| self.err(key, format!("must be a string, found {v:?}"))),
        }
    }

    /// An optional unsigned integer (any integer width).
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_u64(v).map(Some).ok_or_else(|| {
                self.err(key, format!("must be a non-negative integer, found {v:?}"))
            }),
        }
    }

    /// A required unsigned integer.
    pub fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?
            .ok_or_else(|| self.err(key, "is missing".into()))
    }

    /// An optional float.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v as f64)),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(v) => value_u64(v)
                .map(|n| Some(n as f64))
                .ok_or_else(|| self.err(key, format!("must be a number, found {v:?}"))),
        }
    }

    /// The vocabulary size: `tokenizer.ggml.tokens` length, else `{arch}.vocab_size`, else the
    /// rows of the embedding table.
    pub fn vocab_size(&self, arch: &str) -> Result<usize> {
        if let Some(Value::Array(tokens)) = self.get("tokenizer.ggml.tokens") {
            return Ok(tokens.len());
        }
        if let Some(n) = self.opt_u64(&format!("{arch}.vocab_size"))? {
            return Ok(n as usize);
        }
        match self.content.tensor_infos.get("token_embd.weight") {
            Some(info) => Ok(info.shape.dims()[0]),
            None => Err(self.err(
                "tokenizer.ggml.tokens",
                "is missing, and so are vocab_size and token_embd.weight".into(),
            )),
        }
    }

    /// Checks that the rows of `token_embd.weight` (what ids index) and of `output.weight`
    /// (what the logits are) match the vocabulary, or ids and logits would disagree about what
    /// a token is. `output.weight` may be absent when the output projection can be tied to the
    /// embeddings (`tied_output`).
    pub fn check_vocab(&self, vocab: usize, tied_output: bool) -> Result<()> {
        for name in ["token_embd.weight", "output.weight"] {
            let rows = match self.content.tensor_infos.get(name) {
                Some(info) => info.shape.dims().first().copied().unwrap_or(0),
                None if tied_output && name == "output.weight" => continue,
                None => {
                    return Err(Error::model_file(
                        &self.path,
                        format!("tensor {name} is missing"),
                    ))
                }
            };
            if rows != vocab {
                return Err(Error::model_file(
                    &self.path,
                    format!("tensor {name} has {rows} rows but the vocabulary has {vocab} tokens"),
                ));
            }
        }
        Ok(())
    }

    /// `{arch}.attention.head_count` and `head_count_kv`, checked for grouped-query
    /// attention: the key/value heads must divide the query heads.
    pub fn heads(&self, arch: &str) -> Result<(usize, usize)> {
        let heads = self.count(&format!("{arch}.attention.head_count"))?;
        let key = format!("{arch}.attention.head_count_kv");
        let kv_heads = self.count(&key)?;
        self.require(&key, heads % kv_heads == 0, || {
            format!("{kv_heads} does not divide head_count {heads}")
        })?;
        Ok((heads, kv_heads))
    }

    /// The head size `{arch}.embedding_length / head_count`, which must divide exactly.
    pub fn derived_head_dim(&self, arch: &str, heads: usize) -> Result<usize> {
        let key = format!("{arch}.embedding_length");
        let hidden = self.count(&key)?;
        let message = || format!("{hidden} is not a multiple of head_count {heads}");
        self.require(&key, hidden % heads == 0, message)?;
        Ok(hidden / heads)
    }

    /// [`GgufFile::derived_head_dim`] for a model that rotates whole heads, which must then
    /// have an even size (RoPE rotates pairs).
    pub fn rope_head_dim(&self, arch: &str, heads: usize) -> Result<usize> {
        let head_dim = self.derived_head_dim(arch, heads)?;
        let key = format!("{arch}.embedding_length");
        self.require(&key, head_dim % 2 == 0, || {
            format!("the head size {head_dim} must be even for RoPE")
        })?;
        Ok(head_dim)
    }

    /// An error about `key` with `message` unless `ok`.
    fn require(&self, key: &str, ok: bool, message: impl FnOnce() -> String) -> Result<()> {
        match ok {
            true => Ok(()),
            false => Err(self.config_error(key, message())),
        }
    }

    /// The head size `{arch}.attention.key_length`: even (RoPE rotates pairs), and equal to
    /// `value_length` when the file states one.
    pub fn key_length(&self, arch: &str) -> Result<usize> {
        let key = format!("{arch}.attention.key_length");
        let head_dim = self.count(&key)?;
        if head_dim % 2 != 0 {
            return Err(self.config_error(
                &key,
                format!("the head size {head_dim} must be even for RoPE"),
            ));
        }
        let value_key = format!("{arch}.attention.value_length");
        if let Some(v) = self.opt_u64(&value_key)? {
            if v as usize != head_dim {
                return Err(self.config_error(
                    &value_key,
                    format!("is {v}, but must equal key_length ({head_dim})"),
                ));
            }
        }
        Ok(head_dim)
    }

    /// A positive, finite number: `default` when absent, or an error when there is none.
    pub fn positive(&self, key: &str, default: Option<f64>) -> Result<f64> {
        match (self.opt_f64(key)?, default) {
            (None, Some(d)) => Ok(d),
            (None, None) => Err(self.config_error(key, "is missing")),
            (Some(v), _) if v > 0.0 && v.is_finite() => Ok(v),
            (Some(v), _) => Err(self.config_error(key, format!("must be positive, found {v}"))),
        }
    }

    /// Refuses a `{arch}.rope.scaling.type` outside `allowed` (an absent key is `none`).
    pub fn rope_scaling(&self, arch: &str, allowed: &[&str]) -> Result<()> {
        let key = format!("{arch}.rope.scaling.type");
        match self.get(&key) {
            Some(kind)
                if !kind
                    .to_string()
                    .is_ok_and(|k| allowed.contains(&k.as_str())) =>
            {
                Err(self.config_error(
                    &key,
                    format!(
                        "{kind:?} is not supported (allowed: {})",
                        allowed.join(", ")
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Checks that `{arch}.rope.dimension_count`, when the file states it, is the whole head
    /// (`head_dim`): llama.cpp rotates whole heads for the architectures that call this (and
    /// asserts as much), so anything else is a corrupt file or a partial rotation nothing here
    /// implements.
    pub fn rope_whole_head(&self, arch: &str, head_dim: usize) -> Result<()> {
        let key = format!("{arch}.rope.dimension_count");
        match self.opt_u64(&key)? {
            Some(rope_dim) if rope_dim != head_dim as u64 => Err(self.config_error(
                &key,
                format!("is {rope_dim}, but {arch} rotates the whole head ({head_dim} dimensions)"),
            )),
            _ => Ok(()),
        }
    }

    /// `{arch}.rope.dimension_count`: how many dimensions of each head RoPE rotates (Phi's
    /// partial rotary), even (RoPE rotates pairs) and at most the head size.
    pub fn rope_dimension_count(&self, arch: &str, head_dim: usize) -> Result<usize> {
        let key = format!("{arch}.rope.dimension_count");
        let rope_dim = self.count(&key)?;
        self.require(&key, rope_dim <= head_dim && rope_dim % 2 == 0, || {
            format!("is {rope_dim}; it must be even and at most the head size {head_dim}")
        })?;
        Ok(rope_dim)
    }

    /// The RoPE settings llama.cpp reads for every architecture: `{arch}.rope.freq_base`
    /// (`default_base` when absent), linear scaling by `{arch}.rope.scaling.factor` unless
    /// `rope.scaling.type` is `none` (absent means linear, as in llama.cpp), and the
    /// `rope.scaling.attn_factor` on cos and sin. Any other scaling type (YaRN) is refused.
    pub fn rope_settings(&self, arch: &str, default_base: f64) -> Result<RopeSettings> {
        self.rope_scaling(arch, &["none", "linear"])?;
        let factor = self.positive(&format!("{arch}.rope.scaling.factor"), Some(1.0))?;
        let kind = self.get(&format!("{arch}.rope.scaling.type"));
        let none = kind.is_some_and(|k| k.to_string().is_ok_and(|k| k == "none"));
        Ok(RopeSettings {
            base: self.positive(&format!("{arch}.rope.freq_base"), Some(default_base))?,
            position_scale: if none { 1.0 } else { 1.0 / factor },
            attention_factor: self
                .positive(&format!("{arch}.rope.scaling.attn_factor"), Some(1.0))?,
        })
    }

    /// [`GgufFile::vocab_size`], checked against the embedding and output rows
    /// ([`GgufFile::check_vocab`]).
    pub fn checked_vocab_size(&self, arch: &str, tied_output: bool) -> Result<usize> {
        let vocab = self.vocab_size(arch)?;
        self.check_vocab(vocab, tied_output)?;
        Ok(vocab)
    }

    /// `{arch}.context_length`, which llama.cpp requires, capped by what the implementation
    /// can address.
    pub fn context_length(&self, arch: &str, implementation_limit: usize) -> Result<usize> {
        let declared = self.count(&format!("{arch}.context_length"))?;
        Ok(declared.min(implementation_limit))
    }

    /// The end-of-sequence id from `tokenizer.ggml.eos_token_id`.
    pub fn eos_token_ids(&self) -> Result<Vec<u32>> {
        Ok(self
            .opt_u64("tokenizer.ggml.eos_token_id")?
            .map(|id| vec![id as u32])
            .unwrap_or_default())
    }

    /// The beginning-of-sequence id from `tokenizer.ggml.bos_token_id`.
    pub fn bos_token_id(&self) -> Result<Option<u32>> {
        Ok(self
            .opt_u64("tokenizer.ggml.bos_token_id")?
            .map(|id| id as u32))
    }
}

/// RoPE as a GGUF file states it ([`GgufFile::rope_settings`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeSettings {
    /// `theta` of the inverse frequencies `theta^(-2i / d)`.
    pub base: f64,
    /// Multiplies the positions (1 / the linear scaling factor; 1 for none).
    pub position_scale: f64,
    /// Multiplies cos and sin (1 for none).
    pub attention_factor: f64,
}

fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(n) => Some(n as u64),
        Value::U16(n) => Some(n as u64),
        Value::U32(n) => Some(n as u64),
        Value::U64(n) => Some(n),
        Value::I8(n) => u64::try_from(n).ok(),
        Value::I16(n) => u64::try_from(n).ok(),
        Value::I32(n) => u64::try_from(n).ok(),
        Value::I64(n) => u64::try_from(n).ok(),
        _ => None,
    }
}
