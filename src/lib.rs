pub mod nn;
pub mod train;

pub fn version() -> &'static str { env!("CARGO_PKG_VERSION") }
