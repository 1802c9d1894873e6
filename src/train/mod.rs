pub mod data;
pub mod features;
pub mod prepare;
pub mod regenerate;
pub mod sharegpt;
