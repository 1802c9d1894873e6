//! Where tensors live and which kernels compute on them: the one seam between specauf's CPU
//! kernels and the generic path made of plain candle tensor ops (DESIGN §7.11).
//!
//! Every command that computes takes `--device cpu|cuda[:N]` (and the internal `--kernels`
//! switch); the CLI forwards the strings, and this module alone turns them into a candle
//! [`Device`] and a [`KernelPath`]. [`Backend::new`] is the single place that decides which
//! kernels run:
//!
//! | device | `Kernels::Auto` (default) | `Kernels::Generic` |
//! |---|---|---|
//! | CPU | [`KernelPath::Cpu`]: qgemm, the raw-buffer attention, the int8 DFlash inference path, the chunked support-only head | [`KernelPath::Generic`] |
//! | CUDA (any other) | [`KernelPath::Generic`] | [`KernelPath::Generic`] |
//!
//! Each component that owns a CPU kernel (the target's linears and attention, the DFlash
//! proposer, the training head) matches on [`Backend::path`] once, where it is built; nothing
//! else asks which device it runs on. The generic path on the CPU is what the tests compare the
//! kernels against, and what a CUDA build runs.
//!
//! The `cuda` feature has never been compiled or run (no GPU and no CUDA toolkit were available
//! to this project): asking for `cuda` in a build without it is a [`DeviceError::NotBuiltWithCuda`]
//! that says how to rebuild.

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// The device a command computes on, as the user names it: `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

/// The default of every `--device` option.
pub const DEFAULT_DEVICE: DeviceSpec = DeviceSpec::Cpu;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: use cpu, cuda (GPU 0) or cuda:N (GPU number N)")]
    Unknown(String),
    #[error(
        "--device {0} needs a CUDA build, and this binary was built without the `cuda` feature: \
         rebuild with `cargo build --release --features cuda` (needs the CUDA toolkit), or use --device cpu"
    )]
    NotBuiltWithCuda(String),
    #[error("cannot open {spec}: {source} (is the GPU number right? `nvidia-smi -L` lists them)")]
    Open { spec: String, source: candle_core::Error },
}

impl std::str::FromStr for DeviceSpec {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match t.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(DeviceError::Unknown(s.to_string())),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = DeviceError;
    fn try_from(s: String) -> Result<Self, DeviceError> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl DeviceSpec {
    /// Opens the device: CPU always; CUDA only in a build with the `cuda` feature.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => open_cuda(n, self),
        }
    }

    /// The device that candle already holds, named back (CUDA as `cuda:N`).
    pub fn of(device: &Device) -> Self {
        match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => DeviceSpec::Cuda(gpu_id),
            _ => DeviceSpec::Cpu,
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize, spec: DeviceSpec) -> Result<Device, DeviceError> {
    // Never compiled or run in this project (no CUDA toolkit, no GPU): see the README.
    Device::new_cuda(n).map_err(|source| DeviceError::Open { spec: spec.to_string(), source })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_n: usize, spec: DeviceSpec) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuiltWithCuda(spec.to_string()))
}

/// Which kernels the user asks for (`--kernels`): `auto` lets the device decide; `generic` forces
/// the generic path, also on the CPU (for tests and comparisons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    #[default]
    Auto,
    Generic,
}

crate::named_enum!(Kernels, "kernel choice", ["auto", "generic"]);

/// What a command asks for (`--device`, `--kernels`): the one value the CLI forwards and the
/// pipeline's plans carry. [`DeviceChoice::backend`] opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeviceChoice {
    pub device: DeviceSpec,
    pub kernels: Kernels,
}

impl DeviceChoice {
    pub fn backend(self) -> Result<Backend, DeviceError> {
        Backend::open(self.device, self.kernels)
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kernels {
            Kernels::Auto => write!(f, "{}", self.device),
            Kernels::Generic => write!(f, "{} (generic kernels)", self.device),
        }
    }
}

/// Which path computes: the CPU kernels, or plain candle tensor ops on any device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelPath {
    Cpu,
    Generic,
}

/// A device and the kernel path that runs on it. Cheap to clone (candle devices are handles).
#[derive(Debug, Clone)]
pub struct Backend {
    device: Device,
    path: KernelPath,
    dtype: DType,
}

impl Default for Backend {
    fn default() -> Self {
        Backend::cpu()
    }
}

impl Backend {
    /// The one place that decides which kernels run (see the module doc's table), and in which
    /// float type the generic path computes ([`compute_dtype_for`]).
    pub fn new(device: Device, kernels: Kernels) -> Self {
        let path = match (kernels, device.is_cpu()) {
            (Kernels::Auto, true) => KernelPath::Cpu,
            _ => KernelPath::Generic,
        };
        let dtype = compute_dtype_for(&device);
        Backend { device, path, dtype }
    }

    /// The default: the CPU with its kernels.
    pub fn cpu() -> Self {
        Backend::new(Device::Cpu, Kernels::Auto)
    }

    /// Opens `spec` (see [`DeviceSpec::open`]) with the requested kernels.
    pub fn open(spec: DeviceSpec, kernels: Kernels) -> Result<Self, DeviceError> {
        Ok(Backend::new(spec.open()?, kernels))
    }

    /// The same device and path computing in `dtype` (the generic path only; the CPU kernels
    /// are f32/int8 by construction). Tests use it to run the bf16 path on the CPU.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn path(&self) -> KernelPath {
        self.path
    }

    /// Whether the CPU kernels run (the default on the CPU).
    pub fn cpu_kernels(&self) -> bool {
        self.path == KernelPath::Cpu
    }

    /// The float type the generic path's matmuls run in: see [`compute_dtype_for`].
    pub fn compute_dtype(&self) -> DType {
        match self.path {
            KernelPath::Cpu => DType::F32,
            KernelPath::Generic => self.dtype,
        }
    }

    /// `cpu`, or `cuda:N`, with `(generic)` when the generic path runs on the CPU.
    pub fn describe(&self) -> String {
        let d = DeviceSpec::of(&self.device);
        match (d, self.path) {
            (DeviceSpec::Cpu, KernelPath::Generic) => "cpu (generic kernels)".to_string(),
            _ => format!("{d} ({})", if self.path == KernelPath::Cpu { "CPU kernels" } else { "candle kernels" }),
        }
    }
}

/// The compute dtype that follows the device: bf16 on CUDA (candle's bf16 matmul; weights and
/// optimizer state stay f32 masters), f32 on the CPU (its kernels and candle's CPU matmul are f32).
pub fn compute_dtype_for(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_round_trip() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        for d in [DeviceSpec::Cpu, DeviceSpec::Cuda(0), DeviceSpec::Cuda(7)] {
            assert_eq!(d.to_string().parse::<DeviceSpec>().unwrap(), d);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<DeviceSpec>(&json).unwrap(), d);
        }
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.to_string().contains("cuda:N"), "{bad}: {e}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_an_error_that_says_how_to_rebuild() {
        let e = DeviceSpec::Cuda(1).open().unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("--features cuda") && msg.contains("cuda:1"), "{msg}");
        assert!(Backend::open(DeviceSpec::Cuda(0), Kernels::Auto).is_err());
    }

    #[test]
    fn the_cpu_runs_its_kernels_unless_generic_is_asked_for() {
        let b = Backend::open(DeviceSpec::Cpu, Kernels::Auto).unwrap();
        assert!(b.cpu_kernels() && b.device().is_cpu());
        assert_eq!(b.compute_dtype(), DType::F32);
        let g = Backend::open(DeviceSpec::Cpu, Kernels::Generic).unwrap();
        assert_eq!(g.path(), KernelPath::Generic);
        assert_eq!(g.compute_dtype(), DType::F32, "f32 stays on the CPU");
        assert_eq!(g.clone().with_compute_dtype(DType::BF16).compute_dtype(), DType::BF16);
        // The CPU kernels ignore a dtype request: they are f32/int8 by construction.
        assert_eq!(b.with_compute_dtype(DType::BF16).compute_dtype(), DType::F32);
        assert_eq!(DeviceSpec::of(&Device::Cpu), DeviceSpec::Cpu);
        assert_eq!(DEFAULT_DEVICE, DeviceSpec::default());
    }
}
