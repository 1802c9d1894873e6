//! `specauf experiment paper [--config experiments/paper.json] [--out DIR] [--docs DIR]`: the
//! paper's comparison (see `specauf::pipeline::experiment`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use specauf::pipeline::experiment::{self, ExperimentPlan};
use specauf::util::Observer;

use super::progress::Bars;

#[derive(clap::Args, Debug)]
pub struct ExperimentArgs {
    /// Which experiment: `paper`.
    pub name: String,
    #[arg(long, default_value = "experiments/paper.json")]
    pub config: PathBuf,
    /// Working folder (default: $SPECAUF_HOME/experiments/NAME).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where results.md / results.json / the plots go.
    #[arg(long, default_value = "docs")]
    pub docs: PathBuf,
    /// Use this already prepared dataset instead of preparing one.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Train this many arms at once, each a `specauf train` child process with
    /// cores/jobs threads (its log in arms/NAME/train.log). On 2 cores, 2 one-thread jobs
    /// train about a third more steps per second than one two-thread job.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

pub fn run(a: ExperimentArgs) -> anyhow::Result<()> {
    if a.name != "paper" {
        bail!("unknown experiment {:?}; available: paper", a.name);
    }
    let out = match &a.out {
        Some(p) => p.clone(),
        None => specauf::assets::home()?.join("experiments").join(&a.name),
    };
    let plan = ExperimentPlan {
        config: a.config,
        out,
        docs: a.docs,
        data: a.data,
        jobs: a.jobs,
        exe: std::env::current_exe().context("locating the specauf binary to run the arms")?,
        // As a user would type it (the binary as `specauf`, wherever it was built).
        device: a.device.choice(),
        command: std::iter::once("specauf".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" "),
    };
    let md = experiment::run(&plan, Observer(Arc::new(Bars::new())))?;
    println!("{md}");
    eprintln!("wrote {}, {}", plan.docs.join("results.md").display(), plan.docs.join("results.json").display());
    Ok(())
}
