//! FalseReject rows (and general chat rows) → conversations.
//!
//! Train rows: `prompt, category, category_text, instruct_response, cot_response{reasoning_content,
//! solution}`. Test rows carry only `prompt, category, category_text`. Rows in the common chat format
//! `{"messages": [{"role", "content"}, …]}` are accepted too, so general SFT data can be mixed in.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::template::Message;
use crate::error::{CandorError, Result};
use crate::hub::{HubOptions, HubRepo};

/// Which answer a FalseReject row is trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// user = prompt, assistant = `instruct_response`.
    Standard,
    /// assistant = reasoning trace + solution (`cot_response`).
    Reasoning,
}

impl std::str::FromStr for Variant {
    type Err = CandorError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "standard" => Ok(Variant::Standard),
            "reasoning" => Ok(Variant::Reasoning),
            other => {
                Err(CandorError::msg(format!("data.variant: unknown \"{other}\" (standard or reasoning)")))
            }
        }
    }
}

/// What to do with a row that lacks what its variant needs or is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBadRow {
    #[default]
    Error,
    Skip,
}

#[derive(Debug, Clone)]
pub struct ConversationOptions {
    pub variant: Variant,
    pub system_prompt: Option<String>,
    /// Pass the trace as the message's `reasoning_content` (templates that understand it, like Qwen3);
    /// otherwise it is written into the content between the think tags.
    pub reasoning_field: bool,
    pub think_open: String,
    pub think_close: String,
}

impl Default for ConversationOptions {
    fn default() -> Self {
        ConversationOptions {
            variant: Variant::Standard,
            system_prompt: None,
            reasoning_field: false,
            think_open: "<think>".into(),
            think_close: "</think>".into(),
        }
    }
}

/// One training conversation and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub messages: Vec<Message>,
    pub category: Option<String>,
    /// `file:line` (or `file[index]` for a JSON array), for error messages and reports.
    pub origin: String,
}

/// Rows that were skipped under `on_bad_row = "skip"`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SkipReport {
    pub count: usize,
    /// The first few, as `file:line: reason`.
    pub first: Vec<String>,
}

impl SkipReport {
    pub fn add(&mut self, what: String) {
        self.count += 1;
        if self.first.len() < 5 {
            self.first.push(what);
        }
    }
}

/// A raw JSON row with its location.
pub struct RawRow {
    pub origin: String,
    pub value: Value,
}

/// Reads a `.jsonl` file (one object per line; blank lines ignored) or a `.json` array.
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| CandorError::file(path, e))?;
    let name = path.display().to_string();
    let is_array = path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('[');
    let rows = if is_array {
        let v: Value =
            serde_json::from_str(&text).map_err(|e| CandorError::file(path, format!("invalid JSON: {e}")))?;
        let Value::Array(items) = v else {
            return Err(CandorError::file(path, "expected a JSON array of rows"));
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, value)| RawRow { origin: format!("{name}[{i}]"), value })
            .collect()
    } else {
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line)
                .map_err(|e| CandorError::msg(format!("{name}:{}: malformed JSON: {e}", i + 1)))?;
            rows.push(RawRow { origin: format!("{name}:{}", i + 1), value });
        }
        rows
    };
    if rows.is_empty() {
        return Err(CandorError::file(path, "no rows (the file is empty)"));
    }
    Ok(rows)
}

fn string_field<'a>(row: &'a Value, field: &str) -> std::result::Result<Option<&'a str>, String> {
    match row.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("field \"{field}\" must be a string, not {}", json_kind(other))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The conversation a row trains on. Errors are plain messages (the caller adds the origin).
pub fn row_to_conversation(row: &Value, opts: &ConversationOptions) -> std::result::Result<Example, String> {
    if !row.is_object() {
        return Err(format!("expected a JSON object, found {}", json_kind(row)));
    }
    if let Some(msgs) = row.get("messages") {
        return chat_row(msgs).map(|messages| Example { messages, category: None, origin: String::new() });
    }
    let prompt = string_field(row, "prompt")?.ok_or("missing field \"prompt\"")?;
    if prompt.trim().is_empty() {
        return Err("field \"prompt\" is empty".into());
    }
    let category = match row.get("category_text").and_then(Value::as_str) {
        Some(t) => Some(t.to_string()),
        None => {
            row.get("category").filter(|c| !c.is_null()).map(|c| c.to_string().trim_matches('"').to_string())
        }
    };
    let assistant = match opts.variant {
        Variant::Standard => {
            let answer = string_field(row, "instruct_response")?
                .ok_or("missing field \"instruct_response\" (needed by the standard variant)")?;
            Message::new("assistant", answer)
        }
        Variant::Reasoning => {
            let cot = row
                .get("cot_response")
                .filter(|c| !c.is_null())
                .ok_or("missing field \"cot_response\" (needed by the reasoning variant)")?;
            if !cot.is_object() {
                return Err(format!("field \"cot_response\" must be an object, not {}", json_kind(cot)));
            }
            let reasoning = string_field(cot, "reasoning_content")
                .map_err(|e| format!("cot_response: {e}"))?
                .ok_or("missing field \"cot_response.reasoning_content\"")?;
            let solution = string_field(cot, "solution")
                .map_err(|e| format!("cot_response: {e}"))?
                .ok_or("missing field \"cot_response.solution\"")?;
            if opts.reasoning_field {
                Message {
                    role: "assistant".into(),
                    content: solution.into(),
                    reasoning_content: Some(reasoning.into()),
                }
            } else {
                let content = format!(
                    "{}\n{}\n{}\n\n{}",
                    opts.think_open,
                    reasoning.trim(),
                    opts.think_close,
                    solution.trim_start()
                );
                Message::new("assistant", &content)
            }
        }
    };
    let mut messages = Vec::with_capacity(3);
    if let Some(system) = &opts.system_prompt {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", prompt));
    messages.push(assistant);
    Ok(Example { messages, category, origin: String::new() })
}

fn chat_row(msgs: &Value) -> std::result::Result<Vec<Message>, String> {
    let Value::Array(items) = msgs else {
        return Err(format!("field \"messages\" must be an array, not {}", json_kind(msgs)));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let role = string_field(m, "role").map_err(|e| format!("messages[{i}]: {e}"))?;
        let role = role.ok_or(format!("messages[{i}]: missing field \"role\""))?;
        if !matches!(role, "system" | "user" | "assistant") {
            return Err(format!("messages[{i}]: unknown role \"{role}\" (system, user or assistant)"));
        }
        let content = string_field(m, "content").map_err(|e| format!("messages[{i}]: {e}"))?;
        let content = content.ok_or(format!("messages[{i}]: missing field \"content\""))?;
        let reasoning = string_field(m, "reasoning_content").map_err(|e| format!("messages[{i}]: {e}"))?;
        out.push(Message {
            role: role.into(),
            content: content.into(),
            reasoning_content: reasoning.map(Into::into),
        });
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err("field \"messages\" has no assistant message to train on".into());
    }
    Ok(out)
}

/// Converts rows, erroring on the first bad one or skipping bad ones with a count.
pub fn rows_to_examples(
    rows: Vec<RawRow>,
    opts: &ConversationOptions,
    on_bad_row: OnBadRow,
    skipped: &mut SkipReport,
) -> Result<Vec<Example>> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        match row_to_conversation(&row.value, opts) {
            Ok(mut ex) => {
                ex.origin = row.origin;
                out.push(ex);
            }
            Err(e) if on_bad_row == OnBadRow::Skip => skipped.add(format!("{}: {e}", row.origin)),
            Err(e) => return Err(CandorError::msg(format!("{}: {e}", row.origin))),
        }
    }
    Ok(out)
}

/// Resolves a data source to local files: a path, a glob, or
/// `hf://datasets/ORG/NAME/FILE` (through the hub cache, downloaded when online).
pub fn resolve_source(spec: &str, hub: &HubOptions) -> Result<Vec<PathBuf>> {
    if let Some(rest) = spec.strip_prefix("hf://datasets/") {
        let parts: Vec<&str> = rest.splitn(3, '/').collect();
        let [org, name, file] = parts.as_slice() else {
            return Err(CandorError::msg(format!("{spec}: expected hf://datasets/ORG/NAME/FILE")));
        };
        let repo = HubRepo::dataset(&format!("{org}/{name}"), hub.clone());
        return Ok(vec![repo.get(file)?]);
    }
    if spec.contains(['*', '?', '[']) {
        let mut files: Vec<PathBuf> = glob::glob(spec)
            .map_err(|e| CandorError::msg(format!("{spec}: bad glob pattern: {e}")))?
            .filter_map(|p| p.ok())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(CandorError::msg(format!("{spec}: the pattern matches no file")));
        }
        return Ok(files);
    }
    let path = PathBuf::from(spec);
    if !path.is_file() {
        return Err(CandorError::file(&path, "no such data file"));
    }
    Ok(vec![path])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn train_row() -> Value {
        json!({"prompt": "How do I kill a stuck process?", "category": 46, "category_text": "Others",
               "instruct_response": "Use kill.", "cot_response": {"reasoning_content": "Think.", "solution": "Use kill."}})
    }

    #[test]
    fn standard_and_reasoning_variants() {
        let ex = row_to_conversation(&train_row(), &ConversationOptions::default()).unwrap();
        assert_eq!(
            ex.messages,
            vec![
                Message::new("user", "How do I kill a stuck process?"),
                Message::new("assistant", "Use kill.")
            ]
        );
        assert_eq!(ex.category.as_deref(), Some("Others"));

        let opts = ConversationOptions {
            variant: Variant::Reasoning,
            system_prompt: Some("Be helpful.".into()),
            ..Default::default()
        };
        let ex = row_to_conversation(&train_row(), &opts).unwrap();
        assert_eq!(ex.messages[0], Message::new("system", "Be helpful."));
        assert_eq!(ex.messages[2].content, "<think>\nThink.\n</think>\n\nUse kill.");

        let opts =
            ConversationOptions { variant: Variant::Reasoning, reasoning_field: true, ..Default::default() };
        let ex = row_to_conversation(&train_row(), &opts).unwrap();
        assert_eq!(ex.messages[1].reasoning_content.as_deref(), Some("Think."));
        assert_eq!(ex.messages[1].content, "Use kill.");
    }

    #[test]
    fn bad_rows_name_the_field() {
        let opts = ConversationOptions::default();
        let err = |v: Value| row_to_conversation(&v, &opts).unwrap_err();
        assert_eq!(err(json!({"category": 1})), "missing field \"prompt\"");
        assert_eq!(err(json!({"prompt": 5})), "field \"prompt\" must be a string, not a number");
        assert!(err(json!({"prompt": "x", "instruct_response": null})).contains("instruct_response"));
        assert!(err(json!({"messages": [{"role": "bot", "content": "x"}]})).contains("unknown role \"bot\""));
        assert!(err(json!({"messages": [{"role": "user", "content": "x"}]})).contains("no assistant message"));
        let reasoning = ConversationOptions { variant: Variant::Reasoning, ..Default::default() };
        let e = row_to_conversation(&json!({"prompt": "x", "cot_response": {"solution": "y"}}), &reasoning)
            .unwrap_err();
        assert_eq!(e, "missing field \"cot_response.reasoning_content\"");
    }
}
