//! The paper's comparison on the embedded default: DFlash with decay (the baseline), auf and
//! auf+decay, full and dpace for context, Domino with decay and auf — on identical data
//! (target-regenerated), steps, seed and evaluation. Resumable: the data stage resumes its
//! regeneration, each arm resumes its training from its last checkpoint and is skipped once
//! finished, and the evaluation resumes from its journal and is skipped once written.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::report::Arm;
use super::stages::{self, EvalDrafterSpec, EvalPlan, PreparePlan, StageError};
use crate::data::regenerate::RegenerateMode;
use crate::data::FeatureDtype;
use crate::drafter::DrafterKind;
use crate::model::WeightsMode;
use crate::nn::DeviceChoice;
use crate::train::config::TrainConfig;
use crate::train::objective::Objective;
use crate::util::progress::{Observer, Progress, Unit};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaperConfig {
    #[serde(rename = "_comment", default)]
    _comment: Option<String>,
    pub model: String,
    pub data: DataCfg,
    pub train: TrainCfg,
    pub arms: Vec<Arm>,
    pub eval: EvalCfg,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataCfg {
    pub conversations: usize,
    pub max_len: usize,
    pub max_new_tokens: usize,
    pub features: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainCfg {
    pub steps: u64,
    pub layers: usize,
    pub block_size: usize,
    pub target_layer_ids: Vec<usize>,
    pub num_anchors: usize,
    pub batch_sequences: usize,
    pub lr: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalCfg {
    pub benchmarks: Vec<String>,
    pub limit: usize,
    pub max_new_tokens: usize,
    pub bootstrap_samples: usize,
}

impl PaperConfig {
    /// Reads and checks an experiment config; unknown keys are refused.
    pub fn read(path: &Path) -> Result<(PaperConfig, serde_json::Value), StageError> {
        let text = std::fs::read_to_string(path).map_err(|source| StageError::Io { path: path.to_path_buf(), source })?;
        let bad = |e: serde_json::Error| StageError::Invalid(format!("{}: {e}", path.display()));
        let cfg: PaperConfig = serde_json::from_str(&text).map_err(bad)?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(bad)?;
        if cfg.arms.is_empty() {
            return Err(StageError::Invalid(format!("{}: no arms", path.display())));
        }
        for arm in &cfg.arms {
            arm.drafter.parse::<DrafterKind>().map_err(|e| StageError::Invalid(format!("{}: arm {}: {e}", path.display(), arm.name)))?;
            arm.objective.parse::<Objective>().map_err(|e| StageError::Invalid(format!("{}: arm {}: {e}", path.display(), arm.name)))?;
        }
        Ok((cfg, json))
    }

    /// The shared data: the target's own greedy answers, with cached features.
    fn prepare_plan(&self, data: &Path) -> PreparePlan {
        let mut p = PreparePlan::new(&self.model, "sharegpt", data);
        p.max_conversations = Some(self.data.conversations);
        p.max_len = Some(self.data.max_len);
        p.max_turns = Some(1);
        p.regenerate = Some(RegenerateMode::Greedy);
        p.max_new_tokens = self.data.max_new_tokens;
        p.workers = 2;
        p.features = Some(self.data.features.clone());
        p.feature_dtype = FeatureDtype::F16;
        p.feature_weights = WeightsMode::default();
        p
    }

    /// One arm's training config: everything but drafter kind and objective is the
    /// experiment's, so arms differ only there.
    pub fn arm_config(&self, arm: &Arm, data: &Path, dir: &Path) -> Result<TrainConfig, StageError> {
        let t = &self.train;
        let mut c = TrainConfig::new(data, dir);
        c.model = self.model.clone();
        c.steps = t.steps;
        c.objective = arm.objective.parse().map_err(|e| StageError::Invalid(format!("arm {}: {e}", arm.name)))?;
        c.drafter.kind = arm.drafter.parse().map_err(|e: String| StageError::Invalid(format!("arm {}: {e}", arm.name)))?;
        c.drafter.layers = t.layers;
        c.drafter.block_size = t.block_size;
        c.drafter.target_layer_ids = Some(t.target_layer_ids.clone());
        c.num_anchors = t.num_anchors;
        c.batch_sequences = t.batch_sequences;
        c.optim.lr = t.lr;
        c.seed = t.seed;
        c.checkpoint_every = 50;
        c.eval_every = t.steps;
        c.eval_sequences = 12;
        Ok(c)
    }

    /// One evaluation of every arm on the same prompts (one shared AR baseline).
    pub fn eval_plan(&self, out: &Path, command: &str) -> Result<EvalPlan, StageError> {
        let mut p = EvalPlan::new(&self.model, &out.join("eval"));
        p.drafters = self.arms.iter().map(|arm| EvalDrafterSpec::new(&arm.name, out.join("arms").join(&arm.name).join("final"))).collect();
        // Every arm at the trained block size: τ is compared across objectives at one B (a
        // measured choice could differ between arms and between runs).
        p.block_size = Some(self.train.block_size);
        p.benchmarks = self
            .eval
            .benchmarks
            .iter()
            .map(|b| b.parse().map_err(|e: crate::eval::datasets::DatasetError| StageError::Invalid(e.to_string())))
            .collect::<Result<_, _>>()?;
        p.limit = Some(self.eval.limit);
        p.max_new_tokens = self.eval.max_new_tokens;
        p.command = command.to_string();
        Ok(p)
    }
}

/// How to run the experiment.
#[derive(Debug, Clone)]
pub struct ExperimentPlan {
    pub config: PathBuf,
    /// Working folder (data, arms, eval).
    pub out: PathBuf,
    /// Where results.md / results.json / the plots go.
    pub docs: PathBuf,
    /// An already prepared dataset to use instead of preparing one.
    pub data: Option<PathBuf>,
    /// Arms trained at once, each a child process (`exe train --config`).
    pub jobs: usize,
    /// The `specauf` binary that trains arms as child processes when `jobs > 1`.
    pub exe: PathBuf,
    /// The command line as typed, recorded in results.md.
    pub command: String,
    /// Where every stage computes (child training processes get the same `--device`).
    pub device: DeviceChoice,
}

/// Runs (or resumes) the experiment and returns results.md.
pub fn run(plan: &ExperimentPlan, progress: Observer) -> Result<String, StageError> {
    let (cfg, config_json) = PaperConfig::read(&plan.config)?;
    if plan.jobs == 0 {
        return Err(StageError::Invalid("--jobs must be at least 1".into()));
    }
    let out = &plan.out;
    std::fs::create_dir_all(out).map_err(|source| StageError::Io { path: out.clone(), source })?;
    progress.note(&format!("experiment: {} arms, working folder {}", cfg.arms.len(), out.display()));

    // 1. Shared data.
    let data = plan.data.clone().unwrap_or_else(|| out.join("data"));
    if !data.join("manifest.json").is_file() {
        let mut p = cfg.prepare_plan(&data);
        p.device = plan.device;
        stages::prepare(&p, progress.clone())?;
    }

    // 2. Every arm, identical but for drafter and objective.
    let mut pending = Vec::new();
    for (i, arm) in cfg.arms.iter().enumerate() {
        let dir = out.join("arms").join(&arm.name);
        if dir.join("final/model.safetensors").is_file() {
            progress.note(&format!("arm {}/{} {}: trained (cached)", i + 1, cfg.arms.len(), arm.name));
        } else {
            pending.push((arm, cfg.arm_config(arm, &data, &dir)?));
        }
    }
    if plan.jobs == 1 {
        for (arm, c) in &pending {
            progress.note(&format!("arm {}: training", arm.name));
            stages::train(c, WeightsMode::default(), plan.device, crate::train::parallel::World::single(), c.out.join("config.json").is_file(), None, &*progress)?;
        }
    } else if !pending.is_empty() {
        train_in_parallel(&pending, plan, &*progress)?;
    }

    // 3. Evaluation; 4. summary with bootstrap intervals.
    let mut eval_plan = cfg.eval_plan(out, &plan.command)?;
    eval_plan.device = plan.device;
    if !eval_plan.out.join("requests.jsonl").is_file() {
        stages::evaluate(&eval_plan, &*progress)?.check_exact(eval_plan.weights)?;
    }
    let summary = super::report::Summary { cfg: &cfg, config_path: &plan.config, config_json: &config_json, out, eval_dir: &eval_plan.out, docs: &plan.docs, command: &plan.command };
    summary.write()
}

/// Trains the arms as `specauf train --config ARM/train-config.json` child processes, at most
/// `jobs` at a time, each with cores/jobs threads (on 2 cores, 2 one-thread jobs train about a
/// third more steps per second than one two-thread job). Progress follows the steps of all of
/// them (their metrics.jsonl); a failed arm is reported with the tail of its log after the others
/// have finished, so that no finished work is lost; rerunning resumes it.
fn train_in_parallel(arms: &[(&Arm, TrainConfig)], plan: &ExperimentPlan, progress: &dyn Progress) -> Result<(), StageError> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / plan.jobs).max(1);
    progress.note(&format!("training {} arms, {} at a time, {threads} thread(s) each; logs in <arm>/train.log", arms.len(), plan.jobs));
    let total: u64 = arms.iter().map(|(_, c)| c.steps).sum();
    progress.phase("arms", Some(total), 0, Unit::Items);
    let mut queue: std::collections::VecDeque<&(&Arm, TrainConfig)> = arms.iter().collect();
    let mut running: Vec<(&Arm, &TrainConfig, std::process::Child)> = Vec::new();
    let mut failed: Vec<(String, String)> = Vec::new();
    loop {
        while running.len() < plan.jobs {
            let Some((arm, c)) = queue.pop_front() else { break };
            let child = spawn_arm(plan, c, threads)?;
            progress.note(&format!("arm {}: training (pid {})", arm.name, child.id()));
            running.push((arm, c, child));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
        let mut still = Vec::new();
        for (arm, c, mut child) in running {
            let status = child.try_wait().map_err(|source| StageError::Io { path: c.out.clone(), source })?;
            match status {
                None => still.push((arm, c, child)),
                Some(status) if status.success() && c.out.join("final/model.safetensors").is_file() => {
                    progress.note(&format!("arm {}: trained", arm.name));
                }
                Some(status) => {
                    let log = std::fs::read_to_string(c.out.join("train.log")).unwrap_or_default();
                    let lines: Vec<&str> = log.lines().collect();
                    progress.note(&format!("arm {}: FAILED ({status})", arm.name));
                    failed.push((arm.name.clone(), lines[lines.len().saturating_sub(5)..].join("\n")));
                }
            }
        }
        running = still;
        let done: u64 = arms.iter().map(|(_, c)| steps_done(&c.out).min(c.steps)).sum();
        progress.update(done, "");
    }
    progress.finish(false);
    if !failed.is_empty() {
        let detail: Vec<String> = failed.iter().map(|(n, t)| format!("arm {n}:\n{t}")).collect();
        return Err(StageError::Invalid(format!(
            "{} arm(s) failed; the others are kept. Fix the cause and rerun the same command to resume:\n{}",
            failed.len(),
            detail.join("\n")
        )));
    }
    Ok(())
}

/// Lines of a run's metrics.jsonl: its finished steps.
fn steps_done(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("metrics.jsonl")).map(|t| t.lines().filter(|l| !l.trim().is_empty()).count() as u64).unwrap_or(0)
}

/// Writes the arm's typed config and starts `exe train --config` on it (resuming when the run
/// directory holds one), its output appended to ARM/train.log.
fn spawn_arm(plan: &ExperimentPlan, c: &TrainConfig, threads: usize) -> Result<std::process::Child, StageError> {
    let dir = &c.out;
    let io = |source| StageError::Io { path: dir.clone(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let config_file = dir.join("train-config.json");
    let json = serde_json::to_string_pretty(c).map_err(|e| StageError::Invalid(e.to_string()))?;
    crate::util::fs::write_atomic(&config_file, json.as_bytes()).map_err(io)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("train.log")).map_err(io)?;
    let mut cmd = std::process::Command::new(&plan.exe);
    cmd.arg("train").arg("--config").arg(&config_file).arg("--device").arg(plan.device.device.to_string());
    cmd.arg("--kernels").arg(plan.device.kernels.to_string());
    if dir.join("config.json").is_file() {
        cmd.arg("--resume");
    }
    cmd.env("RAYON_NUM_THREADS", threads.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log);
    cmd.spawn().map_err(io)
}
