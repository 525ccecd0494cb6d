//! # llm-pool
//!
//! A multi-model LLM inference worker pool on [candle](https://github.com/huggingface/candle).
//!
//! The crate is layered; each layer knows only the ones below it:
//!
//! - [`models`]: every architecture behind one trait ([`models::LanguageModel`]), registered in
//!   one list, detected from config.json or GGUF metadata;
//! - [`text`]: tokenizers from every source, chat templates, sampling, streaming text;
//! - [`engine`]: one generation (prefill, decode loop, stop conditions) over a loaded model.
//!
//! ```no_run
//! use llm_pool::engine::{generate, GenerateParams};
//! use llm_pool::models::{LoadOptions, Model};
//!
//! let mut model = Model::load("models/SmolLM2-135M-Instruct.Q4_1.gguf", &LoadOptions::cpu())?;
//! let params = GenerateParams { max_tokens: 8, ..GenerateParams::default() };
//! let output = generate(&mut model, None, &[6403, 1980, 253, 655], &params, |_| true)?;
//! println!("{:?} ({:?})", output.token_ids, output.finish_reason);
//! # Ok::<(), llm_pool::Error>(())
//! ```

pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod metrics;
pub mod models;
pub mod pool;
pub mod request;
pub mod resources;
pub mod server;
pub mod text;

pub use device::DeviceSpec;
pub use error::{Error, Result};
