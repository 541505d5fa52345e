//! Errors a user can cause. Each message names the file or field and the problem, on one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CandorError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl CandorError {
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        CandorError::File { path: path.into(), message: message.to_string() }
    }
    pub fn msg(message: impl std::fmt::Display) -> Self {
        CandorError::Msg(message.to_string())
    }
}

pub type Result<T> = std::result::Result<T, CandorError>;
