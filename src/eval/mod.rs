//! Evaluation: generation and judges (and, next, the per-epoch hook).

pub mod generate;
pub mod judge;
