//! OpenAI's request bodies (`/v1/chat/completions`, `/v1/completions`) and their translation
//! to the gRPC API's [`GenerateRequest`], which then goes through the same validation as every
//! gRPC call.
//!
//! Invariants:
//! - A parameter we cannot honour is refused with 400 naming it, never silently ignored:
//!   `n` other than 1, penalties, logprobs, tools, logit bias, a non-text response format,
//!   `echo`, `best_of`, `suffix`, token-id prompts, non-text message parts.
//! - Defaults are OpenAI's where the APIs differ: temperature 1, and 16 new tokens for
//!   `/v1/completions` (chat defaults to the gRPC API's 128).
//! - Our extras live in one `eagle` object (unknown keys there are refused, to catch typos).
//!
//! Source: the OpenAI API reference (Chat Completions and legacy Completions).

use eagle_proto::v1::generate_request::Input;
use eagle_proto::v1::{ChatMessage, ChatMessages, GenerateRequest, Sampling, Speculation};
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;

/// The body of either endpoint; each takes the fields it knows and refuses the other's input.
#[derive(Debug, Default, Deserialize)]
pub struct OpenAiRequest {
    #[serde(default)]
    pub model: String,
    pub messages: Option<Vec<Message>>,
    pub prompt: Option<Value>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not OpenAI's, but vLLM's and SGLang's: top-k sampling.
    pub top_k: Option<u32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Recorded in the request's trace.
    pub user: Option<String>,
    pub eagle: Option<EagleOptions>,
    // Refused unless at their neutral value.
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u32>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub tools: Option<Vec<Value>>,
    pub response_format: Option<Value>,
    pub echo: Option<bool>,
    pub best_of: Option<u32>,
    pub suffix: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// eagle-serve's own settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EagleOptions {
    /// Speculative decoding on (default) or off (plain decoding; the same text at T = 0).
    pub speculation: Option<bool>,
    /// Draft tokens per target pass; -1 sizes the tree per step from measured costs.
    pub total_token: Option<i32>,
    pub depth: Option<u32>,
    /// Children per tree node.
    pub top_k: Option<u32>,
    /// A multi-turn session whose KV cache the next turn reuses.
    pub session_id: Option<String>,
}

/// Which endpoint a body came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn default_max_tokens(self) -> u32 {
        match self {
            Endpoint::Chat => crate::request::DEFAULT_MAX_NEW_TOKENS,
            Endpoint::Completions => 16,
        }
    }
}

/// Parses a body, naming the field at fault when its type is wrong.
pub fn parse(body: &[u8]) -> Result<OpenAiRequest, ApiError> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            ApiError::invalid("body", format!("the body is not a valid request: {inner}"))
        } else {
            ApiError::invalid(&path, format!("{path}: {inner}"))
        }
    })
}

fn refuse(param: &str, what: &str) -> ApiError {
    ApiError::invalid(param, format!("{param} is not supported: {what}"))
}

impl OpenAiRequest {
    /// Refuses what this server cannot do.
    fn check_supported(&self, ep: Endpoint) -> Result<(), ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(
                "n",
                format!("n is {n}: this server returns one choice per request (n = 1)"),
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(refuse(
                    name,
                    "penalties would change the target's distribution",
                ));
            }
        }
        let logprobs = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Number(n)) => n.as_u64() != Some(0),
            Some(_) => true,
        };
        if logprobs || self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(refuse("logprobs", "log probabilities are not returned"));
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(refuse(
                "logit_bias",
                "it would change the target's distribution",
            ));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(refuse("tools", "no tool calling"));
        }
        if let Some(f) = &self.response_format {
            if f.get("type").and_then(Value::as_str) != Some("text") {
                return Err(refuse("response_format", "only {\"type\": \"text\"}"));
            }
        }
        if ep == Endpoint::Completions {
            if self.echo == Some(true) {
                return Err(refuse("echo", "the prompt is not echoed"));
            }
            if self.best_of.is_some_and(|b| b > 1) {
                return Err(refuse("best_of", "one completion per request"));
            }
            if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
                return Err(refuse("suffix", "no insertion"));
            }
        }
        Ok(())
    }

    fn input(&self, ep: Endpoint) -> Result<Input, ApiError> {
        match ep {
            Endpoint::Chat => {
                if self.prompt.is_some() {
                    return Err(ApiError::invalid(
                        "prompt",
                        "chat completions take messages, not a prompt (use /v1/completions)",
                    ));
                }
                let Some(msgs) = &self.messages else {
                    return Err(ApiError::invalid("messages", "messages is required"));
                };
                let mut out = Vec::with_capacity(msgs.len());
                for (i, m) in msgs.iter().enumerate() {
                    // OpenAI's newer name for the system role.
                    let role = if m.role == "developer" {
                        "system"
                    } else {
                        &m.role
                    };
                    let content = match &m.content {
                        None => String::new(),
                        Some(Content::Text(t)) => t.clone(),
                        Some(Content::Parts(parts)) => {
                            let mut s = String::new();
                            for (j, p) in parts.iter().enumerate() {
                                match (p.kind.as_str(), &p.text) {
                                    ("text", Some(t)) => s.push_str(t),
                                    _ => {
                                        return Err(ApiError::invalid(
                                            &format!("messages[{i}].content[{j}]"),
                                            format!(
                                                "messages[{i}].content[{j}] is a {:?} part: \
                                                 only text parts are supported",
                                                p.kind
                                            ),
                                        ))
                                    }
                                }
                            }
                            s
                        }
                    };
                    out.push(ChatMessage {
                        role: role.to_string(),
                        content,
                    });
                }
                Ok(Input::Messages(ChatMessages { messages: out }))
            }
            Endpoint::Completions => {
                if self.messages.is_some() {
                    return Err(ApiError::invalid(
                        "messages",
                        "completions take a prompt, not messages (use /v1/chat/completions)",
                    ));
                }
                let prompt = match &self.prompt {
                    None => return Err(ApiError::invalid("prompt", "prompt is required")),
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                        a[0].as_str().unwrap_or_default().to_string()
                    }
                    Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                        return Err(ApiError::invalid(
                            "prompt",
                            format!("{} prompts: send one prompt per request", a.len()),
                        ))
                    }
                    Some(_) => {
                        return Err(ApiError::invalid(
                            "prompt",
                            "prompt must be a string (token-id prompts are not supported)",
                        ))
                    }
                };
                Ok(Input::Prompt(prompt))
            }
        }
    }

    /// The gRPC request this body asks for, and whether to stream it.
    pub fn to_grpc(&self, ep: Endpoint, served: &str) -> Result<GenerateRequest, ApiError> {
        if !self.model.is_empty() && self.model != served {
            return Err(ApiError {
                status: axum::http::StatusCode::NOT_FOUND,
                message: format!(
                    "the model {:?} does not exist here: this server serves {served:?}",
                    self.model
                ),
                param: Some("model".into()),
            });
        }
        self.check_supported(ep)?;
        let input = self.input(ep)?;
        let max = self.max_completion_tokens.or(self.max_tokens);
        if max == Some(0) {
            let name = if self.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            return Err(ApiError::invalid(
                name,
                format!("{name} must be at least 1"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        let e = self.eagle.as_ref();
        Ok(GenerateRequest {
            model: String::new(),
            input: Some(input),
            sampling: Some(Sampling {
                max_new_tokens: Some(max.unwrap_or(ep.default_max_tokens())),
                temperature: Some(self.temperature.unwrap_or(1.0)),
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed.unwrap_or(0) as u64,
                stop,
            }),
            speculation: Some(Speculation {
                enabled: e.and_then(|e| e.speculation),
                total_token: e.and_then(|e| e.total_token),
                depth: e.and_then(|e| e.depth),
                top_k: e.and_then(|e| e.top_k),
            }),
            session_id: e.and_then(|e| e.session_id.clone()).unwrap_or_default(),
        })
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str, ep: Endpoint) -> Result<GenerateRequest, ApiError> {
        parse(body.as_bytes())?.to_grpc(ep, "m")
    }

    #[test]
    fn chat_maps_to_the_grpc_request() {
        let r = req(
            r#"{"model":"m","messages":[{"role":"developer","content":"Be brief."},
                {"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":"!"}]}],
                "max_completion_tokens":7,"temperature":0,"stop":"\n","seed":3,
                "eagle":{"speculation":false,"session_id":"s1"}}"#,
            Endpoint::Chat,
        )
        .unwrap();
        let Some(Input::Messages(m)) = r.input else {
            panic!("messages")
        };
        assert_eq!(m.messages[0].role, "system");
        assert_eq!(m.messages[1].content, "Hi!");
        let s = r.sampling.unwrap();
        assert_eq!(
            (s.max_new_tokens, s.temperature, s.seed),
            (Some(7), Some(0.0), 3)
        );
        assert_eq!(s.stop, vec!["\n".to_string()]);
        assert_eq!(r.speculation.unwrap().enabled, Some(false));
        assert_eq!(r.session_id, "s1");
    }

    #[test]
    fn openai_defaults() {
        let r = req(r#"{"prompt":"Once"}"#, Endpoint::Completions).unwrap();
        let s = r.sampling.unwrap();
        assert_eq!((s.max_new_tokens, s.temperature), (Some(16), Some(1.0)));
        let r = req(
            r#"{"messages":[{"role":"user","content":"x"}]}"#,
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(r.sampling.unwrap().max_new_tokens, Some(128));
    }

    #[test]
    fn refusals_name_the_parameter() {
        let cases = [
            (r#"{"messages":[],"n":2}"#, Endpoint::Chat, "n", 400),
            (
                r#"{"messages":[],"temperature":"hot"}"#,
                Endpoint::Chat,
                "temperature",
                400,
            ),
            (
                r#"{"messages":[],"max_tokens":0}"#,
                Endpoint::Chat,
                "max_tokens",
                400,
            ),
            (
                r#"{"messages":[],"presence_penalty":1}"#,
                Endpoint::Chat,
                "presence_penalty",
                400,
            ),
            (
                r#"{"messages":[],"logprobs":true}"#,
                Endpoint::Chat,
                "logprobs",
                400,
            ),
            (
                r#"{"messages":[],"eagle":{"tree":3}}"#,
                Endpoint::Chat,
                "eagle",
                400,
            ),
            (r#"{"prompt":"x"}"#, Endpoint::Chat, "prompt", 400),
            (
                r#"{"model":"gpt-4","messages":[]}"#,
                Endpoint::Chat,
                "model",
                404,
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                Endpoint::Chat,
                "messages[0].content[0]",
                400,
            ),
            (
                r#"{"prompt":[1,2,3]}"#,
                Endpoint::Completions,
                "prompt",
                400,
            ),
            (
                r#"{"prompt":["a","b"]}"#,
                Endpoint::Completions,
                "prompt",
                400,
            ),
            (
                r#"{"prompt":"a","echo":true}"#,
                Endpoint::Completions,
                "echo",
                400,
            ),
            (r#"{}"#, Endpoint::Completions, "prompt", 400),
            (r#"[1]"#, Endpoint::Chat, "body", 400),
        ];
        for (body, ep, param, status) in cases {
            let e = req(body, ep).expect_err(body);
            assert_eq!(e.status.as_u16(), status, "{body}: {}", e.message);
            assert!(
                e.param.as_deref().is_some_and(|p| p.starts_with(param)),
                "{body}: param {:?}, message {}",
                e.param,
                e.message
            );
        }
    }
}
