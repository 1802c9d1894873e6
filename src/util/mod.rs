//! Small shared pieces with no domain knowledge: atomic files, hashing and seeds, the progress
//! observer. Every other module may use them; they use none.

pub mod fs;
pub mod hash;
pub mod measure;
pub mod names;
pub mod pool;
pub mod team;
pub mod progress;

pub use fs::write_atomic;
pub use hash::{fnv1a64, splitmix64, turn_seed};
pub use progress::{Observer, Progress, Silent, Unit};
