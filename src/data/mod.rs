//! Data: FalseReject rows → conversations → chat-templated, loss-masked token batches.

pub mod batch;
pub mod dataset;
pub mod falsereject;
pub mod template;
