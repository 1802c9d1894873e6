//! `specauf serve`: an OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, `/health`, `/metrics`). Parses arguments, loads, starts; the server is
//! `specauf::serve`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use specauf::model::WeightsMode;
use specauf::serve::{self, ServeOptions};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// `smollm2` (the embedded default, fetched on first use), an HF directory or a .gguf file.
    /// Clients name the model by this value as given, unless --served-model-name is set.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// A DFlash or Domino drafter directory: speculative decoding (same output at T = 0).
    #[arg(long)]
    pub drafter: Option<std::path::PathBuf>,
    /// Run a DFlash drafter at a smaller block than it was trained with (default: chosen from
    /// measurement at start-up, as `generate` chooses it).
    #[arg(long)]
    pub block_size: Option<usize>,
    #[command(flatten)]
    pub drafter_run: super::drafter_run::DrafterRunArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Requests decoded at once; each holds its own KV cache.
    #[arg(long, default_value_t = 8)]
    pub max_concurrency: usize,
    /// With a drafter: when at least this many requests are decoded together, cycles run as
    /// plain batched decode steps without drafts, which cost less than the drafts and the
    /// longer verify at that batch (vLLM's option of the same name); 0: always draft.
    #[arg(long, default_value_t = serve::DEFAULT_SPECULATIVE_DISABLE_BY_BATCH_SIZE)]
    pub speculative_disable_by_batch_size: usize,
    /// Requests that may wait for a slot; beyond them the server answers 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model id of requests and /v1/models (default: the --model value as given).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Seconds in-flight requests may run after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10.0)]
    pub shutdown_grace_s: f64,
    /// Weights on CPU: auto (default: native for a GGUF of Q8_0/Q4_1 tensors, q8 otherwise), native (GGUF types as stored), q8 (int8 blocks), f32 (reference); every mode but f32 is batch-invariant, so T = 0 output
    /// equals `generate`'s.
    #[arg(long, default_value_t = WeightsMode::default())]
    pub weights: WeightsMode,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    if !(a.shutdown_grace_s >= 0.0 && a.shutdown_grace_s.is_finite()) {
        anyhow::bail!("--shutdown-grace-s must be a finite number >= 0");
    }
    let served = serve::load(&a.model, a.weights, a.device.choice(), a.drafter.as_deref(), a.block_size, &a.drafter_run.settings())?;
    let drafter = match (&a.drafter, &served.drafter) {
        (Some(dir), Some(d)) => match &served.block_choice {
            Some(c) => format!("{} drafter {} ({})", d.kind(), dir.display(), c.summary(c.verify_ms.len())),
            None => format!("{} drafter {} (block {})", d.kind(), dir.display(), d.block_size()),
        },
        _ => "no drafter (plain decoding)".to_string(),
    };
    let opts = ServeOptions {
        served_model_name: a.served_model_name.clone(),
        max_concurrency: a.max_concurrency,
        max_queue: a.max_queue,
        api_key: a.api_key.clone(),
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace_s),
        speculative_disable_by_batch_size: a.speculative_disable_by_batch_size,
    };
    let addr = SocketAddr::new(a.host, a.port);
    serve::run_until_signal(served, opts, addr, |bound, name| {
        eprintln!(
            "serving `{name}` with {drafter} on http://{bound} (max concurrency {}, queue {}{}); Ctrl-C to stop",
            a.max_concurrency,
            a.max_queue,
            if a.api_key.is_some() { ", API key required" } else { "" }
        );
    })
    .with_context(|| format!("serving on {addr}"))?;
    eprintln!("stopped");
    Ok(())
}
