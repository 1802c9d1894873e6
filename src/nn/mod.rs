//! Neural-network building blocks shared by the drafters, and the device/kernel seam.

pub mod bf16;
pub mod device;
pub mod ops;

pub use bf16::Precision;

pub use device::{Backend, DeviceChoice, DeviceError, DeviceSpec, KernelPath, Kernels, DEFAULT_DEVICE};

/// Runs `f` on the values of `t` where they lie, without a copy, when `t` is a contiguous f32
/// tensor in host memory; None for any other tensor (the caller takes its copying path). `f`
/// runs while `t`'s storage is borrowed, so it must not write to `t`.
pub fn with_host_f32<R>(t: &candle_core::Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((a, b))) => cpu.as_slice::<f32>().ok().map(|s| f(&s[a..b])),
        _ => None,
    }
}
