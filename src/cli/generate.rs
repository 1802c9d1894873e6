//! `specauf generate`: text generation with the target, through the one decode loop
//! (plain AR when no drafter is given).

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context};
use specauf::model::{load_model_on, WeightsMode};
use specauf::drafter::block_choice::choose_for;
use specauf::drafter::AnyDrafter;
use specauf::spec::driver::{generate_streaming, GenerateConfig};
use specauf::spec::proposer::Proposer;
use specauf::tokenizer::ChatMessage;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// `smollm2` (the embedded default, fetched on first use), an HF directory
    /// (config.json + *.safetensors + tokenizer.json) or a .gguf file.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user turn with the model's chat template (as HF
    /// apply_chat_template with add_generation_prompt=True).
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat); without it the template's default system prompt, if any.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Weights on CPU: auto (default: native for a GGUF of Q8_0/Q4_1 tensors, q8 otherwise), native (GGUF types as stored), q8 (int8 blocks), f32 (reference).
    #[arg(long, default_value_t = WeightsMode::default())]
    pub weights: WeightsMode,
    /// A drafter directory (DFlash or Domino: config.json + model.safetensors): speculative decoding.
    #[arg(long)]
    pub drafter: Option<std::path::PathBuf>,
    /// Verify blocks of B tokens instead of the drafter's trained block size (only lower).
    #[arg(long, requires = "drafter")]
    pub block_size: Option<usize>,
    #[command(flatten)]
    pub drafter_run: super::drafter_run::DrafterRunArgs,

    /// Print one JSON object on the last line of stdout instead of streaming text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    if a.prompt.is_empty() {
        bail!("the prompt is empty; pass some text with --prompt");
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0 (0 = greedy)");
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let t = Instant::now();
    let backend = a.device.choice().backend()?;
    let m = load_model_on(&a.model, a.weights, &backend).with_context(|| format!("loading model {}", a.model))?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let prompt_ids = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage::system(s.clone()));
        }
        messages.push(ChatMessage::user(a.prompt.clone()));
        m.tokenizer.encode_chat(&messages, true).context("rendering the chat template")?
    } else {
        m.tokenizer.encode(&a.prompt, true).context("tokenizing the prompt")?
    };
    if prompt_ids.is_empty() {
        bail!("the prompt tokenizes to no tokens");
    }
    let eos = m.eos_token_ids();
    let mut cfg = GenerateConfig::greedy(&m.target, a.max_new_tokens);
    cfg.temperature = a.temperature;
    cfg.top_p = a.top_p;
    cfg.seed = a.seed;
    cfg.eos_token_ids = eos;

    let mut all: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let tokenizer = &m.tokenizer;
    let stream = !a.json;
    let mut out = std::io::stdout();
    let mut on_tokens = |chunk: &[u32]| {
        if !stream {
            return;
        }
        all.extend_from_slice(chunk);
        // Decode the whole output and print what is new, holding back an incomplete UTF-8 tail.
        if let Ok(text) = tokenizer.decode(&all, true) {
            if text.len() > printed && !text.ends_with('\u{FFFD}') && text.is_char_boundary(printed) {
                let _ = write!(out, "{}", &text[printed..]);
                let _ = out.flush();
                printed = text.len();
            }
        }
    };
    let mut choice = None;
    let mut proposer: Option<Box<dyn Proposer + Send>> = match &a.drafter {
        Some(dir) => {
            let mut d = AnyDrafter::load_for(dir, &m.target).with_context(|| format!("loading drafter {}", dir.display()))?;
            let run = a.drafter_run.settings();
            d.apply(&run).with_context(|| format!("drafter {}", dir.display()))?;
            let p_min = run.draft_p_min;
            let trained = d.block_size();
            let d = match a.block_size {
                Some(b) => d.at_block_size(b).with_context(|| format!("drafter {}", dir.display()))?,
                None => {
                    let (d, c) = choose_for(&m.target, d, dir, p_min).with_context(|| format!("choosing the block size of drafter {}", dir.display()))?;
                    if !a.json {
                        eprintln!("[block size: {}]", c.summary(trained));
                    }
                    choice = Some(c);
                    d
                }
            };
            Some(d.into_proposer_on(m.target.backend()))
        }
        None => None,
    };
    let res = generate_streaming(&m.target, proposer.as_mut().map(|p| &mut **p as &mut dyn Proposer), &prompt_ids, &cfg, &mut on_tokens)
        .context("generating")?;
    let text = m.tokenizer.decode(&res.token_ids, true).context("decoding the output")?;
    let n = res.token_ids.len();
    let tokens_per_s = if res.decode_ms > 0.0 { (n.saturating_sub(1)) as f64 / (res.decode_ms / 1e3) } else { 0.0 };
    if a.json {
        let v = serde_json::json!({
            "model": m.name,
            "prompt_ids": prompt_ids,
            "token_ids": res.token_ids,
            "text": text,
            "finish_reason": res.finish_reason,
            "tokens_per_s": tokens_per_s,
            "prefill_ms": res.prefill_ms,
            "decode_ms": res.decode_ms,
            "draft_ms": res.draft_ms,
            "verify_ms": res.verify_ms,
            "load_ms": load_ms,
            "weights": m.target.weights_mode(),
            "tau": res.tau,
            "cycles": res.cycles,
            "accept_lengths": res.accept_lengths,
            "block_size": res.block_size,
            "block_choice": choice,
        });
        println!("{v}");
    } else {
        if printed < text.len() && text.is_char_boundary(printed) {
            print!("{}", &text[printed..]);
        }
        println!();
        let _ = std::io::stdout().flush();
        eprintln!(
            "[{} prompt tokens, {n} new tokens; load {:.0} ms, prefill {:.0} ms, decode {:.1} tokens/s, finish: {:?}{}]",
            prompt_ids.len(),
            load_ms,
            res.prefill_ms,
            tokens_per_s,
            res.finish_reason,
            if a.drafter.is_some() { format!(", tau {:.2} over {} cycles (block {})", res.tau, res.cycles, res.block_size) } else { String::new() }
        );
    }
    Ok(())
}
