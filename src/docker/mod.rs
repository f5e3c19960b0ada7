//! Docker engine effects (bollard).

pub mod image;
