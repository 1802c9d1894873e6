//! One file per command.

pub mod bench;
pub mod fetch;
pub mod generate;
pub mod init_drafter;
pub mod prepare;
pub mod train;
pub mod util;
