//! The decoder stack most architectures are: token embeddings, a stack of blocks that each
//! attend and then feed forward around residual connections, a final norm, and the output
//! head over the last position.
//!
//! What distinguishes the families is settings of the one [`Decoder`]:
//!
//! - the block: pre-norm ([`Block::Sequential`], Llama, Qwen2, Mistral, StarCoder2, Phi-3),
//!   optionally with Gemma's sandwich norms on each sub-block's output; or Phi's parallel
//!   block, where attention and MLP read the same normalised input ([`Block::Parallel`]);
//! - the feed-forward part: an MLP or a mixture of experts ([`FeedForward`]);
//! - per layer, its sliding window and which of the model's RoPE variants it uses (Gemma's
//!   local and global layers);
//! - Gemma's scaling of the embeddings by `sqrt(hidden)` and soft-capping of the logits.
//!
//! The attention is a type parameter: the grouped-query [`Attention`] of `layers`, or an
//! architecture's own (DeepSeek-V2's latent attention) behind [`SelfAttention`].
//!
//! Its cache is a [`KvCache`]: all the state there is. The weights are read-only, so a reset
//! is an emptied cache.

use super::attention::{Attention, Heads, Masks, Positions, SelfAttention, Span};
use super::gguf_weights::{GgufNorm, GgufWeights, NormKind};
use super::kv_cache::KvCache;
use super::linear::{Embedding, Linear};
use super::mlp::Mlp;
use super::moe::SparseMoe;
use super::norm::Norm;
use super::rotary::Rotary;
use crate::error::Result;
use crate::models::adapter::{Loaded, SequenceInput};
use crate::models::gguf::GgufFile;
use crate::models::hf::HfConfig;
use crate::models::Network;
use candle_core::Tensor;
use candle_nn::{Activation, VarBuilder};

/// The sizes every decoder's config states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Rows of the embedding table and of the logits.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP (of each expert, in a mixture of experts).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// The attention heads and their size.
    pub heads: Heads,
}

impl Dims {
    /// Reads `vocab_size`, `hidden_size`, `intermediate_size` and `num_hidden_layers` from
    /// config.json; `heads` works out the heads from the hidden size, by the family's rule.
    pub fn from_hf(c: &HfConfig, heads: impl FnOnce(usize) -> Result<Heads>) -> Result<Self> {
        let hidden_size = c.usize("hidden_size")?;
        Ok(Dims {
            vocab_size: c.usize("vocab_size")?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size")?,
            num_hidden_layers: c.usize("num_hidden_layers")?,
            heads: heads(hidden_size)?,
        })
    }

    /// [`Dims::from_hf`] with transformers' usual head rule: `num_attention_heads` and
    /// `num_key_value_heads` (with the family's defaults when absent), and `head_dim` or
    /// `hidden_size / num_attention_heads`.
    pub fn from_hf_derived(c: &HfConfig, defaults: (Option<usize>, Option<usize>)) -> Result<Self> {
        Self::from_hf(c, |hidden| {
            let (heads, kv_heads) = c.heads(defaults.0, defaults.1)?;
            Ok(Heads::new(heads, kv_heads, c.head_dim(hidden, heads)?))
        })
    }

    /// Reads `{arch}.embedding_length`, `feed_forward_length`, `block_count` and the attention
    /// heads from GGUF metadata, with the vocabulary of the file; `head_dim` works out the head
    /// size from the query heads, by the file's rule.
    pub fn from_gguf(
        file: &GgufFile,
        arch: &str,
        head_dim: impl FnOnce(usize) -> Result<usize>,
    ) -> Result<Self> {
        let (heads, kv_heads) = file.heads(arch)?;
        Ok(Dims {
            vocab_size: file.vocab_size(arch)?,
            hidden_size: file.count(&format!("{arch}.embedding_length"))?,
            intermediate_size: file.count(&format!("{arch}.feed_forward_length"))?,
            num_hidden_layers: file.count(&format!("{arch}.block_count"))?,
            heads: Heads::new(heads, kv_heads, head_dim(heads)?),
        })
    }
}

/// What the metadata of every llama.cpp decoder states, read and checked before any tensor is:
/// the sizes, the norms and the context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GgufDecoderConfig {
    /// Vocabulary, widths, layers and heads.
    pub dims: Dims,
    /// The norms' kind and epsilon.
    pub norm: GgufNorm,
    /// The longest sequence: the file's `{arch}.context_length`, capped at what the
    /// implementation runs.
    pub max_context: usize,
}

impl GgufDecoderConfig {
    /// The longest context a GGUF model runs here: 128k tokens, as far as the longest-trained
    /// of these families go (Llama 3.1, Gemma 3 4B and larger, Phi-3's 128k files); a file that
    /// declares more is capped. Most declare less (Phi-2 2k, Qwen2 and Qwen3 32k or 40k, their
    /// 128k needing YaRN, which is refused), and run their own.
    pub const MAX_CONTEXT: usize = 131_072;

    /// Reads the [`Dims`] of architecture `arch` (`head_dim` works out the head size from the
    /// query heads, by the file's rule), the epsilon of its norms (of `norm`'s kind), and its
    /// required context length, capped at [`GgufDecoderConfig::MAX_CONTEXT`].
    pub fn from_gguf(
        file: &GgufFile,
        arch: &str,
        head_dim: impl FnOnce(usize) -> Result<usize>,
        norm: NormKind,
    ) -> Result<Self> {
        Ok(GgufDecoderConfig {
            dims: Dims::from_gguf(file, arch, head_dim)?,
            max_context: file.context_length(arch, Self::MAX_CONTEXT)?,
            norm: GgufNorm::from_gguf(file, arch, norm)?,
        })
    }
}

/// The feed-forward part of a block.
#[derive(Debug, Clone)]
pub enum FeedForward {
    /// A dense MLP.
    Mlp(Mlp),
    /// A mixture of experts.
    Moe(Box<SparseMoe>),
}

impl FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Mlp(mlp) => Ok(x.apply(mlp)?),
            FeedForward::Moe(moe) => moe.forward(x),
        }
    }
}

/// How a block wires its attention and feed-forward parts.
#[derive(Debug, Clone)]
pub enum Block {
    /// `x += post_attn(attn(attn_norm(x)))`, then `x += post_ffn(ffn(ffn_norm(x)))`; the
    /// `post_*` norms are Gemma's sandwich, absent elsewhere.
    Sequential {
        /// Before attention (`input_layernorm`).
        attn_norm: Norm,
        /// On the attention output (Gemma's `post_attention_layernorm`).
        post_attn_norm: Option<Norm>,
        /// Before the feed-forward part (`post_attention_layernorm` in Llama's naming,
        /// `pre_feedforward_layernorm` in Gemma's).
        ffn_norm: Norm,
        /// On the feed-forward output (Gemma's `post_feedforward_layernorm`).
        post_ffn_norm: Option<Norm>,
    },
    /// `x += attn(norm(x)) + ffn(norm(x))` (Phi).
    Parallel {
        /// The one norm both parts read.
        norm: Norm,
    },
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer<A = Attention> {
    /// Self-attention.
    pub attention: A,
    /// The feed-forward part.
    pub ffn: FeedForward,
    /// The wiring and its norms.
    pub block: Block,
    /// The sliding window, `None` for full attention.
    pub window: Option<usize>,
    /// Which of the decoder's RoPE variants this layer uses.
    pub rotary: usize,
}

impl<A: SelfAttention> DecoderLayer<A> {
    /// A pre-norm layer (no sandwich norms) with full attention and the first RoPE variant.
    pub fn pre_norm(attention: A, attn_norm: Norm, ffn: FeedForward, ffn_norm: Norm) -> Self {
        DecoderLayer {
            attention,
            ffn,
            block: Block::Sequential {
                attn_norm,
                post_attn_norm: None,
                ffn_norm,
                post_ffn_norm: None,
            },
            window: None,
            rotary: 0,
        }
    }

    /// A pre-norm layer in the Hugging Face layout: `norm` reads `input_layernorm` (before
    /// the attention) and `post_attention_layernorm` (before the feed-forward part) from `vb`.
    pub fn load_pre_norm(
        vb: &VarBuilder,
        attention: A,
        ffn: FeedForward,
        norm: impl Fn(VarBuilder) -> Result<Norm>,
    ) -> Result<Self> {
        let attn_norm = norm(vb.pp("input_layernorm"))?;
        let ffn_norm = norm(vb.pp("post_attention_layernorm"))?;
        Ok(Self::pre_norm(attention, attn_norm, ffn, ffn_norm))
    }

    /// A pre-norm layer in llama.cpp's GGUF layout: the norms `{prefix}.attn_norm` (before the
    /// attention) and `{prefix}.ffn_norm` (before the feed-forward part), of the model's kind.
    pub fn pre_norm_from_gguf(
        w: &mut GgufWeights,
        prefix: &str,
        (attention, ffn): (A, FeedForward),
        cfg: &GgufDecoderConfig,
    ) -> Result<Self> {
        let hidden = cfg.dims.hidden_size;
        let attn_norm = w.norm(cfg.norm, &format!("{prefix}.attn_norm"), hidden)?;
        let ffn_norm = w.norm(cfg.norm, &format!("{prefix}.ffn_norm"), hidden)?;
        Ok(Self::pre_norm(attention, attn_norm, ffn, ffn_norm))
    }

    /// [`DecoderLayer::pre_norm_from_gguf`] around `attention` with llama.cpp's SwiGLU MLP
    /// (`{prefix}.ffn_gate`, `ffn_up`, `ffn_down`): the Llama block, which Qwen2 and Qwen3
    /// keep.
    pub fn swiglu_from_gguf(
        w: &mut GgufWeights,
        prefix: &str,
        attention: A,
        cfg: &GgufDecoderConfig,
    ) -> Result<Self> {
        let sizes = (cfg.dims.hidden_size, cfg.dims.intermediate_size);
        let mlp = Mlp::gated_from_gguf(w, prefix, sizes, Activation::Silu)?;
        Self::pre_norm_from_gguf(w, prefix, (attention, FeedForward::Mlp(mlp)), cfg)
    }

    /// Phi's parallel layer (attention and feed-forward part both read `norm`'s output) with
    /// full attention and the first RoPE variant.
    pub fn parallel(attention: A, ffn: FeedForward, norm: Norm) -> Self {
        DecoderLayer {
            attention,
            ffn,
            block: Block::Parallel { norm },
            window: None,
            rotary: 0,
        }
    }

    /// The same layer with a sliding window.
    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window;
        self
    }

    /// Runs the layer over the rows of every span: norms and the feed-forward part over all
    /// rows at once, attention per span against its own cache.
    fn forward(&self, x: &Tensor, rows: &Positions, spans: &mut [Span<'_>]) -> Result<Tensor> {
        match &self.block {
            Block::Sequential {
                attn_norm,
                post_attn_norm,
                ffn_norm,
                post_ffn_norm,
            } => {
                let h = self
                    .attention
                    .forward_spans(&x.apply(attn_norm)?, rows, spans)?;
                let h = match post_attn_norm {
                    Some(n) => h.apply(n)?,
                    None => h,
                };
                let x = (h + x)?;
                let h = self.ffn.forward(&x.apply(ffn_norm)?)?;
                let h = match post_ffn_norm {
                    Some(n) => h.apply(n)?,
                    None => h,
                };
                Ok((h + x)?)
            }
            Block::Parallel { norm } => {
                let normed = x.apply(norm)?;
                let attn = self.attention.forward_spans(&normed, rows, spans)?;
                Ok(((attn + self.ffn.forward(&normed)?)? + x)?)
            }
        }
    }
}

/// The decoder network.
#[derive(Debug, Clone)]
pub struct Decoder<A = Attention> {
    embed: Embedding,
    /// Multiplies the embeddings (Gemma: `sqrt(hidden)`).
    embed_scale: Option<f64>,
    layers: Vec<DecoderLayer<A>>,
    norm: Norm,
    lm_head: Linear,
    rotaries: Vec<Rotary>,
    /// Soft-caps the logits: `cap * tanh(logits / cap)` (Gemma 2).
    final_softcap: Option<f64>,
}

impl<A: SelfAttention> Decoder<A> {
    /// A decoder from its parts; each layer's `rotary` indexes `rotaries`.
    pub fn new(
        embed: Embedding,
        layers: Vec<DecoderLayer<A>>,
        norm: Norm,
        lm_head: Linear,
        rotaries: Vec<Rotary>,
    ) -> Self {
        Decoder {
            embed,
            embed_scale: None,
            layers,
            norm,
            lm_head,
            rotaries,
            final_softcap: None,
        }
    }

    /// A Hugging Face checkpoint's decoder: `model.embed_tokens`, the layers `layer` builds
    /// from `model.layers.{i}`, the final norm `model.norm` (of the kind `norm` reads), and
    /// `lm_head`, or the embedding matrix when `tied`.
    pub fn load_hf(
        vb: &VarBuilder,
        (dims, tied): (&Dims, bool),
        mut layer: impl FnMut(usize, VarBuilder) -> Result<DecoderLayer<A>>,
        norm: impl FnOnce(VarBuilder) -> Result<Norm>,
        rotaries: Vec<Rotary>,
    ) -> Result<Self> {
        let (vocab, hidden, num_layers) =
            (dims.vocab_size, dims.hidden_size, dims.num_hidden_layers);
        let norm = norm(vb.pp("model.norm"))?;
        let embed = Embedding::load(vb.pp("model.embed_tokens"), vocab, hidden)?;
        let lm_head = match tied {
            true => embed.tied_head(None)?,
            false => Linear::load(vb.pp("lm_head"), hidden, vocab, false)?,
        };
        let layers = (0..num_layers)
            .map(|i| layer(i, vb.pp("model.layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Decoder::new(embed, layers, norm, lm_head, rotaries))
    }

    /// A llama.cpp GGUF file's decoder: `token_embd.weight` (kept quantized), the layers `layer`
    /// reads from the tensors of `blk.{i}` (given `i` and that prefix), the final norm
    /// `output_norm`, and the head `output.weight`, or the embedding table when the file ties
    /// them.
    pub fn from_gguf(
        w: &mut GgufWeights,
        cfg: &GgufDecoderConfig,
        rotaries: Vec<Rotary>,
        mut layer: impl FnMut(&mut GgufWeights, usize, &str) -> Result<DecoderLayer<A>>,
    ) -> Result<Self> {
        let Dims {
            vocab_size,
            hidden_size,
            num_hidden_layers,
            ..
        } = cfg.dims;
        let (embed, lm_head) = w.embeddings_and_head(vocab_size, hidden_size)?;
        let norm = w.norm(cfg.norm, "output_norm", hidden_size)?;
        let layers = (0..num_hidden_layers)
            .map(|i| layer(w, i, &format!("blk.{i}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Decoder::new(embed, layers, norm, lm_head, rotaries))
    }

    /// Adds `bias` to the output head (Phi-2's `output.bias`).
    pub fn with_head_bias(mut self, bias: Tensor) -> Self {
        self.lm_head = self.lm_head.with_bias(bias);
        self
    }

    /// Multiplies the token embeddings by `scale`.
    pub fn with_embed_scale(mut self, scale: f64) -> Self {
        self.embed_scale = Some(scale);
        self
    }

    /// Soft-caps the logits.
    pub fn with_final_softcap(mut self, cap: Option<f64>) -> Self {
        self.final_softcap = cap;
        self
    }

    /// The layers, for tests that check what was loaded.
    pub fn layers(&self) -> &[DecoderLayer<A>] {
        &self.layers
    }

    /// An empty cache: one slot per layer, trimmed to the layer's window.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.iter().map(|l| l.window))
    }

    /// The decoder with its empty cache, for a model of `vocab_size` tokens and a context of
    /// `max_context`.
    pub fn loaded(self, vocab_size: usize, max_context: usize) -> Loaded<Self> {
        let cache = self.new_cache();
        let values: usize = self
            .layers
            .iter()
            .map(|l| l.attention.kv_values_per_token())
            .sum();
        let kv_bytes_per_token = values * self.embed.dtype().size_in_bytes();
        let mut loaded = Loaded::new(self, cache, vocab_size, max_context);
        loaded.kv_bytes_per_token = kv_bytes_per_token;
        loaded
    }
}

impl<A: SelfAttention> Decoder<A> {
    /// One step over several sequences: their tokens one after the other in one row of the
    /// activations, so that every linear layer is one matmul over all of them, while each
    /// sequence attends with its own positions, mask and cache. Returns the final hidden state
    /// of each sequence's last token, `(batch, n, hidden)` normed, projected to logits.
    fn forward_sequences(&self, batch: &mut [SequenceInput<'_, KvCache>]) -> Result<Tensor> {
        let ids = match batch {
            [one] => one.input_ids.clone(),
            _ => {
                let ids: Vec<&Tensor> = batch.iter().map(|s| &s.input_ids).collect();
                Tensor::cat(&ids, 1)?
            }
        };
        let device = ids.device().clone();
        let mut x = ids.apply(&self.embed)?;
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
        let windows: Vec<Option<usize>> = self.layers.iter().map(|l| l.window).collect();
        // Every row's position, per sequence from its own; cos and sin once per RoPE variant
        // for all rows, each sequence's its rows of them.
        let mut starts = Vec::with_capacity(batch.len());
        let mut positions = Vec::new();
        let mut masks = Vec::with_capacity(batch.len());
        for s in batch.iter() {
            let len = s.input_ids.dim(1)?;
            starts.push((positions.len(), len));
            positions.extend(s.position as u32..(s.position + len) as u32);
            masks.push(Masks::new(
                len,
                s.position,
                windows.iter().copied(),
                &device,
            )?);
        }
        let all_rows = self
            .rotaries
            .iter()
            .map(|r| r.cos_sin_at(&positions, x.dtype()))
            .collect::<Result<Vec<_>>>()?;
        let cos_sins = starts
            .iter()
            .map(|&(start, len)| {
                all_rows
                    .iter()
                    .map(|cs| Rotary::rows(cs, start, len))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut caches: Vec<_> = batch.iter_mut().map(|s| s.cache.layers_mut()).collect();
        for layer in &self.layers {
            let rotary = &self.rotaries[layer.rotary];
            let rows = Positions {
                rotary,
                cos_sin: &all_rows[layer.rotary],
                mask: None,
            };
            let mut spans = Vec::with_capacity(caches.len());
            for (i, layer_caches) in caches.iter_mut().enumerate() {
                let cache = layer_caches.next().ok_or_else(|| {
                    candle_core::Error::Msg("a KV cache with fewer layers than the decoder".into())
                })?;
                let (start, len) = starts[i];
                spans.push(Span {
                    start,
                    len,
                    at: Positions {
                        rotary,
                        cos_sin: &cos_sins[i][layer.rotary],
                        mask: masks[i].get(layer.window),
                    },
                    cache,
                });
            }
            x = layer.forward(&x, &rows, &mut spans)?;
        }
        // Only each sequence's last position is projected to logits.
        let last = match starts.as_slice() {
            [(start, len)] => x.narrow(1, start + len - 1, 1)?,
            _ => {
                let rows = starts
                    .iter()
                    .map(|(start, len)| x.narrow(1, start + len - 1, 1))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 1)?
            }
        };
        let logits = last.apply(&self.norm)?.apply(&self.lm_head)?;
        Ok(match self.final_softcap {
            None => logits,
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
        })
    }
}

impl<A: SelfAttention> Network for Decoder<A> {
    type Cache = KvCache;

    fn forward(&self, input_ids: &Tensor, position: usize, cache: &mut KvCache) -> Result<Tensor> {
        // A single sequence is a batch of one: the same code runs alone and batched.
        let mut one = [SequenceInput {
            input_ids: input_ids.clone(),
            position,
            cache,
        }];
        self.forward_sequences(&mut one)
    }

    fn reset(&self, cache: &mut KvCache) -> Result<()> {
        cache.reset();
        Ok(())
    }

    fn new_cache(&self) -> Result<KvCache> {
        Ok(Decoder::new_cache(self))
    }

    fn forward_batch(&self, batch: &mut [SequenceInput<'_, KvCache>]) -> Result<Tensor> {
        // `(1, n, vocab)`: one row per sequence.
        Ok(self.forward_sequences(batch)?.squeeze(0)?)
    }

    fn truncate(&self, cache: &mut KvCache, cached: usize, keep: usize) -> Result<bool> {
        cache.truncate(cached, keep)
    }
}
