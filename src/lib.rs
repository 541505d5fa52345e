//! candor: LoRA fine-tuning of Llama- and Qwen-family chat models on FalseReject, to cut over-refusal
//! without losing safety. See `README.md` for usage and `../shared/docs/design.md` for the plan.

pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod hub;
pub mod model;
pub mod ops;
pub mod recipe;
pub mod train;

pub use error::{CandorError, Result};
