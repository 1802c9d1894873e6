//! One file per command.

pub mod bench;
pub mod fetch;
pub mod generate;
pub mod util;
