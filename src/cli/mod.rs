//! One file per command.

pub mod bench;
pub mod device;
pub mod eval;
pub mod experiment;
pub mod fetch;
pub mod generate;
pub mod init_drafter;
pub mod prepare;
pub mod progress;
pub mod quickstart;
pub mod serve;
pub mod train;
