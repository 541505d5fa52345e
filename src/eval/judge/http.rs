//! The `http` judge: any OpenAI-compatible `POST {base_url}/chat/completions`, prompted with
//! [`judge_messages`](super::judge_messages) and parsed with [`parse_verdict`](super::parse_verdict).
//!
//! Requests run on `concurrency` worker threads; connection errors, timeouts, 429 and 5xx are retried with
//! exponential backoff (0.5 s, 1 s, 2 s, … capped at 8 s, or the server's `Retry-After` when it is
//! shorter than 30 s); any other status fails at once. The API key is read from the environment variable
//! named by `api_key_env` and never appears in an error, log or rationale.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{judge_messages, parse_verdict, Judge, Judgement};
use crate::error::{one_line, CandorError};

const FIRST_BACKOFF_S: f64 = 0.5;
const MAX_BACKOFF_S: f64 = 8.0;
const MAX_RETRY_AFTER_S: f64 = 30.0;
/// How much of a reply body an error message or a rationale quotes.
const EXCERPT_CHARS: usize = 300;

fn default_timeout_s() -> f64 {
    60.0
}
fn default_max_retries() -> u32 {
    3
}
fn default_concurrency() -> usize {
    4
}
fn default_temperature() -> f64 {
    0.0
}
fn default_max_tokens() -> u32 {
    512
}

/// Where and how to ask an OpenAI-compatible judge model.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpJudgeConfig {
    /// e.g. `http://127.0.0.1:8000/v1` (a trailing slash is fine); `/chat/completions` is appended.
    pub base_url: String,
    pub model: String,
    /// The NAME of the environment variable that holds the API key (sent as `Authorization: Bearer`).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Per-request limit, connection to last byte of the reply.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Retries after the first attempt, on connection errors, timeouts, 429 and 5xx.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
}

impl HttpJudgeConfig {
    /// A configuration with the documented defaults.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        HttpJudgeConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key_env: None,
            timeout_s: default_timeout_s(),
            max_retries: default_max_retries(),
            concurrency: default_concurrency(),
            temperature: default_temperature(),
            max_tokens: default_max_tokens(),
        }
    }
}

/// A judge behind an OpenAI-compatible chat completions endpoint.
pub struct HttpJudge {
    cfg: HttpJudgeConfig,
    endpoint: String,
    api_key: Option<String>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for HttpJudge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpJudge")
            .field("endpoint", &self.endpoint)
            .field("model", &self.cfg.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Why one attempt failed.
enum Failure {
    /// Worth another attempt (connection error, timeout, 429, 5xx); `wait_s` is the server's Retry-After.
    Transient {
        message: String,
        wait_s: Option<f64>,
    },
    Fatal(String),
}

impl HttpJudge {
    pub fn new(cfg: HttpJudgeConfig) -> anyhow::Result<Self> {
        let bad = |field: &str, problem: String| CandorError::msg(format!("http judge: {field}: {problem}"));
        let base = cfg.base_url.trim();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(bad("base_url", format!("\"{base}\" must start with http:// or https://")).into());
        }
        if cfg.model.trim().is_empty() {
            return Err(bad("model", "is empty".into()).into());
        }
        if !(cfg.timeout_s.is_finite() && cfg.timeout_s > 0.0) {
            return Err(
                bad("timeout_s", format!("{} must be a positive number of seconds", cfg.timeout_s)).into()
            );
        }
        if cfg.concurrency == 0 {
            return Err(bad("concurrency", "must be at least 1".into()).into());
        }
        if !(cfg.temperature.is_finite() && cfg.temperature >= 0.0) {
            return Err(bad("temperature", format!("{} must be ≥ 0", cfg.temperature)).into());
        }
        let api_key = match &cfg.api_key_env {
            None => None,
            Some(name) => match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
                Ok(_) => {
                    return Err(bad("api_key_env", format!("environment variable {name} is empty")).into())
                }
                Err(_) => {
                    return Err(bad("api_key_env", format!("environment variable {name} is not set")).into())
                }
            },
        };
        let endpoint = format!("{}/chat/completions", base.trim_end_matches('/'));
        let timeout = Duration::try_from_secs_f64(cfg.timeout_s)
            .map_err(|_| bad("timeout_s", format!("{} is not a usable number of seconds", cfg.timeout_s)))?;
        let agent = ureq::AgentBuilder::new().timeout(timeout).build();
        Ok(HttpJudge { cfg, endpoint, api_key, agent })
    }

    /// The URL requests go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A message with the key (should a server echo it) replaced by `***`.
    fn redact(&self, text: &str) -> String {
        match &self.api_key {
            Some(key) => text.replace(key.as_str(), "***"),
            None => text.to_string(),
        }
    }

    fn error(&self, message: String) -> CandorError {
        CandorError::msg(self.redact(&format!("http judge {}: {message}", self.endpoint)))
    }

    /// Judges one pair, retrying transient failures.
    fn judge_one(&self, prompt: &str, response: &str) -> Result<Judgement, CandorError> {
        let messages: Vec<Value> = judge_messages(prompt, response)
            .into_iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect();
        let body = json!({
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        });
        let mut attempt = 0u32;
        loop {
            match self.attempt(&body) {
                Ok(content) => return Ok(self.judgement(content)),
                Err(Failure::Fatal(message)) => return Err(self.error(message)),
                Err(Failure::Transient { message, wait_s }) => {
                    if attempt >= self.cfg.max_retries {
                        return Err(self.error(format!(
                            "gave up after {} attempt{}; last failure: {message}",
                            attempt + 1,
                            if attempt == 0 { "" } else { "s" }
                        )));
                    }
                    let backoff = (FIRST_BACKOFF_S * 2f64.powi(attempt as i32)).min(MAX_BACKOFF_S);
                    let wait = wait_s.filter(|w| w.is_finite() && *w >= 0.0 && *w <= MAX_RETRY_AFTER_S);
                    std::thread::sleep(Duration::from_secs_f64(wait.map_or(backoff, |w| w.max(backoff))));
                    attempt += 1;
                }
            }
        }
    }

    fn judgement(&self, content: Option<String>) -> Judgement {
        let Some(text) = content else {
            return Judgement { verdict: None, rationale: "judge reply had no message content".into() };
        };
        let text = self.redact(text.trim());
        match parse_verdict(&text) {
            Some(v) => Judgement { verdict: Some(v), rationale: excerpt(&text, 4 * EXCERPT_CHARS) },
            None => Judgement {
                verdict: None,
                rationale: format!("no [[verdict]] in the judge reply: {}", excerpt(&text, EXCERPT_CHARS)),
            },
        }
    }

    /// One request: `choices[0].message.content` of the reply (None when it is null or missing).
    fn attempt(&self, body: &Value) -> Result<Option<String>, Failure> {
        let mut request = self.agent.post(&self.endpoint).set("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        match request.send_json(body) {
            Ok(reply) => {
                let text = reply.into_string().map_err(|e| Failure::Transient {
                    message: format!("cannot read the reply: {}", self.describe_io(&e)),
                    wait_s: None,
                })?;
                let value: Value = serde_json::from_str(&text).map_err(|_| {
                    Failure::Fatal(format!(
                        "the reply is not JSON (is this an OpenAI-compatible endpoint?): {}",
                        excerpt(&text, EXCERPT_CHARS)
                    ))
                })?;
                let Some(choice) = value.get("choices").and_then(|c| c.get(0)) else {
                    return Err(Failure::Fatal(format!(
                        "the reply has no choices[0]: {}",
                        excerpt(&text, EXCERPT_CHARS)
                    )));
                };
                Ok(choice.pointer("/message/content").and_then(Value::as_str).map(str::to_string))
            }
            Err(ureq::Error::Status(code, reply)) => {
                let wait_s = reply.header("retry-after").and_then(|s| s.trim().parse::<f64>().ok());
                let status_text = reply.status_text().to_string();
                let body = reply.into_string().unwrap_or_default();
                let message = format!("HTTP {code} {status_text}: {}", excerpt(&body, EXCERPT_CHARS));
                if code == 429 || (500..600).contains(&code) {
                    Err(Failure::Transient { message, wait_s })
                } else {
                    Err(Failure::Fatal(message))
                }
            }
            Err(ureq::Error::Transport(t)) => {
                let message = match timed_out(&t) {
                    true => format!("timed out after {} s (timeout_s)", self.cfg.timeout_s),
                    false => one_line(&t.to_string()),
                };
                Err(Failure::Transient { message, wait_s: None })
            }
        }
    }

    fn describe_io(&self, e: &std::io::Error) -> String {
        if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) {
            format!("timed out after {} s (timeout_s)", self.cfg.timeout_s)
        } else {
            one_line(&e.to_string())
        }
    }
}

/// Whether a transport error is a timeout (an `io::Error` of kind TimedOut/WouldBlock in its chain).
fn timed_out(t: &ureq::Transport) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(t);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) {
                return true;
            }
        }
        source = e.source();
    }
    t.to_string().to_lowercase().contains("timed out")
}

/// The first `max_chars` characters of `text` on one line.
fn excerpt(text: &str, max_chars: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max_chars {
        flat
    } else {
        format!("{}…", flat.chars().take(max_chars).collect::<String>())
    }
}

impl Judge for HttpJudge {
    fn name(&self) -> &str {
        "http"
    }

    fn judge(&self, items: &[(String, String)]) -> anyhow::Result<Vec<Judgement>> {
        let n = items.len();
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let results: Mutex<Vec<Option<Result<Judgement, CandorError>>>> =
            Mutex::new((0..n).map(|_| None).collect());
        std::thread::scope(|scope| {
            for _ in 0..self.cfg.concurrency.min(n) {
                scope.spawn(|| loop {
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let result = self.judge_one(&items[i].0, &items[i].1);
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
                });
            }
        });
        let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = results.iter().flatten().find_map(|r| r.as_ref().err()) {
            return Err(CandorError::msg(e.to_string()).into());
        }
        Ok(results.into_iter().flatten().filter_map(Result::ok).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let cfg: HttpJudgeConfig =
            serde_json::from_str(r#"{"base_url": "http://127.0.0.1:8000/v1/", "model": "m"}"#).unwrap();
        assert_eq!(cfg.timeout_s, 60.0);
        assert_eq!(cfg.max_retries, 3);
        assert_eq!(cfg.concurrency, 4);
        assert_eq!(cfg.temperature, 0.0);
        assert_eq!(cfg.max_tokens, 512);
        let judge = HttpJudge::new(cfg).unwrap();
        assert_eq!(judge.endpoint(), "http://127.0.0.1:8000/v1/chat/completions");
        assert!(
            serde_json::from_str::<HttpJudgeConfig>(r#"{"base_url": "x", "model": "m", "url": 1}"#).is_err()
        );
        let mut bad = HttpJudgeConfig::new("ftp://host", "m");
        assert!(HttpJudge::new(bad.clone()).unwrap_err().to_string().contains("base_url"));
        bad.base_url = "http://host".into();
        bad.concurrency = 0;
        assert!(HttpJudge::new(bad.clone()).unwrap_err().to_string().contains("concurrency"));
        bad.concurrency = 1;
        bad.timeout_s = 1e300;
        assert!(HttpJudge::new(bad).unwrap_err().to_string().contains("timeout_s"));
        assert_eq!(excerpt("a\n b   c", 3), "a b…");
    }
}
