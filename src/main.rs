//! The `llm-pool` command line.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use llm_pool::config::SamplingDefaults;
use llm_pool::engine::run;
use llm_pool::models::{LoadOptions, Model};
use llm_pool::request::{GenerateRequest, Grammar, Limits, Prompt};
use llm_pool::text::{ChatMessage, ModelText};
use llm_pool::DeviceSpec;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "llm-pool",
    version,
    about = "A multi-model LLM inference worker pool on candle",
    after_help = "Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=llm_pool=debug) to see more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from one prompt with one model, then exit.
    Generate(Box<GenerateArgs>),
    /// Start the pool from a config file and generate from stdin, one prompt per line.
    ///
    /// A line goes to the first model of the catalog, or to NAME when it starts with
    /// `@NAME `. Text streams to stdout as it is generated; with --json, one JSON object per
    /// line instead.
    Run(RunArgs),
    /// Serve the models of a config file over an OpenAI-compatible HTTP API.
    Serve {
        /// The config file.
        #[arg(long, default_value = "config/default.toml")]
        config: PathBuf,
        /// An optional local config file merged over it.
        #[arg(long)]
        local_config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The config file.
    #[arg(long, default_value = "config/default.toml")]
    config: PathBuf,
    /// An optional local config file merged over it.
    #[arg(long)]
    local_config: Option<PathBuf>,
    /// Send each line as a chat message (through the model's template) instead of raw text.
    #[arg(long)]
    chat: bool,
    /// The most tokens to generate per line.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Print one JSON object per line instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A model directory (config.json + *.safetensors) or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// The prompt text (needs a tokenizer). With --chat, the user's message.
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids, e.g. 1,2,3 (works without a tokenizer).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Treat --prompt as a user message and render it through the model's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// A system message to put before the user's (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// A chat template (Jinja) file to use instead of the model's own.
    #[arg(long, requires = "chat")]
    template: Option<PathBuf>,
    /// A string that ends the generation (not included in the output); repeatable.
    #[arg(long)]
    stop: Vec<String>,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature, 0 to 2; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Drop tokens less likely than MIN_P times the most likely one, in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    min_p: f64,
    /// Penalise tokens already seen (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Subtracted once from the logit of each token already generated, -2 to 2.
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f64,
    /// Subtracted per occurrence from the logit of each token already generated, -2 to 2.
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f64,
    /// Random seed for sampling; the same seed gives the same output.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device: cpu, cuda:N or metal:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Constrain the output to JSON valid against the JSON Schema in FILE.
    #[arg(long, value_name = "FILE", group = "format")]
    json_schema: Option<PathBuf>,
    /// Constrain the output to one JSON object.
    #[arg(long, group = "format")]
    json_object: bool,
    /// Constrain the output to match a regular expression.
    #[arg(long, value_name = "REGEX", group = "format")]
    regex: Option<String>,
    /// Constrain the output to the Lark grammar in FILE (llguidance's dialect).
    #[arg(long, value_name = "FILE", group = "format")]
    grammar: Option<PathBuf>,
    /// With --json: each token's log-probability and its N most likely alternatives (0-20).
    #[arg(long, value_name = "N", requires = "json")]
    logprobs: Option<usize>,
    /// Print text as it is generated.
    #[arg(long, conflicts_with = "json")]
    stream: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,llm_pool=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => run_generate(*args),
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(run_pool(args))
        }
        Command::Serve {
            config,
            local_config,
        } => {
            let config = llm_pool::config::Config::load(&config, local_config.as_deref())
                .with_context(|| format!("loading {}", config.display()))?;
            actix_web::rt::System::new().block_on(llm_pool::server::serve(config))?;
            Ok(())
        }
    }
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let device: DeviceSpec = args.device.parse()?;
    let options = LoadOptions::for_device(device)?;
    let mut model = Model::load(&args.model, &options)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let template = match &args.template {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the chat template {}", path.display()))?,
        ),
        None => None,
    };
    let text = ModelText::load(&args.model, model.info(), template.as_deref())?;
    let prompt = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => Prompt::Ids(ids.clone()),
        (None, Some(prompt)) if args.chat => {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(ChatMessage::new("system", system));
            }
            messages.push(ChatMessage::new("user", prompt));
            Prompt::Chat(messages)
        }
        (None, Some(prompt)) => Prompt::Text(prompt.clone()),
        (None, None) => bail!("pass --prompt or --prompt-ids"),
    };
    let request = GenerateRequest {
        prompt,
        max_tokens: Some(args.max_tokens),
        temperature: Some(args.temperature),
        top_p: Some(args.top_p),
        top_k: Some(args.top_k),
        min_p: Some(args.min_p),
        repetition_penalty: Some(args.repetition_penalty),
        presence_penalty: Some(args.presence_penalty),
        frequency_penalty: Some(args.frequency_penalty),
        seed: Some(args.seed),
        stop: args.stop.clone(),
        response_format: output_format(&args)?,
        logprobs: args.logprobs,
        ..GenerateRequest::ids(Vec::new())
    };
    // The flags to change, where the library's error would name request parameters.
    match &text {
        None if !matches!(request.prompt, Prompt::Ids(_)) => bail!(
            "{} has no tokenizer; pass --prompt-ids instead of --prompt",
            args.model.display()
        ),
        Some(t) if args.chat && t.chat_template.is_none() => bail!(
            "{} has no chat template (a base model?); drop --chat, or pass --template FILE",
            args.model.display()
        ),
        _ => {}
    }
    // The same two stages as the pool: the request's checks, then the one preparation for the
    // loaded model that a worker runs.
    let name = args.model.display().to_string();
    let defaults = SamplingDefaults::default();
    let limits = Limits {
        model: &name,
        context: Some(model.info().max_context),
        defaults: &defaults,
    };
    let prepared = request
        .check(&limits)
        .and_then(|checked| checked.prepare(&limits, text.as_ref()))
        .map_err(flag_error)?;
    let prompt_ids = prepared.prompt().to_vec();
    let stream = args.stream;
    let mut stdout = std::io::stdout().lock();
    let output = run(&mut model, text.as_ref(), prepared, |event| {
        if stream {
            if event.text.is_empty() && text.is_none() {
                let _ = write!(stdout, "{} ", event.id);
            } else {
                let _ = write!(stdout, "{}", event.text);
            }
            let _ = stdout.flush();
        }
        true
    })?;
    let decode_tokens = output.completion_tokens().saturating_sub(1);
    let prefill_s = output.prefill.as_secs_f64();
    let decode_s = output.decode.as_secs_f64();
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    if args.json {
        let json = serde_json::json!({
            "model": args.model.display().to_string(),
            "architecture": model.info().architecture,
            "prompt_ids": prompt_ids,
            "token_ids": output.token_ids,
            "text": output.text,
            "finish_reason": output.finish_reason.as_str(),
            "prompt_tokens": output.prompt_tokens,
            "completion_tokens": output.completion_tokens(),
            "prefill_ms": prefill_s * 1e3,
            "decode_ms": decode_s * 1e3,
            "logprobs": args.logprobs.map(|_| output.logprobs.iter().map(|t| {
                let entry = |l: &llm_pool::text::logprobs::Logprob| {
                    serde_json::json!({"id": l.id, "token": l.token, "logprob": l.logprob})
                };
                let mut e = entry(&t.chosen);
                e["top"] = t.top.iter().map(entry).collect();
                e
            }).collect::<Vec<_>>()),
            "prefill_tokens_per_s": rate(output.prompt_tokens, prefill_s),
            "decode_tokens_per_s": rate(decode_tokens, decode_s),
            "peak_rss_bytes": llm_pool::resources::peak_rss_bytes(),
        });
        writeln!(stdout, "{json}")?;
    } else {
        if stream {
            writeln!(stdout)?;
        } else {
            match &output.text {
                Some(t) => writeln!(stdout, "{t}")?,
                None => writeln!(stdout, "{:?}", output.token_ids)?,
            }
        }
        eprintln!(
            "{} prompt tokens, {} generated ({}); time to first token {:.1} ms, decode {:.1} tok/s",
            output.prompt_tokens,
            output.completion_tokens(),
            output.finish_reason.as_str(),
            prefill_s * 1e3,
            rate(decode_tokens, decode_s)
        );
    }
    Ok(())
}

/// The grammar the generate flags ask for, if any.
fn output_format(args: &GenerateArgs) -> anyhow::Result<Option<Grammar>> {
    let read = |flag: &str, path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
    };
    Ok(if let Some(path) = &args.json_schema {
        let schema = serde_json::from_str(&read("--json-schema", path)?)
            .with_context(|| format!("--json-schema {}: not JSON", path.display()))?;
        Some(Grammar::JsonSchema(schema))
    } else if args.json_object {
        Some(Grammar::JsonObject)
    } else if let Some(rx) = &args.regex {
        Some(Grammar::Regex(rx.clone()))
    } else if let Some(path) = &args.grammar {
        Some(Grammar::Lark(read("--grammar", path)?))
    } else {
        None
    })
}

/// A library error as the CLI's user sees it: the flag instead of the request field.
fn flag_error(e: llm_pool::Error) -> anyhow::Error {
    match &e {
        llm_pool::Error::InvalidParameter { param, message } if param == "response_format" => {
            anyhow::anyhow!(
                "the output format (--json-schema, --json-object, --regex or --grammar): {message}"
            )
        }
        llm_pool::Error::InvalidParameter { param, message } if param == "top_logprobs" => {
            anyhow::anyhow!("--logprobs: {message}")
        }
        _ => e.into(),
    }
}

async fn run_pool(args: RunArgs) -> anyhow::Result<()> {
    use futures::StreamExt;
    use llm_pool::pool::{GenerationEvent, Pool};
    use tokio::io::AsyncBufReadExt;

    let config = llm_pool::config::Config::load(&args.config, args.local_config.as_deref())
        .with_context(|| format!("loading {}", args.config.display()))?;
    let Some(default_model) = config.models.first().map(|m| m.name.clone()) else {
        bail!("{} configures no models", args.config.display());
    };
    eprintln!(
        "loading {} model(s): {}",
        config.models.len(),
        config
            .models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let pool = Pool::start(config).await?;
    for m in pool.models() {
        eprintln!(
            "  {:<16} {:<9} {:<6} {}",
            m.name,
            m.state.as_str(),
            m.device,
            m.architecture.unwrap_or("-")
        );
    }
    eprintln!("ready: one prompt per line (prefix `@model ` to pick a model), Ctrl-D to end");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (model, prompt) = match line.strip_prefix('@').and_then(|l| l.split_once(' ')) {
            Some((model, prompt)) => (model.to_string(), prompt.to_string()),
            None => (default_model.clone(), line.to_string()),
        };
        let mut request = if args.chat {
            GenerateRequest::chat(vec![ChatMessage::new("user", prompt)])
        } else {
            GenerateRequest::text(prompt)
        };
        request.max_tokens = args.max_tokens;
        let mut stream = match pool.generate_stream(&model, request) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        let mut stdout = std::io::stdout();
        while let Some(event) = stream.next().await {
            match event {
                Ok(GenerationEvent::Token { text, .. }) if !args.json => {
                    print!("{text}");
                    let _ = stdout.flush();
                }
                Ok(GenerationEvent::Token { .. }) => {}
                Ok(GenerationEvent::Done(r)) => {
                    if args.json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "model": model,
                                "text": r.text,
                                "token_ids": r.token_ids,
                                "finish_reason": r.finish_reason.as_str(),
                                "prompt_tokens": r.prompt_tokens,
                                "completion_tokens": r.completion_tokens(),
                                "time_to_first_token_ms": r.time_to_first_token.as_secs_f64() * 1e3,
                                "duration_ms": r.duration.as_secs_f64() * 1e3,
                            })
                        );
                    } else {
                        println!();
                        eprintln!(
                            "[{}: {} prompt + {} generated tokens, {}, first token {:.0} ms, total {:.0} ms]",
                            model,
                            r.prompt_tokens,
                            r.completion_tokens(),
                            r.finish_reason.as_str(),
                            r.time_to_first_token.as_secs_f64() * 1e3,
                            r.duration.as_secs_f64() * 1e3
                        );
                    }
                }
                Err(e) => eprintln!("error: {e}"),
            }
        }
    }
    pool.shutdown().await;
    Ok(())
}
