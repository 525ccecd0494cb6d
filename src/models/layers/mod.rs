//! The building blocks every architecture composes, written once.
//!
//! In the style of text-embeddings-inference's `layers/` and mistral.rs's `layers.rs`: each
//! block is a plain struct with a `forward`, constructed from safetensors (`VarBuilder`, the
//! Hugging Face names) or from a GGUF file (llama.cpp's names), and each keeps the fixes the
//! architectures needed where candle-transformers computes something other than transformers
//! (the window counted with the query itself, scores and softmax in F32, RoPE angles from F32
//! positions, ...).
//!
//! - [`linear`]: [`Linear`](linear::Linear), the one seam for how a projection computes
//!   (dense F32/F16/BF16; GGUF-quantized through our kernels for Q4_1/Q5_0/Q8_0 on CPU,
//!   candle's `QMatMul` otherwise), and the token
//!   [`Embedding`](linear::Embedding) that a tied output head shares;
//! - [`norm`]: RMSNorm, Gemma's `1 + weight` RMSNorm, LayerNorm;
//! - [`rotary`]: RoPE, computed for the positions of each forward;
//! - [`kv_cache`]: per-layer keys and values, trimmed to a sliding window by one rule;
//! - [`attention`]: grouped-query attention and its core (soft-capping, F32 softmax, mask);
//! - [`mlp`]: gated (SwiGLU/GeGLU) and plain feed-forward blocks;
//! - [`activation`]: the gated MLP's `act(gate) * up` in one vectorized pass on CPU;
//! - [`moe`]: mixture-of-experts routing and dispatch;
//! - [`gguf_weights`]: reading these blocks from a GGUF file by llama.cpp's names;
//! - [`decoder`]: the decoder stack most architectures are: embeddings, pre-norm blocks
//!   (optionally Gemma's sandwich norms, or Phi's parallel block), final norm and head.

pub mod activation;
pub mod attention;
pub mod decoder;
pub mod gguf_weights;
pub mod kv_cache;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rotary;
