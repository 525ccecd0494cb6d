//! Text in, text out: tokenizers from every source, chat templates, sampling, streaming
//! detokenization and stop strings; and what agents need on top: constrained decoding
//! (structured outputs), tool calling, reasoning blocks and logprobs.

pub mod chat;
pub mod constrain;
pub mod gguf_tokenizer;
pub mod logprobs;
pub mod output;
pub mod prompt;
pub mod reasoning;
pub mod sampling;
pub mod stream;
pub mod token_bytes;
pub mod tokenizer;
pub mod tool_calls;
pub mod tools;

pub use chat::{ChatMessage, ChatTemplate};
pub use prompt::{encode_prompt, prepare_prompt, PreparedPrompt, Prompt};
pub use tokenizer::ModelText;
