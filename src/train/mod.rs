//! Training: the loop, the optimizer, the learning-rate schedule, checkpoints.

pub mod checkpoint;
pub mod eval_hook;
pub mod optim;
pub mod schedule;
pub mod trainer;
