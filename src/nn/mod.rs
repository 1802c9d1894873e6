//! Neural-network building blocks shared by the drafters, and the device/kernel seam.

pub mod device;
pub mod ops;

pub use device::{Backend, DeviceChoice, DeviceError, DeviceSpec, KernelPath, Kernels, DEFAULT_DEVICE};
