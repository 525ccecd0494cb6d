//! One module per registered architecture: its config mapping and its network.
//!
//! The modules are declared here with plain `mod` lines, so rustfmt and rust-analyzer reach
//! every file. This module is private to `models`: the `register_architectures!` list in
//! `models/mod.rs` re-exports each registered module (`models::llama`, ...) and generates the
//! enum, its dispatch and the `ARCHITECTURES` table. A module declared here but not registered
//! is never used, so clippy's `-D warnings` rejects it as dead code; a registered line whose
//! module is missing here does not compile.

// Hugging Face safetensors directories.
pub mod deepseek2;
pub mod gemma;
pub mod gemma2;
pub mod gemma3;
pub mod llama;
pub mod mistral;
pub mod mixtral;
pub mod phi;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod starcoder2;
pub mod yi;

// GGUF files.
pub mod quantized_gemma3;
pub mod quantized_llama;
pub mod quantized_phi2;
pub mod quantized_phi3;
pub mod quantized_qwen2;
pub mod quantized_qwen3;
