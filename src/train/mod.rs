//! Training: the optimizer, the learning-rate schedule (and, next, the loop and checkpoints).

pub mod optim;
pub mod schedule;
