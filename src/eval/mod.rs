//! Evaluation: batched generation, judges that classify answers into FalseReject's three classes,
//! eval sets, metrics with confidence intervals, and the reports a run leaves behind.

pub mod evaluate;
pub mod generate;
pub mod judge;
pub mod metrics;
pub mod model_judge;
pub mod report;
pub mod sets;

pub use evaluate::{EvalConfig, EvalRecord, Evaluator};
