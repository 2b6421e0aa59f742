//! Public requests to validated jobs. Everything a client can get wrong is caught here, before
//! any session is opened, and answered with `INVALID_ARGUMENT` and a message naming the field.

use eagle_engine::chat::Message;
use eagle_engine::sampling::SamplingParams;
use eagle_engine::spec::SpecConfig;
use eagle_engine::tokenizer::Tokenizer;
use eagle_proto::status::{from_engine, invalid};
use eagle_proto::v1::{generate_request::Input, GenerateRequest};
use tonic::Status;

pub const DEFAULT_MAX_NEW_TOKENS: u32 = 128;
pub const MAX_STOP_STRINGS: usize = 8;
pub const MAX_STOP_BYTES: usize = 256;
/// Raw prompt or chat text beyond this is refused before tokenising.
pub const MAX_INPUT_BYTES: usize = 1 << 20;
pub const MAX_SESSION_ID_BYTES: usize = 100;

/// A request ready to run.
#[derive(Clone, Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// None: plain decoding.
    pub spec: Option<SpecConfig>,
    pub stop: Vec<String>,
    /// A multi-turn session whose KV cache this request extends.
    pub session: Option<String>,
}

/// What the served model allows.
pub struct Limits {
    pub model_name: String,
    pub max_context: usize,
}

pub fn validate(req: &GenerateRequest, tok: &Tokenizer, lim: &Limits) -> Result<Job, Status> {
    if !req.model.is_empty() && req.model != lim.model_name {
        return Err(invalid(format!(
            "unknown model {:?}: this cluster serves {:?}",
            req.model, lim.model_name
        )));
    }
    let prompt = match &req.input {
        None => return Err(invalid("give a prompt or chat messages")),
        Some(Input::Prompt(p)) => {
            if p.is_empty() {
                return Err(invalid("the prompt is empty"));
            }
            if p.len() > MAX_INPUT_BYTES {
                return Err(invalid(format!(
                    "the prompt is {} bytes; the limit is {MAX_INPUT_BYTES}",
                    p.len()
                )));
            }
            tok.encode(p, tok.add_bos()).map_err(|e| from_engine(&e))?
        }
        Some(Input::Messages(m)) => {
            if m.messages.is_empty() {
                return Err(invalid("messages is empty"));
            }
            let bytes: usize = m.messages.iter().map(|x| x.content.len()).sum();
            if bytes > MAX_INPUT_BYTES {
                return Err(invalid(format!(
                    "the messages hold {bytes} bytes; the limit is {MAX_INPUT_BYTES}"
                )));
            }
            let mut msgs = Vec::with_capacity(m.messages.len());
            for (i, x) in m.messages.iter().enumerate() {
                if !matches!(x.role.as_str(), "system" | "user" | "assistant") {
                    return Err(invalid(format!(
                        "messages[{i}].role is {:?}: use system, user or assistant",
                        x.role
                    )));
                }
                msgs.push(Message::new(x.role.clone(), x.content.clone()));
            }
            tok.encode_chat(&msgs).map_err(|e| from_engine(&e))?
        }
    };
    if prompt.is_empty() {
        return Err(invalid("the prompt is empty after tokenising"));
    }

    let s = req.sampling.clone().unwrap_or_default();
    let max_new = s.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS) as usize;
    if max_new == 0 {
        return Err(invalid("max_new_tokens must be at least 1"));
    }
    if prompt.len() + max_new > lim.max_context {
        return Err(invalid(format!(
            "the prompt ({} tokens) plus max_new_tokens ({max_new}) exceeds the model's \
             context of {} tokens",
            prompt.len(),
            lim.max_context
        )));
    }
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(0.0),
        top_p: s.top_p.unwrap_or(1.0),
        top_k: s.top_k.unwrap_or(0) as usize,
        seed: s.seed,
    };
    sampling.validate().map_err(|e| from_engine(&e))?;
    if s.stop.len() > MAX_STOP_STRINGS {
        return Err(invalid(format!(
            "{} stop strings; at most {MAX_STOP_STRINGS}",
            s.stop.len()
        )));
    }
    if let Some((i, _)) = s
        .stop
        .iter()
        .enumerate()
        .find(|(_, x)| x.is_empty() || x.len() > MAX_STOP_BYTES)
    {
        return Err(invalid(format!(
            "stop[{i}] must be 1 to {MAX_STOP_BYTES} bytes long"
        )));
    }

    let sp = req.speculation.unwrap_or_default();
    let spec = if sp.enabled.unwrap_or(true) {
        let mut c = SpecConfig::default();
        if let Some(t) = sp.total_token {
            c.total_token = t;
        }
        if let Some(d) = sp.depth {
            c.depth = d as usize;
        }
        if let Some(k) = sp.top_k {
            c.top_k = k as usize;
        }
        c.validate().map_err(|e| from_engine(&e))?;
        Some(c)
    } else {
        None
    };
    let session = match req.session_id.as_str() {
        "" => None,
        id if id.len() > MAX_SESSION_ID_BYTES
            || !id
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(&c)) =>
        {
            return Err(invalid(format!(
                "session_id must be 1 to {MAX_SESSION_ID_BYTES} bytes of letters, digits, '.', \
                 '_', ':' or '-'"
            )));
        }
        id => Some(id.to_string()),
    };
    Ok(Job {
        session,
        prompt,
        max_new_tokens: max_new,
        sampling,
        spec,
        stop: s.stop,
    })
}
