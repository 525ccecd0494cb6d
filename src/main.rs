//! The `llm-pool` command line.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use llm_pool::engine::{generate, GenerateParams};
use llm_pool::models::{LoadOptions, Model};
use llm_pool::text::sampling::SamplingParams;
use llm_pool::text::tokenizer;
use llm_pool::DeviceSpec;
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "llm-pool",
    version,
    about = "A multi-model LLM inference worker pool on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from one prompt with one model, then exit.
    Generate(GenerateArgs),
    /// Serve the models of a config file over an OpenAI-compatible HTTP API.
    Serve {
        /// The config file.
        #[arg(long, default_value = "config/default.toml")]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A model directory (config.json + *.safetensors) or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// The prompt text (needs a tokenizer).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device: cpu, cuda:N or metal:N.
    #[arg(long, default_value = "cpu")]
    device: String,
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
        Command::Generate(args) => run_generate(args),
        Command::Serve { .. } => {
            bail!("`serve` is not built yet: the HTTP host lands with the pool")
        }
    }
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let device: DeviceSpec = args.device.parse()?;
    let options = LoadOptions::for_device(device)?;
    let mut model = Model::load(&args.model, &options)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let tokenizer = tokenizer::load_for_model(&args.model)?;
    let prompt_ids = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let Some(tok) = &tokenizer else {
                bail!(
                    "{} has no tokenizer.json; pass --prompt-ids instead of --prompt",
                    args.model.display()
                );
            };
            tok.encode(text.as_str(), true)
                .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
                .get_ids()
                .to_vec()
        }
        (None, None) => bail!("pass --prompt or --prompt-ids"),
    };
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            seed: args.seed,
            ..SamplingParams::default()
        },
        ..GenerateParams::default()
    };
    let output = generate(&mut model, &prompt_ids, &params, |_| true)?;
    let text = match &tokenizer {
        Some(tok) => Some(
            tok.decode(&output.token_ids, true)
                .map_err(|e| anyhow::anyhow!("decoding: {e}"))?,
        ),
        None => None,
    };
    let decode_tokens = output.completion_tokens().saturating_sub(1);
    let prefill_s = output.prefill.as_secs_f64();
    let decode_s = output.decode.as_secs_f64();
    if args.json {
        let json = serde_json::json!({
            "model": args.model.display().to_string(),
            "architecture": model.info().architecture,
            "token_ids": output.token_ids,
            "text": text,
            "finish_reason": output.finish_reason.as_str(),
            "prompt_tokens": output.prompt_tokens,
            "completion_tokens": output.completion_tokens(),
            "prefill_ms": prefill_s * 1e3,
            "decode_ms": decode_s * 1e3,
            "prefill_tokens_per_s": if prefill_s > 0.0 { output.prompt_tokens as f64 / prefill_s } else { 0.0 },
            "decode_tokens_per_s": if decode_s > 0.0 { decode_tokens as f64 / decode_s } else { 0.0 },
        });
        println!("{json}");
    } else {
        let mut out = std::io::stdout().lock();
        match text {
            Some(t) => writeln!(out, "{t}")?,
            None => writeln!(out, "{:?}", output.token_ids)?,
        }
        eprintln!(
            "{} prompt tokens, {} generated ({}); prefill {:.1} ms, decode {:.1} tok/s",
            output.prompt_tokens,
            output.completion_tokens(),
            output.finish_reason.as_str(),
            prefill_s * 1e3,
            if decode_s > 0.0 {
                decode_tokens as f64 / decode_s
            } else {
                0.0
            }
        );
    }
    Ok(())
}
