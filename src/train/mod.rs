//! Training: the loop, the optimizer, the learning-rate schedule, checkpoints.

pub mod checkpoint;
pub mod optim;
pub mod schedule;
pub mod trainer;
