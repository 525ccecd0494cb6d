//! Prompts, and the one place a prompt becomes token ids: raw ids as given, text through the
//! model's tokenizer (with BOS where the model wants it), chat messages through the model's chat
//! template. The worker and the CLI both call [`encode_prompt`], so a prompt means the same
//! tokens whichever way it arrives.

use super::{ChatMessage, ModelText};
use crate::error::{Error, Result};

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Raw text, tokenized with the model's tokenizer (BOS added where the model wants it).
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
    /// Chat messages, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

impl Prompt {
    /// The request parameter this prompt came in: `messages` for chat, `prompt` otherwise.
    /// Errors about the prompt (too long, empty, untokenizable) name it.
    pub fn param(&self) -> &'static str {
        match self {
            Prompt::Chat(_) => "messages",
            Prompt::Text(_) | Prompt::Ids(_) => "prompt",
        }
    }
}

/// Turns a prompt into the token ids the model sees.
///
/// `model` names the model in errors; `text` is its tokenizer side (`None` for a model without
/// a tokenizer, which accepts only token ids).
///
/// ```no_run
/// use llm_pool::text::{encode_prompt, ChatMessage, ModelText, Prompt};
/// # fn demo(text: &ModelText) -> llm_pool::Result<()> {
/// let chat = Prompt::Chat(vec![ChatMessage::new("user", "Hi!")]);
/// let ids = encode_prompt("smollm2", Some(text), &chat)?;
/// assert!(!ids.is_empty());
/// # Ok(())
/// # }
/// ```
pub fn encode_prompt(model: &str, text: Option<&ModelText>, prompt: &Prompt) -> Result<Vec<u32>> {
    let no_tokenizer = || Error::InvalidParameter {
        param: prompt.param().into(),
        message: format!("model {model} has no tokenizer; send token ids instead of text"),
    };
    let ids = match prompt {
        Prompt::Ids(ids) => ids.clone(),
        Prompt::Text(s) => text.ok_or_else(no_tokenizer)?.encode(s, true)?,
        Prompt::Chat(messages) => {
            let text = text.ok_or_else(no_tokenizer)?;
            let template = text.chat_template.as_ref().ok_or_else(|| Error::InvalidParameter {
                param: "messages".into(),
                message: format!(
                    "model {model} has no chat template (a base model?); send a plain prompt, or set chat_template in its config"
                ),
            })?;
            if messages.is_empty() {
                return Err(Error::InvalidParameter {
                    param: "messages".into(),
                    message: "at least one message is needed".into(),
                });
            }
            // The template writes BOS itself; encoding must not add another.
            text.encode(&template.render(messages, true)?, false)?
        }
    };
    if ids.is_empty() {
        return Err(Error::InvalidParameter {
            param: prompt.param().into(),
            message: "the prompt has no tokens".into(),
        });
    }
    Ok(ids)
}
