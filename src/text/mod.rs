//! Text in, text out: tokenizers and sampling.

pub mod sampling;
pub mod tokenizer;
