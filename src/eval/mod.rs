//! Evaluation: generation (and, next, judges and the per-epoch hook).

pub mod generate;
