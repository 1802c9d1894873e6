//! Run directories and checkpoints. A run directory holds `config.json` (the resolved config,
//! written before the first step), `metrics.jsonl` (one line per step), `checkpoints/step-N/`
//! (weights, optimizer state, `state.json`), `checkpoints/latest.json` (written last, so a kill
//! at any moment leaves the previous checkpoint valid) and `final/`.
//!
//! Resume is deterministic: every random choice of a step is a function of (seed, step, slot)
//! and the data order a function of (seed, epoch), so a run resumed from step N continues exactly
//! as the uninterrupted run would have; metrics lines past the checkpoint are dropped.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::optim::AdamW;
use super::trainable::TrainableDrafter;
use super::trainer::TrainError;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.display().to_string(), source }
}

/// [`crate::util::fs::write_atomic`] with this module's error.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    crate::util::fs::write_atomic(path, bytes).map_err(io_err(path))
}

/// What a checkpoint records besides weights and optimizer state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointState {
    pub step: u64,
    /// Sequences consumed so far (the data cursor).
    pub cursor: u64,
    /// Lines of metrics.jsonl that belong to steps ≤ step.
    pub metrics_lines: usize,
    pub config_hash: String,
    /// Sequences per micro-batch over all data-parallel ranks (`batch_sequences` × ranks). A run
    /// resumed with another number of ranks keeps it, so its steps stay what they were (absent
    /// in checkpoints written before ranks existed: one rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_batch: Option<usize>,
    /// The run's length when a time budget cut it below `steps` of the config
    /// ([`crate::train::trainer::RunOptions::deadline`]); a resumed run keeps it, and with it the
    /// learning-rate schedule it was running (absent: the config's `steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_steps: Option<u64>,
}

/// An opened run directory: a new run, or the latest checkpoint of the one being resumed.
pub struct RunDir {
    pub out: PathBuf,
    pub config_hash: String,
    /// The checkpoint to continue from (`--resume` with one written).
    pub latest: Option<CheckpointState>,
    /// This open wrote the run's config.json (no run was there before).
    created: bool,
}

fn config_hash(cfg: &TrainConfig) -> String {
    let text = serde_json::to_string(cfg).unwrap_or_default();
    format!("{:016x}", crate::util::fnv1a64(text.as_bytes()))
}

impl RunDir {
    /// Opens `cfg.out`: refuses a directory holding another run unless `resume`, refuses to
    /// resume with a different config, then writes the config (atomically).
    pub fn open(cfg: &TrainConfig, resume: bool) -> Result<RunDir, TrainError> {
        Self::open_as(cfg, resume, true)
    }

    /// [`RunDir::open`] for one rank of a data-parallel run: only the primary rank (rank 0)
    /// creates the directory and writes the config; the others read what it resumes from.
    pub fn open_as(cfg: &TrainConfig, resume: bool, primary: bool) -> Result<RunDir, TrainError> {
        let out = cfg.out.clone();
        if !primary {
            let latest = Self::read_latest(&out, resume)?;
            return Ok(RunDir { out, config_hash: config_hash(cfg), latest, created: false });
        }
        std::fs::create_dir_all(&out).map_err(io_err(&out))?;
        let cfg_path = out.join("config.json");
        let created = !cfg_path.exists();
        let hash = config_hash(cfg);
        if cfg_path.exists() && !resume {
            return Err(TrainError::Setup(format!(
                "{} already holds a run; pass --resume to continue it, or choose another --out",
                out.display()
            )));
        }
        if resume && cfg_path.exists() {
            let saved = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
            let saved: TrainConfig =
                serde_json::from_str(&saved).map_err(|e| TrainError::Setup(format!("{}: {e}", cfg_path.display())))?;
            if config_hash(&saved) != hash {
                return Err(TrainError::Setup(format!(
                    "--resume: the config differs from the one saved in {}; resume with the same config or start a new --out",
                    cfg_path.display()
                )));
            }
        }
        let cfg_json = serde_json::to_string_pretty(cfg).map_err(|e| TrainError::Setup(e.to_string()))?;
        write_atomically(&cfg_path, cfg_json.as_bytes())?;
        let latest = Self::read_latest(&out, resume)?;
        Ok(RunDir { out, config_hash: hash, latest, created })
    }

    /// Undoes a run this open created, for a run refused before its first step (a config the
    /// drafter or the data rejects): the config it wrote goes, and the directory too if that
    /// leaves it empty, so the corrected command can run as it is, without --resume. A run that
    /// was already there is left alone.
    pub fn abandon(&self) {
        if self.created && self.latest.is_none() {
            let _ = std::fs::remove_file(self.out.join("config.json"));
            let _ = std::fs::remove_dir(&self.out);
        }
    }

    fn read_latest(out: &Path, resume: bool) -> Result<Option<CheckpointState>, TrainError> {
        let latest_path = out.join("checkpoints").join("latest.json");
        if !(resume && latest_path.exists()) {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&latest_path).map_err(io_err(&latest_path))?;
        let s: CheckpointState = serde_json::from_str(&text).map_err(|e| TrainError::Setup(format!("{}: {e}", latest_path.display())))?;
        Ok(Some(s))
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.out.join("checkpoints")
    }

    pub fn checkpoint(&self, step: u64) -> PathBuf {
        self.checkpoints().join(format!("step-{step:06}"))
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.out.join("metrics.jsonl")
    }

    /// The state a run starts from: the latest checkpoint's, or step 0.
    pub fn start_state(&self) -> CheckpointState {
        self.latest.clone().unwrap_or(CheckpointState { step: 0, cursor: 0, metrics_lines: 0, config_hash: self.config_hash.clone(), global_batch: None, budget_steps: None })
    }

    /// Makes metrics.jsonl hold exactly the lines of the steps before the start: empty for a new
    /// run, the checkpoint's lines when resuming.
    pub fn reset_metrics(&self) -> Result<(), TrainError> {
        let path = self.metrics_path();
        match &self.latest {
            Some(s) => truncate_lines(&path, s.metrics_lines),
            None => std::fs::write(&path, b"").map_err(io_err(&path)),
        }
    }

    /// Weights, optimizer state and the cursor, then `latest.json` last. Keeps the two newest.
    pub fn save(&self, drafter: &dyn TrainableDrafter, optim: &AdamW, state: &CheckpointState) -> Result<(), TrainError> {
        let dir = self.checkpoint(state.step);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        drafter.save(&dir)?;
        optim.save(&dir.join("optimizer.safetensors"))?;
        let json = serde_json::to_string_pretty(state).map_err(|e| TrainError::Setup(e.to_string()))?;
        write_atomically(&dir.join("state.json"), json.as_bytes())?;
        write_atomically(&self.checkpoints().join("latest.json"), json.as_bytes())?;
        if let Ok(entries) = std::fs::read_dir(self.checkpoints()) {
            let mut steps: Vec<u64> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("step-")).and_then(|n| n.parse().ok()))
                .collect();
            steps.sort_unstable();
            for s in steps.iter().rev().skip(2) {
                let _ = std::fs::remove_dir_all(self.checkpoint(*s));
            }
        }
        Ok(())
    }
}

fn truncate_lines(path: &Path, keep: usize) -> Result<(), TrainError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let lines: Vec<String> = std::io::BufReader::new(file).lines().take(keep).collect::<Result<_, _>>().map_err(io_err(path))?;
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    write_atomically(path, text.as_bytes())
}
