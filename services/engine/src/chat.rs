//! Chat prompt formatting: turns a list of role-tagged messages into the exact text a model
//! was fine-tuned on.
//!
//! Two sources of formats: the model's own Jinja template (from GGUF `tokenizer.chat_template`
//! or Hugging Face `tokenizer_config.json`), rendered with minijinja configured like Hugging
//! Face `transformers` renders it (`trim_blocks`, `lstrip_blocks`, Python string methods via
//! `minijinja_contrib::pycompat`, a `raise_exception` function); and a few built-in formats
//! that follow their published definitions (ChatML, FastChat's Vicuna v1.1, the LLaMA-2-chat
//! and LLaMA-3-instruct templates shipped with Meta's Hugging Face checkpoints).
//!
//! Invariant: every rendering path validates its input the same way first (a non-empty list
//! whose roles are `system`, `user` or `assistant`), so a bad request fails with a
//! [`EngineError::ChatTemplate`] naming the problem instead of producing a silently wrong prompt.

use crate::error::{EngineError, Result};

/// One chat turn.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat prompt format.
#[derive(Clone, Debug)]
pub enum ChatTemplate {
    /// The model's own Jinja template source, rendered with minijinja + pycompat.
    Jinja(String),
    /// `<|im_start|>role\ncontent<|im_end|>\n` per message, then `<|im_start|>assistant\n`.
    ChatMl,
    /// FastChat Vicuna v1.1: `SYSTEM USER: ... ASSISTANT: ...</s>USER: ... ASSISTANT:`.
    Vicuna,
    /// LLaMA-2-chat: `<s>[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST] answer </s>`.
    Llama2,
    /// LLaMA-3-instruct: `<|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`.
    Llama3,
}

/// Names accepted by [`ChatTemplate::by_name`].
pub const BUILTIN_TEMPLATE_NAMES: [&str; 4] = ["chatml", "vicuna", "llama2", "llama3"];

/// FastChat's default Vicuna v1.1 system prompt.
pub const VICUNA_SYSTEM_PROMPT: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";

const ROLES: [&str; 3] = ["system", "user", "assistant"];

impl ChatTemplate {
    /// A built-in format by name: `chatml`, `vicuna`, `llama2` or `llama3` (case-insensitive).
    pub fn by_name(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "chatml" => Ok(ChatTemplate::ChatMl),
            "vicuna" => Ok(ChatTemplate::Vicuna),
            "llama2" => Ok(ChatTemplate::Llama2),
            "llama3" => Ok(ChatTemplate::Llama3),
            _ => Err(EngineError::ChatTemplate(format!(
                "unknown chat template {name:?} (built-in templates: {})",
                BUILTIN_TEMPLATE_NAMES.join(", ")
            ))),
        }
    }

    /// Short name: `jinja` for a model's own template, otherwise the built-in's name.
    pub fn name(&self) -> &str {
        match self {
            ChatTemplate::Jinja(_) => "jinja",
            ChatTemplate::ChatMl => "chatml",
            ChatTemplate::Vicuna => "vicuna",
            ChatTemplate::Llama2 => "llama2",
            ChatTemplate::Llama3 => "llama3",
        }
    }

    /// Render `messages` to prompt text. `bos_token` / `eos_token` are the model's token
    /// strings (empty when it has none); `add_generation_prompt` appends the opening of an
    /// assistant turn so the model answers next.
    pub fn render(
        &self,
        messages: &[Message],
        bos_token: &str,
        eos_token: &str,
        add_generation_prompt: bool,
    ) -> Result<String> {
        validate(messages)?;
        match self {
            ChatTemplate::Jinja(source) => render_jinja(
                source,
                messages,
                bos_token,
                eos_token,
                add_generation_prompt,
            ),
            ChatTemplate::ChatMl => Ok(render_chatml(messages, add_generation_prompt)),
            ChatTemplate::Vicuna => render_vicuna(messages, eos_token, add_generation_prompt),
            ChatTemplate::Llama2 => render_llama2(messages, bos_token, eos_token),
            ChatTemplate::Llama3 => Ok(render_llama3(messages, add_generation_prompt)),
        }
    }
}

fn validate(messages: &[Message]) -> Result<()> {
    if messages.is_empty() {
        return Err(EngineError::ChatTemplate(
            "the message list is empty; a chat needs at least one message".into(),
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(EngineError::ChatTemplate(format!(
                "message {i} has role {:?}; roles must be one of {}",
                m.role,
                ROLES.join(", ")
            )));
        }
    }
    Ok(())
}

/// Splits off a leading system message; a system message anywhere else is an error for
/// formats that only have a slot for one at the start.
fn split_system<'a>(
    messages: &'a [Message],
    format: &str,
) -> Result<(Option<&'a str>, &'a [Message])> {
    let (system, rest) = match messages.split_first() {
        Some((first, rest)) if first.role == "system" => (Some(first.content.as_str()), rest),
        _ => (None, messages),
    };
    if let Some(i) = rest.iter().position(|m| m.role == "system") {
        let index = i + usize::from(system.is_some());
        return Err(EngineError::ChatTemplate(format!(
            "message {index} is a system message; the {format} format allows a system message only as the first message"
        )));
    }
    Ok((system, rest))
}

fn render_chatml(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    out
}

/// FastChat `vicuna_v1.1`: sep_style ADD_COLON_TWO, seps `" "` and `"</s>"` (the model's EOS).
fn render_vicuna(
    messages: &[Message],
    eos_token: &str,
    add_generation_prompt: bool,
) -> Result<String> {
    let (system, rest) = split_system(messages, "vicuna")?;
    let mut out = String::from(system.unwrap_or(VICUNA_SYSTEM_PROMPT));
    out.push(' ');
    for m in rest {
        if m.role == "user" {
            out.push_str("USER: ");
            out.push_str(&m.content);
            out.push(' ');
        } else {
            out.push_str("ASSISTANT: ");
            out.push_str(&m.content);
            out.push_str(eos_token);
        }
    }
    if add_generation_prompt {
        out.push_str("ASSISTANT:");
    }
    Ok(out)
}

/// The LLaMA-2-chat template from Meta's Hugging Face checkpoints: roles must alternate
/// user/assistant starting with user; the system prompt goes inside the first `[INST]`;
/// contents are stripped. The prompt already ends ready for the answer after `[/INST]`.
fn render_llama2(messages: &[Message], bos_token: &str, eos_token: &str) -> Result<String> {
    let (system, rest) = split_system(messages, "llama2")?;
    let offset = usize::from(system.is_some());
    let mut out = String::new();
    for (i, m) in rest.iter().enumerate() {
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if m.role != expected {
            return Err(EngineError::ChatTemplate(format!(
                "message {} has role {:?}; the llama2 format needs roles alternating user/assistant/user/... (after an optional system message)",
                i + offset,
                m.role
            )));
        }
        let content = match (i, system) {
            (0, Some(sys)) => format!("<<SYS>>\n{sys}\n<</SYS>>\n\n{}", m.content),
            _ => m.content.clone(),
        };
        if m.role == "user" {
            out.push_str(bos_token);
            out.push_str("[INST] ");
            out.push_str(content.trim());
            out.push_str(" [/INST]");
        } else {
            out.push(' ');
            out.push_str(content.trim());
            out.push(' ');
            out.push_str(eos_token);
        }
    }
    if rest.is_empty() {
        // Only a system message: open the first user turn so the system prompt is not lost.
        let sys = system.unwrap_or_default();
        out.push_str(bos_token);
        out.push_str("[INST] ");
        out.push_str(format!("<<SYS>>\n{sys}\n<</SYS>>\n\n").trim());
        out.push_str(" [/INST]");
    }
    Ok(out)
}

/// The LLaMA-3-instruct template from Meta's Hugging Face checkpoints (contents trimmed).
fn render_llama3(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut out = String::from("<|begin_of_text|>");
    for m in messages {
        out.push_str("<|start_header_id|>");
        out.push_str(&m.role);
        out.push_str("<|end_header_id|>\n\n");
        out.push_str(m.content.trim());
        out.push_str("<|eot_id|>");
    }
    if add_generation_prompt {
        out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
    }
    out
}

fn render_jinja(
    source: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // transformers compiles chat templates with trim_blocks and lstrip_blocks on.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<minijinja::Value, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let template = env.template_from_str(source).map_err(|e| {
        EngineError::ChatTemplate(format!(
            "cannot parse the model's template: {}",
            jinja_error(&e)
        ))
    })?;
    let ctx = minijinja::context! {
        messages => messages,
        bos_token => bos_token,
        eos_token => eos_token,
        add_generation_prompt => add_generation_prompt,
    };
    template.render(ctx).map_err(|e| {
        EngineError::ChatTemplate(format!(
            "rendering the model's template failed: {}",
            jinja_error(&e)
        ))
    })
}

/// A minijinja error with its causes, on one line.
fn jinja_error(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    }

    fn chat_error(r: Result<String>) -> String {
        match r {
            Err(EngineError::ChatTemplate(m)) => m,
            other => panic!("expected a chat template error, got {other:?}"),
        }
    }

    #[test]
    fn smollm2_template_default_system_prompt() {
        let t = ChatTemplate::Jinja(SMOLLM2_TEMPLATE.to_string());
        let out = t
            .render(
                &msgs(&[("user", "Hi there!")]),
                "<|im_start|>",
                "<|im_end|>",
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi there!<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_template_own_system_multi_turn_no_generation_prompt() {
        let t = ChatTemplate::Jinja(SMOLLM2_TEMPLATE.to_string());
        let m = msgs(&[
            ("system", "Be brief."),
            ("user", "2+2?"),
            ("assistant", "4"),
            ("user", "  spaces kept  \n"),
        ]);
        let out = t.render(&m, "", "", false).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n\
             <|im_start|>user\n2+2?<|im_end|>\n\
             <|im_start|>assistant\n4<|im_end|>\n\
             <|im_start|>user\n  spaces kept  \n<|im_end|>\n"
        );
        // With this template, the built-in ChatML gives the same text when a system message is present.
        assert_eq!(out, ChatTemplate::ChatMl.render(&m, "", "", false).unwrap());
    }

    #[test]
    fn jinja_trim_blocks_and_pycompat() {
        // transformers-style whitespace control and Python string methods.
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip() | upper }}]\n  {% endif %}\n{% endfor %}\n{{ bos_token }}|{{ eos_token }}";
        let out = ChatTemplate::Jinja(src.into())
            .render(&msgs(&[("user", "  hi  ")]), "<s>", "</s>", false)
            .unwrap();
        assert_eq!(out, "[HI]\n<s>|</s>");
    }

    #[test]
    fn jinja_raise_exception_and_parse_errors() {
        let src = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System message required!') }}{% endif %}ok";
        let t = ChatTemplate::Jinja(src.into());
        assert_eq!(
            t.render(&msgs(&[("system", "x")]), "", "", true).unwrap(),
            "ok"
        );
        let e = chat_error(t.render(&msgs(&[("user", "x")]), "", "", true));
        assert!(e.contains("System message required!"), "{e}");

        let e = chat_error(ChatTemplate::Jinja("{% for %}".into()).render(
            &msgs(&[("user", "x")]),
            "",
            "",
            true,
        ));
        assert!(e.contains("cannot parse"), "{e}");
    }

    #[test]
    fn chatml() {
        let out = ChatTemplate::ChatMl
            .render(
                &msgs(&[
                    ("system", "S"),
                    ("user", "U1"),
                    ("assistant", "A1"),
                    ("user", "U2"),
                ]),
                "",
                "",
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = ChatTemplate::ChatMl
            .render(&msgs(&[("user", "U")]), "", "", false)
            .unwrap();
        assert_eq!(out, "<|im_start|>user\nU<|im_end|>\n");
    }

    #[test]
    fn vicuna() {
        let out = ChatTemplate::Vicuna
            .render(
                &msgs(&[
                    ("user", "Hello!"),
                    ("assistant", "Hi."),
                    ("user", "How are you?"),
                ]),
                "<s>",
                "</s>",
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: Hello! ASSISTANT: Hi.</s>USER: How are you? ASSISTANT:"
        );
        let out = ChatTemplate::Vicuna
            .render(
                &msgs(&[("system", "Be terse."), ("user", "Q")]),
                "<s>",
                "</s>",
                false,
            )
            .unwrap();
        assert_eq!(out, "Be terse. USER: Q ");
    }

    #[test]
    fn llama2() {
        let out = ChatTemplate::Llama2
            .render(
                &msgs(&[
                    ("system", "You are helpful."),
                    ("user", "Hi "),
                    ("assistant", " Hello!"),
                    ("user", "Bye"),
                ]),
                "<s>",
                "</s>",
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<s>[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]"
        );
        let out = ChatTemplate::Llama2
            .render(&msgs(&[("user", "Q")]), "<s>", "</s>", true)
            .unwrap();
        assert_eq!(out, "<s>[INST] Q [/INST]");
    }

    #[test]
    fn llama3() {
        let out = ChatTemplate::Llama3
            .render(
                &msgs(&[
                    ("system", "Sys"),
                    ("user", " Hi\n"),
                    ("assistant", "Hello"),
                    ("user", "Bye"),
                ]),
                "<|begin_of_text|>",
                "<|eot_id|>",
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let out = ChatTemplate::Llama3
            .render(&msgs(&[("user", "Q")]), "", "", false)
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
        );
    }

    #[test]
    fn by_name_and_name() {
        for n in BUILTIN_TEMPLATE_NAMES {
            assert_eq!(ChatTemplate::by_name(n).unwrap().name(), n);
        }
        assert_eq!(ChatTemplate::by_name("ChatML").unwrap().name(), "chatml");
        assert_eq!(ChatTemplate::Jinja(String::new()).name(), "jinja");
        match ChatTemplate::by_name("alpaca") {
            Err(EngineError::ChatTemplate(m)) => {
                assert!(
                    m.contains("alpaca") && m.contains("chatml, vicuna, llama2, llama3"),
                    "{m}"
                )
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn bad_input_is_rejected() {
        let all = [
            ChatTemplate::Jinja(SMOLLM2_TEMPLATE.into()),
            ChatTemplate::ChatMl,
            ChatTemplate::Vicuna,
            ChatTemplate::Llama2,
            ChatTemplate::Llama3,
        ];
        for t in &all {
            let e = chat_error(t.render(&[], "", "", true));
            assert!(e.contains("empty"), "{}: {e}", t.name());
            let e = chat_error(t.render(&msgs(&[("user", "a"), ("robot", "b")]), "", "", true));
            assert!(
                e.contains("message 1") && e.contains("\"robot\""),
                "{}: {e}",
                t.name()
            );
        }
        // Formats with a single system slot.
        for t in [ChatTemplate::Vicuna, ChatTemplate::Llama2] {
            let e = chat_error(t.render(&msgs(&[("user", "a"), ("system", "b")]), "", "", true));
            assert!(e.contains("message 1") && e.contains("system"), "{e}");
        }
        // LLaMA-2 needs alternation starting with the user.
        let e = chat_error(ChatTemplate::Llama2.render(&msgs(&[("assistant", "a")]), "", "", true));
        assert!(e.contains("alternating"), "{e}");
        let e = chat_error(ChatTemplate::Llama2.render(
            &msgs(&[("system", "s"), ("user", "a"), ("user", "b")]),
            "",
            "",
            true,
        ));
        assert!(e.contains("message 2"), "{e}");
    }

    #[test]
    fn message_serde_round_trip() {
        let m = Message::new("user", "hi");
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, r#"{"role":"user","content":"hi"}"#);
        assert_eq!(serde_json::from_str::<Message>(&j).unwrap(), m);
    }
}
