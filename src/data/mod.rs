//! Data: chat templates (and, next, FalseReject rows and batches).

pub mod template;
