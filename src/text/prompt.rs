//! Prompts, and the one place a prompt becomes token ids: raw ids as given, text through the
//! model's tokenizer (with BOS where the model wants it), chat messages through the model's chat
//! template. The worker and the CLI both call [`encode_prompt`], so a prompt means the same
//! tokens whichever way it arrives.

use super::constrain::{Constrained, Grammar};
use super::output::OutputFormat;
use super::tools::{plan_chat, ChatOptions};
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
    prepare_prompt(model, text, prompt, &ChatOptions::default(), None).map(|p| p.ids)
}

/// A prompt made ready for the model: its ids, and what the chat template decided about the
/// output (a grammar that forces a tool call, how to read tool calls and reasoning back).
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    /// The token ids.
    pub ids: Vec<u32>,
    /// The grammar the output must follow: the request's `response_format`, or the one the
    /// tools call for.
    pub grammar: Option<Constrained>,
    /// How the output is read back.
    pub output: OutputFormat,
}

/// Turns a prompt into token ids with a chat request's tools and template variables, and the
/// request's `response_format`. What [`encode_prompt`] does, plus tool calling and reasoning.
pub fn prepare_prompt(
    model: &str,
    text: Option<&ModelText>,
    prompt: &Prompt,
    options: &ChatOptions,
    response_format: Option<&Grammar>,
) -> Result<PreparedPrompt> {
    let no_tokenizer = || Error::InvalidParameter {
        param: prompt.param().into(),
        message: format!("model {model} has no tokenizer; send token ids instead of text"),
    };
    // The request's own grammar, unless the chat's tools call for theirs.
    let mut grammar = response_format.map(Constrained::response_format);
    let mut output = OutputFormat::default();
    // A prompt the tokenizer refuses is the request's fault: the error names its parameter.
    let unencodable = |e: Error| Error::InvalidParameter {
        param: prompt.param().into(),
        message: format!("model {model} cannot tokenize it: {e}"),
    };
    let ids = match prompt {
        Prompt::Ids(ids) => ids.clone(),
        Prompt::Text(s) => text
            .ok_or_else(no_tokenizer)?
            .encode(s, true)
            .map_err(unencodable)?,
        Prompt::Chat(messages) => {
            let text = text.ok_or_else(no_tokenizer)?;
            let plan = plan_chat(text, "messages", messages, options, response_format).map_err(
                |e| match e {
                    Error::InvalidParameter { param, message }
                        if param == "messages" && text.chat_template.is_none() =>
                    {
                        Error::InvalidParameter {
                            param,
                            message: format!("model {model}: {message}"),
                        }
                    }
                    // The template failed on these messages, the request's only input to it.
                    Error::Tokenizer(message) => Error::InvalidParameter {
                        param: "messages".into(),
                        message: format!("model {model}: {message}"),
                    },
                    other => other,
                },
            )?;
            if plan.tool_grammar.is_some() {
                grammar = plan.tool_grammar;
            }
            output = plan.output;
            // The template writes BOS itself; encoding must not add another.
            text.encode(&plan.prompt, false).map_err(unencodable)?
        }
    };
    if ids.is_empty() {
        return Err(Error::InvalidParameter {
            param: prompt.param().into(),
            message: "the prompt has no tokens".into(),
        });
    }
    Ok(PreparedPrompt {
        ids,
        grammar,
        output,
    })
}
