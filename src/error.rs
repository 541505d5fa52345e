//! Errors a user can cause. Each message names the file or field and the problem, on one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CandorError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Msg(String),
    #[error("{}", one_line(&.0.to_string()))]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl CandorError {
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        CandorError::File { path: path.into(), message: one_line(&message.to_string()) }
    }
    pub fn msg(message: impl std::fmt::Display) -> Self {
        CandorError::Msg(one_line(&message.to_string()))
    }
}

/// A message on one line: a captured backtrace (candle attaches one when `RUST_BACKTRACE` is set) is
/// dropped, and the remaining lines of a multi-line message are joined with ": ".
pub fn one_line(message: &str) -> String {
    let is_frame = |l: &str| {
        let t = l.trim_start();
        let digits = t.chars().take_while(char::is_ascii_digit).count();
        (digits > 0 && t[digits..].starts_with(": ")) || t.starts_with("at ") || t == "stack backtrace:"
    };
    let kept: Vec<&str> =
        message.lines().take_while(|l| !is_frame(l)).map(str::trim).filter(|l| !l.is_empty()).collect();
    kept.join(": ")
}

pub type Result<T> = std::result::Result<T, CandorError>;

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_drops_backtraces() {
        let m = "unknown dtype for tensor 99\n   0: candle_core::error::Error::bt\n             at src/error.rs:1\n   1: x";
        assert_eq!(super::one_line(m), "unknown dtype for tensor 99");
        assert_eq!(super::one_line("context\ninner"), "context: inner");
    }
}
