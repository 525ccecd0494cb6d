//! Rebuilding a `tokenizers::Tokenizer` from the vocabulary embedded in a GGUF file.
//!
//! Two vocabulary kinds, as llama.cpp writes them:
//!
//! - `tokenizer.ggml.model = gpt2`: byte-level BPE from `tokens` and `merges`. The
//!   pre-tokenizer follows `tokenizer.ggml.pre` (llama.cpp's names), because the split regex
//!   decides the ids: candle's `TokenizerFromGguf` always uses GPT-2's with a prefix space, and
//!   gets SmolLM2's "Hello" and "user" wrong.
//! - `tokenizer.ggml.model = llama`: SentencePiece (tokens and scores, no merges, as in
//!   Gemma 3). SentencePiece's BPE merges the adjacent pair whose merged piece scores highest;
//!   we derive the equivalent merge list (every split of every piece into two pieces, ranked by
//!   the merged piece's score, as transformers' converter does) and use byte fallback.
//!
//! Control tokens (`token_type` 3) become special added tokens and user-defined ones (4) plain
//! added tokens, so both are matched whole in text, as llama.cpp does when parsing a prompt.

use crate::error::{Error, Result};
use crate::models::gguf::GgufFile;
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// llama.cpp pre-tokenizer names accepted for byte-level BPE vocabularies.
pub const SUPPORTED_PRE: &[&str] = &[
    "default",
    "gpt2",
    "gpt-2",
    "smollm",
    "starcoder",
    "refact",
    "codeshell",
    "llama3",
    "llama-bpe",
    "qwen2",
    "deepseek-r1-qwen",
];

/// Llama 3's split regex (transformers' tokenizer.json for Llama 3).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's split regex: like Llama 3's, but one digit at a time.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Builds the tokenizer embedded in a GGUF file, or `Ok(None)` when the file has none.
pub fn from_gguf(file: &GgufFile) -> Result<Option<Tokenizer>> {
    let Some(model) = file.get("tokenizer.ggml.model") else {
        return Ok(None);
    };
    let model = model
        .to_string()
        .map_err(|_| bad(file, "tokenizer.ggml.model", "must be a string"))?
        .clone();
    let tokens = string_array(file, "tokenizer.ggml.tokens")?;
    let token_types = int_array(file, "tokenizer.ggml.token_type")?;
    let mut tokenizer = match model.as_str() {
        "gpt2" => byte_level_bpe(file, &tokens)?,
        "llama" => sentencepiece_bpe(file, &tokens)?,
        other => {
            return Err(bad(
                file,
                "tokenizer.ggml.model",
                &format!(
                "{other:?} is not supported; allowed: gpt2 (byte-level BPE), llama (SentencePiece)"
            ),
            ))
        }
    };

    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        match token_types.get(id).copied() {
            Some(TOKEN_TYPE_CONTROL) => special.push(AddedToken::from(token.clone(), true)),
            Some(TOKEN_TYPE_USER_DEFINED) => {
                user_defined.push(AddedToken::from(token.clone(), false).normalized(false))
            }
            _ => {}
        }
    }
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&user_defined);

    let default_add_bos = model == "llama";
    let add_bos = match file.get("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(b)) => *b,
        _ => default_add_bos,
    };
    let add_eos = matches!(
        file.get("tokenizer.ggml.add_eos_token"),
        Some(Value::Bool(true))
    );
    let token_for = |key: &str| -> Result<Option<(String, u32)>> {
        match file.opt_u64(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id as usize)
                .map(|t| Some((t.clone(), id as u32)))
                .ok_or_else(|| bad(file, key, &format!("id {id} is outside the vocabulary"))),
        }
    };
    let bos = token_for("tokenizer.ggml.bos_token_id")?;
    let eos = token_for("tokenizer.ggml.eos_token_id")?;
    let mut single = Vec::new();
    let mut specials = Vec::new();
    if add_bos {
        let (text, id) = bos.clone().ok_or_else(|| {
            bad(
                file,
                "tokenizer.ggml.bos_token_id",
                "is missing but add_bos_token is set",
            )
        })?;
        single.push(text.clone());
        specials.push((text, id));
    }
    single.push("$A".to_string());
    if add_eos {
        if let Some((text, id)) = eos.clone() {
            single.push(text.clone());
            specials.push((text, id));
        }
    }
    if add_bos || add_eos {
        let pair = format!("{} $B", single.join(" "));
        let processor = TemplateProcessing::builder()
            .try_single(single.join(" "))
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", file.path.display())))?
            .special_tokens(specials)
            .build()
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", file.path.display())))?;
        tokenizer.with_post_processor(Some(processor));
    }
    Ok(Some(tokenizer))
}

fn bad(file: &GgufFile, key: &str, message: &str) -> Error {
    Error::Tokenizer(format!(
        "{} (GGUF metadata) {key}: {message}",
        file.path.display()
    ))
}

fn string_array(file: &GgufFile, key: &str) -> Result<Vec<String>> {
    match file.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| bad(file, key, "must be an array of strings"))
            })
            .collect(),
        Some(_) => Err(bad(file, key, "must be an array of strings")),
        None => Err(bad(file, key, "is missing")),
    }
}

fn int_array(file: &GgufFile, key: &str) -> Result<Vec<i32>> {
    match file.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.to_i32()
                    .map_err(|_| bad(file, key, "must be an array of i32"))
            })
            .collect(),
        Some(_) => Err(bad(file, key, "must be an array of i32")),
        // Without token types no token is special; llama.cpp treats them all as normal too.
        None => Ok(Vec::new()),
    }
}

fn float_array(file: &GgufFile, key: &str) -> Result<Vec<f32>> {
    match file.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.to_f32()
                    .map_err(|_| bad(file, key, "must be an array of f32"))
            })
            .collect(),
        Some(_) => Err(bad(file, key, "must be an array of f32")),
        None => Err(bad(
            file,
            key,
            "is missing (a SentencePiece vocabulary needs scores)",
        )),
    }
}

fn vocab_map(tokens: &[String]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        // Keep the first id of a duplicated piece, as llama.cpp's token_to_id does.
        vocab.entry(token.clone()).or_insert(id as u32);
    }
    vocab
}

fn tokenizer_error(file: &GgufFile, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!(
        "{}: building the tokenizer: {e}",
        file.path.display()
    ))
}

fn byte_level_bpe(file: &GgufFile, tokens: &[String]) -> Result<Tokenizer> {
    let merges_raw = string_array(file, "tokenizer.ggml.merges")?;
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            bad(
                file,
                "tokenizer.ggml.merges",
                &format!("entry {i} {m:?} is not two pieces separated by a space"),
            )
        })?;
        merges.push((a.to_string(), b.to_string()));
    }
    let pre = match file.get("tokenizer.ggml.pre") {
        Some(v) => v
            .to_string()
            .map_err(|_| bad(file, "tokenizer.ggml.pre", "must be a string"))?
            .clone(),
        None => "default".to_string(),
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(tokens), merges)
        .build()
        .map_err(|e| tokenizer_error(file, e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: tokenizers::PreTokenizerWrapper = match pre.as_str() {
        "default" | "gpt2" | "gpt-2" => byte_level.into(),
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        "llama3" | "llama-bpe" | "qwen2" | "deepseek-r1-qwen" => {
            let regex = if pre.starts_with("llama") {
                LLAMA3_REGEX
            } else {
                QWEN2_REGEX
            };
            let split = Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tokenizer_error(file, e))?;
            PreTokenizerSequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        other => {
            return Err(bad(
                file,
                "tokenizer.ggml.pre",
                &format!(
                    "{other:?} is not supported; allowed: {}",
                    SUPPORTED_PRE.join(", ")
                ),
            ))
        }
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

fn sentencepiece_bpe(file: &GgufFile, tokens: &[String]) -> Result<Tokenizer> {
    let scores = float_array(file, "tokenizer.ggml.scores")?;
    if scores.len() != tokens.len() {
        return Err(bad(
            file,
            "tokenizer.ggml.scores",
            &format!(
                "has {} entries but there are {} tokens",
                scores.len(),
                tokens.len()
            ),
        ));
    }
    let vocab = vocab_map(tokens);
    // Every way of writing a piece as two pieces is a merge that produces it; SentencePiece
    // applies the merge whose result scores highest first. Within a piece, ties go to the
    // split with the lower left, then right, id (transformers' SentencePieceExtractor).
    let mut merges: Vec<(f32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if vocab.get(piece) != Some(&(id as u32)) {
            continue;
        }
        let mut local = Vec::new();
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((li, ri));
            }
        }
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(li, ri)| (scores[id], li, ri)));
    }
    // A stable sort by score, descending, keeps the discovery order among equal scores.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|(_, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect();
    let unk = file
        .opt_u64("tokenizer.ggml.unknown_token_id")?
        .and_then(|id| tokens.get(id as usize).cloned());
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|e| tokenizer_error(file, e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let add_space_prefix = !matches!(
        file.get("tokenizer.ggml.add_space_prefix"),
        Some(Value::Bool(false))
    );
    let replace = Replace::new(" ", "▁").map_err(|e| tokenizer_error(file, e))?;
    let mut decoders = vec![
        Replace::new("▁", " ")
            .map_err(|e| tokenizer_error(file, e))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
            Prepend::new("▁".to_string()).into(),
            replace.into(),
        ])));
        decoders.push(Strip::new(' ', 1, 0).into());
    } else {
        tokenizer.with_normalizer(Some(replace));
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}
