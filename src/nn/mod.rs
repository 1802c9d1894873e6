//! Neural-network building blocks shared by the drafters.

pub mod ops;
