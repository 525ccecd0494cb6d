//! Text in, text out: tokenizers from every source, chat templates, sampling, streaming
//! detokenization and stop strings.

pub mod chat;
pub mod gguf_tokenizer;
pub mod prompt;
pub mod sampling;
pub mod stream;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use prompt::{encode_prompt, Prompt};
pub use tokenizer::ModelText;
