//! `--device` and `--kernels`, shared by every command that computes; parsed and opened by the
//! library (`specauf::nn::device`), forwarded from here as one value.

use specauf::nn::{DeviceChoice, DeviceSpec, Kernels, DEFAULT_DEVICE};

#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where to compute: cpu, cuda (GPU 0) or cuda:N. CUDA needs a build with `--features cuda`,
    /// which has never been compiled or run by this project (see the README's GPU section).
    #[arg(long, default_value_t = DEFAULT_DEVICE)]
    pub device: DeviceSpec,
    /// auto: the CPU runs specauf's kernels, other devices the generic path; generic: the
    /// generic path (plain candle ops, what a GPU runs) on the CPU too, for comparisons.
    #[arg(long, default_value_t = Kernels::Auto)]
    pub kernels: Kernels,
}

impl DeviceArgs {
    pub fn choice(&self) -> DeviceChoice {
        DeviceChoice { device: self.device, kernels: self.kernels }
    }
}
