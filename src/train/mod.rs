pub mod sharegpt;
