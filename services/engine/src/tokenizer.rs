//! Text <-> token ids for the models the engine serves, plus the chat prompt they expect.
//!
//! One type, two sources: a GGUF file's embedded vocabulary (the llama.cpp convention:
//! `tokenizer.ggml.*` keys), rebuilt as a Hugging Face `tokenizers` pipeline equivalent to the
//! model's original `tokenizer.json` (byte-level BPE, with the pre-tokenizer named by
//! `tokenizer.ggml.pre`); or a Hugging Face directory's own `tokenizer.json`.
//!
//! Invariants kept here:
//! - every control / user-defined token (GGUF token types 3 and 4, HF added tokens) written
//!   in the text maps to its own id, never to the pieces of its spelling;
//! - BOS is added only by us, explicitly (`encode(.., add_bos)` / [`Tokenizer::add_bos`]),
//!   never by a post-processor, and never twice when a chat template already emits it;
//! - `decode` drops special tokens and decodes the rest byte-exactly;
//!   [`IncrementalDecoder`] yields exactly the text `decode` gives for the whole sequence,
//!   cut only at UTF-8 character boundaries (the "prefix offset" technique used by Hugging
//!   Face text-generation-inference and vLLM).
//!
//! The pre-tokenizers are those of the models' Hugging Face `tokenizer.json` files; the
//! `tokenizer.ggml.pre` names, the end-of-generation token set and the BOS defaults follow
//! llama.cpp's `llama-vocab.cpp`. The tests pin token ids produced by llama.cpp itself.

use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{NormalizerWrapper, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::chat::{ChatTemplate, Message};
use crate::error::{EngineError, Result};

// GPT-2's regex, `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
// is the one `ByteLevel { use_regex: true }` applies itself.

/// Qwen2's split regex (tokenizer.json `Split`, behavior `Isolated`).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// LLaMA-3's split regex: as Qwen2's, but numbers in runs of up to three digits.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` values this loader understands.
pub const SUPPORTED_GGUF_PRE: [&str; 11] = [
    "default",
    "gpt-2",
    "gpt2",
    "smollm",
    "starcoder",
    "refact",
    "qwen2",
    "deepseek-r1-qwen",
    "llama-bpe",
    "llama3",
    "llama-v3",
];

/// Control-token spellings that end a generation (llama.cpp's end-of-generation heuristic).
const EOG_TOKEN_TEXTS: [&str; 9] = [
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
];

const GGUF_TOKEN_TYPE_CONTROL: i64 = 3;
const GGUF_TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A model's tokenizer: encoding, decoding, the special ids generation needs, and its chat
/// template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special-token spellings split as plain text: chat message
    /// content goes through it, so only the template's own markup makes control tokens.
    plain: tokenizers::Tokenizer,
    /// End-of-generation ids; the model's primary EOS first. Never empty.
    eos_ids: Vec<u32>,
    bos_id: Option<u32>,
    add_bos: bool,
    vocab_size: usize,
    chat_template: ChatTemplate,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos_ids", &self.eos_ids)
            .field("bos_id", &self.bos_id)
            .field("add_bos", &self.add_bos)
            .field("chat_template", &self.chat_template.name())
            .finish()
    }
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(format!("{context}: {e}"))
}

/// Any GGUF integer value as i64 (token ids are u32 by convention, but writers vary).
fn gguf_int(v: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    Some(match v {
        V::U8(x) => i64::from(*x),
        V::I8(x) => i64::from(*x),
        V::U16(x) => i64::from(*x),
        V::I16(x) => i64::from(*x),
        V::U32(x) => i64::from(*x),
        V::I32(x) => i64::from(*x),
        V::U64(x) => i64::try_from(*x).ok()?,
        V::I64(x) => *x,
        _ => return None,
    })
}

struct GgufMeta<'a> {
    content: &'a gguf_file::Content,
    path: &'a Path,
}

impl GgufMeta<'_> {
    fn get(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }
    fn malformed(&self, msg: impl Into<String>) -> EngineError {
        EngineError::malformed(self.path, msg)
    }
    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(gguf_file::Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.malformed(format!(
                "metadata {key} should be a string, found {:?}",
                v.value_type()
            ))),
        }
    }
    fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(gguf_file::Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.malformed(format!(
                "metadata {key} should be a bool, found {:?}",
                v.value_type()
            ))),
        }
    }
    /// An optional token id, checked against the vocabulary size.
    fn token_id(&self, key: &str, n_vocab: usize) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let id = gguf_int(v)
            .ok_or_else(|| self.malformed(format!("metadata {key} should be an integer")))?;
        // Some writers store -1 (as i32 or u32::MAX) for "no such token".
        if id < 0 || id == i64::from(u32::MAX) {
            return Ok(None);
        }
        match u32::try_from(id) {
            Ok(id) if (id as usize) < n_vocab => Ok(Some(id)),
            _ => Err(self.malformed(format!(
                "metadata {key} = {id} is outside the vocabulary of {n_vocab} tokens"
            ))),
        }
    }
    fn array(&self, key: &str) -> Result<&[gguf_file::Value]> {
        match self.get(key) {
            None => Err(self.malformed(format!("metadata {key} is missing"))),
            Some(gguf_file::Value::Array(a)) => Ok(a.as_slice()),
            Some(v) => Err(self.malformed(format!(
                "metadata {key} should be an array, found {:?}",
                v.value_type()
            ))),
        }
    }
    fn string_array(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                gguf_file::Value::String(s) => Ok(s.as_str()),
                _ => Err(self.malformed(format!("metadata {key}[{i}] should be a string"))),
            })
            .collect()
    }
}

/// How the GGUF's `tokenizer.ggml.pre` says to split text before BPE.
fn gguf_pipeline(
    pre: &str,
) -> Result<(PreTokenizerWrapper, Option<NormalizerWrapper>, bool), String> {
    let byte_level_regex = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper, String> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("cannot compile the {pre} pre-tokenizer regex: {e}"))?;
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])))
    };
    // (pre-tokenizer, normalizer, BPE ignore_merges)
    Ok(match pre {
        // llama.cpp's own "default" is a degraded guess of its own; GPT-2's split is saner.
        "default" | "gpt-2" | "gpt2" => (byte_level_regex(), None, false),
        // SmolLM / StarCoder: every digit on its own, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" => (
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level_regex(),
            ])),
            None,
            false,
        ),
        // Qwen2's tokenizer.json also NFC-normalises its input.
        "qwen2" | "deepseek-r1-qwen" => (
            split_then_bytes(QWEN2_REGEX)?,
            Some(NormalizerWrapper::NFC(NFC)),
            false,
        ),
        // LLaMA-3's tokenizer.json sets `ignore_merges`: whole words in the vocab win.
        "llama-bpe" | "llama3" | "llama-v3" => (split_then_bytes(LLAMA3_REGEX)?, None, true),
        other => {
            return Err(format!(
                "unsupported tokenizer.ggml.pre {other:?} (supported: {})",
                SUPPORTED_GGUF_PRE.join(", ")
            ))
        }
    })
}

/// When a model ships no chat template: guess from its special tokens, else ChatML.
fn fallback_template(has_token: impl Fn(&str) -> bool) -> ChatTemplate {
    if has_token("<|start_header_id|>") && has_token("<|eot_id|>") {
        ChatTemplate::Llama3
    } else {
        ChatTemplate::ChatMl
    }
}

fn push_unique(v: &mut Vec<u32>, id: u32) {
    if !v.contains(&id) {
        v.push(id);
    }
}

impl Tokenizer {
    /// Build from GGUF metadata (llama.cpp convention). Only byte-level BPE
    /// (`tokenizer.ggml.model == "gpt2"`) is supported; `tokenizer.ggml.pre` picks the
    /// pre-tokenizer (see [`SUPPORTED_GGUF_PRE`]). Token types 3 (control) become special
    /// tokens (dropped by `decode`), 4 (user-defined) become non-special added tokens; both
    /// are matched verbatim in input text. End-of-generation ids: `eos_token_id`, then
    /// `eot_token_id` / `eom_token_id`, then control tokens spelt like known end markers
    /// (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, ...), as llama.cpp does.
    /// `add_bos_token` defaults to true for `llama-bpe`, false otherwise. Without
    /// `tokenizer.chat_template`, the template is LLaMA-3 when the vocabulary has its header
    /// tokens, else ChatML.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let meta = GgufMeta { content, path };
        let model = meta
            .string("tokenizer.ggml.model")?
            .ok_or_else(|| meta.malformed("metadata tokenizer.ggml.model is missing"))?;
        if model != "gpt2" {
            return Err(meta.malformed(format!(
                "tokenizer.ggml.model {model:?} is not supported (only \"gpt2\", byte-level BPE)"
            )));
        }
        let pre = meta.string("tokenizer.ggml.pre")?.unwrap_or("default");
        let (pre_tokenizer, normalizer, ignore_merges) =
            gguf_pipeline(pre).map_err(|m| meta.malformed(m))?;

        let tokens = meta.string_array("tokenizer.ggml.tokens")?;
        let n_vocab = tokens.len();
        if n_vocab == 0 || u32::try_from(n_vocab).is_err() {
            return Err(meta.malformed(format!(
                "tokenizer.ggml.tokens has an unusable length {n_vocab}"
            )));
        }
        let token_types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
            None => vec![1; n_vocab],
            Some(_) => meta
                .array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| {
                    gguf_int(v).ok_or_else(|| {
                        meta.malformed("tokenizer.ggml.token_type holds a non-integer")
                    })
                })
                .collect::<Result<_>>()?,
        };
        if token_types.len() != n_vocab {
            return Err(meta.malformed(format!(
                "tokenizer.ggml.token_type has {} entries for {n_vocab} tokens",
                token_types.len()
            )));
        }

        let mut vocab = Vocab::default();
        vocab.reserve(n_vocab);
        for (id, t) in tokens.iter().enumerate() {
            // A duplicated spelling keeps its first id, as llama.cpp's text-to-token map does.
            vocab.entry((*t).to_string()).or_insert(id as u32);
        }
        let merges = meta
            .string_array("tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                // As llama.cpp: split at the first space after the first character.
                let cut = m
                    .char_indices()
                    .skip(1)
                    .find(|&(_, c)| c == ' ')
                    .map(|(at, _)| at);
                match cut {
                    Some(at) => Ok((m[..at].to_string(), m[at + 1..].to_string())),
                    None => Err(meta.malformed(format!(
                        "tokenizer.ggml.merges[{i}] = {m:?} is not two space-separated tokens"
                    ))),
                }
            })
            .collect::<Result<Vec<_>>>()?;

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| meta.malformed(format!("cannot build the BPE model: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_normalizer(normalizer)
            .map_err(|e| tok_err("cannot set the normalizer", e))?;
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));

        let mut special = Vec::new();
        let mut user_defined = Vec::new();
        for (text, ty) in tokens.iter().zip(&token_types) {
            if text.is_empty() {
                continue;
            }
            match *ty {
                GGUF_TOKEN_TYPE_CONTROL => {
                    special.push(AddedToken::from(*text, true).normalized(false))
                }
                GGUF_TOKEN_TYPE_USER_DEFINED => {
                    user_defined.push(AddedToken::from(*text, false).normalized(false))
                }
                _ => {}
            }
        }
        inner
            .add_special_tokens(special)
            .map_err(|e| tok_err("cannot register control tokens", e))?;
        inner
            .add_tokens(user_defined)
            .map_err(|e| tok_err("cannot register user-defined tokens", e))?;

        let bos_id = meta.token_id("tokenizer.ggml.bos_token_id", n_vocab)?;
        let mut eos_ids = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = meta.token_id(key, n_vocab)? {
                push_unique(&mut eos_ids, id);
            }
        }
        for (id, (text, ty)) in tokens.iter().zip(&token_types).enumerate() {
            if *ty == GGUF_TOKEN_TYPE_CONTROL && EOG_TOKEN_TEXTS.contains(text) {
                push_unique(&mut eos_ids, id as u32);
            }
        }
        if eos_ids.is_empty() {
            return Err(meta.malformed(
                "no end-of-sequence token (tokenizer.ggml.eos_token_id is missing and no control token looks like one)",
            ));
        }
        let add_bos = meta
            .boolean("tokenizer.ggml.add_bos_token")?
            .unwrap_or(matches!(pre, "llama-bpe" | "llama3" | "llama-v3"));
        if add_bos && bos_id.is_none() {
            return Err(meta.malformed(
                "tokenizer.ggml.add_bos_token is set but there is no tokenizer.ggml.bos_token_id",
            ));
        }
        let chat_template = match meta.string("tokenizer.chat_template")? {
            Some(t) if !t.trim().is_empty() => ChatTemplate::Jinja(t.to_string()),
            _ => fallback_template(|t| inner.token_to_id(t).is_some()),
        };
        Ok(Tokenizer {
            plain: plain_copy(&inner),
            inner,
            eos_ids,
            bos_id,
            add_bos,
            vocab_size: n_vocab,
            chat_template,
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (bos/eos tokens, `add_bos_token`
    /// and the chat template when it is the model's own) so that [`Tokenizer::from_hf_dir`]
    /// reads back the same tokenizer.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let tok_path = dir.join("tokenizer.json");
        self.inner
            .save(&tok_path, false)
            .map_err(|e| tok_err("writing tokenizer.json", e))?;
        let name = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let mut config = serde_json::json!({
            "bos_token": name(self.bos_id),
            "eos_token": name(self.eos_ids.first().copied()),
            "add_bos_token": self.add_bos,
        });
        if let ChatTemplate::Jinja(t) = &self.chat_template {
            config["chat_template"] = serde_json::Value::String(t.clone());
        }
        let cfg_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| tok_err("tokenizer_config.json", e))?;
        std::fs::write(&cfg_path, text).map_err(|e| EngineError::io(&cfg_path, e))?;
        let extra: Vec<u32> = self.eos_ids.iter().skip(1).copied().collect();
        if !extra.is_empty() {
            let gen_path = dir.join("generation_config.json");
            let text = serde_json::json!({ "eos_token_id": self.eos_ids }).to_string();
            std::fs::write(&gen_path, text).map_err(|e| EngineError::io(&gen_path, e))?;
        }
        Ok(())
    }

    /// Hugging Face layout: `tokenizer.json` (required), `tokenizer_config.json` (chat
    /// template, `bos_token`, `eos_token`, `add_bos_token`), `generation_config.json`
    /// (`eos_token_id`, a number or a list, added to the EOS set) and `chat_template.jinja` /
    /// `chat_template.json` when the config has no template. Without `add_bos_token`, BOS is
    /// added iff `tokenizer.json`'s post-processor would add it.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(EngineError::MissingFile {
                path: tok_path,
                what: "Hugging Face tokenizer (tokenizer.json)".into(),
            });
        }
        let bytes = std::fs::read(&tok_path).map_err(|e| EngineError::io(&tok_path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| EngineError::malformed(&tok_path, e.to_string()))?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_opt(&config_path)?.unwrap_or(serde_json::Value::Null);
        let gen_path = dir.join("generation_config.json");
        let gen_config = read_json_opt(&gen_path)?.unwrap_or(serde_json::Value::Null);

        let resolve = |key: &str, path: &Path| -> Result<Option<u32>> {
            let text = match config.get(key) {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(serde_json::Value::String(s)) => s.as_str(),
                Some(v) => match v.get("content").and_then(|c| c.as_str()) {
                    Some(s) => s,
                    None => {
                        return Err(EngineError::malformed(
                            path,
                            format!("{key} should be a string or an object with \"content\""),
                        ))
                    }
                },
            };
            match inner.token_to_id(text) {
                Some(id) => Ok(Some(id)),
                None => Err(EngineError::malformed(
                    path,
                    format!("{key} {text:?} is not in the vocabulary"),
                )),
            }
        };
        let bos_id = resolve("bos_token", &config_path)?;
        let mut eos_ids = Vec::new();
        if let Some(id) = resolve("eos_token", &config_path)? {
            eos_ids.push(id);
        }
        match gen_config.get("eos_token_id") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(a)) => {
                for v in a {
                    push_unique(&mut eos_ids, json_token_id(v, &gen_path)?);
                }
            }
            Some(v) => push_unique(&mut eos_ids, json_token_id(v, &gen_path)?),
        }
        if eos_ids.is_empty() {
            return Err(EngineError::Tokenizer(format!(
                "no end-of-sequence token: neither {} (eos_token) nor {} (eos_token_id) names one",
                config_path.display(),
                gen_path.display()
            )));
        }

        let add_bos = match config.get("add_bos_token") {
            Some(serde_json::Value::Bool(b)) => *b,
            _ => match bos_id {
                Some(bos) => {
                    let probe = inner
                        .encode_fast("", true)
                        .map_err(|e| tok_err("cannot probe the post-processor", e))?;
                    probe.get_ids().first() == Some(&bos)
                }
                None => false,
            },
        };
        if add_bos && bos_id.is_none() {
            return Err(EngineError::malformed(
                &config_path,
                "add_bos_token is set but there is no bos_token",
            ));
        }

        let chat_template = match hf_chat_template(dir, &config, &config_path)? {
            Some(t) => ChatTemplate::Jinja(t),
            None => fallback_template(|t| inner.token_to_id(t).is_some()),
        };
        let vocab_size = inner.get_vocab_size(true);
        Ok(Tokenizer {
            plain: plain_copy(&inner),
            inner,
            eos_ids,
            bos_id,
            add_bos,
            vocab_size,
            chat_template,
        })
    }

    /// Token ids for `text`. Special-token spellings in the text (`<|im_start|>`, ...) become
    /// their ids. `add_bos` prepends the BOS id (an error if the model has none).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| tok_err("encoding failed", e))?;
        let ids = enc.get_ids();
        if !add_bos {
            return Ok(ids.to_vec());
        }
        let bos = self.bos_id.ok_or_else(|| {
            EngineError::Tokenizer("a BOS token was requested but the model has none".into())
        })?;
        let mut out = Vec::with_capacity(ids.len() + 1);
        out.push(bos);
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// Text for `ids`, leaving out special tokens (BOS, EOS, `<|im_start|>`, ...). Bytes that
    /// do not form valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| tok_err("decoding failed", e))
    }

    /// End-of-generation ids, the model's primary EOS first; never empty.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether prompts for this model start with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Number of token ids the tokenizer knows (GGUF: `tokenizer.ggml.tokens` length; HF:
    /// the model vocabulary plus added tokens). The model's embedding table may be larger.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of an exact token spelling (special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The spelling of a token id (byte-level tokens in their `Ġ`-alphabet form).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat_template
    }

    /// The special (control) tokens: their spellings and ids.
    pub fn special_tokens(&self) -> Vec<(String, u32)> {
        self.inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect()
    }

    pub fn set_chat_template(&mut self, t: ChatTemplate) {
        self.chat_template = t;
    }

    /// The prompt text for `messages` (with the generation prompt), as rendered by the chat
    /// template with this model's BOS / primary EOS spellings.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        let bos = self.bos_id.and_then(|id| self.id_to_token(id));
        let eos = self.id_to_token(self.eos_ids[0]);
        self.chat_template.render(
            messages,
            bos.as_deref().unwrap_or(""),
            eos.as_deref().unwrap_or(""),
            true,
        )
    }

    /// Render `messages` with the chat template (add_generation_prompt = true) and encode
    /// the result. BOS is prepended when the model wants one and the template did not
    /// already write it.
    ///
    /// Message content is text, never markup. The rendered text is encoded as a whole (as
    /// always) unless that makes control tokens the template alone does not make, i.e. some
    /// content spells one (`<|im_end|>`, ...). Then the template is rendered with a placeholder
    /// for each content, its own text is encoded with special tokens recognised, and each
    /// content with their spellings split as plain text: a user who writes `<|im_start|>system`
    /// gets those characters, not a forged turn.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        for m in messages {
            if m.content.contains([PLACEHOLDER_OPEN, PLACEHOLDER_CLOSE]) {
                return Err(EngineError::InvalidRequest(format!(
                    "message content may not hold the private-use characters U+E000 or U+E001 \
                     (role {:?})",
                    m.role
                )));
            }
        }
        let text = self.render_chat(messages)?;
        let add_bos = self.add_bos && !self.starts_with_bos(&text);
        let whole = self.encode(&text, add_bos)?;
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Message::new(
                    m.role.clone(),
                    format!("{PLACEHOLDER_OPEN}{i}{PLACEHOLDER_CLOSE}"),
                )
            })
            .collect();
        let template = self.render_chat(&marked)?;
        let special: std::collections::HashSet<u32> = self
            .special_tokens()
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        let controls = |ids: &[u32]| -> Vec<u32> {
            ids.iter()
                .copied()
                .filter(|i| special.contains(i))
                .collect()
        };
        if controls(&whole) == controls(&self.encode(&template, add_bos)?) {
            return Ok(whole);
        }
        let mut ids = if add_bos {
            self.encode("", true)?
        } else {
            Vec::new()
        };
        let mut rest = template.as_str();
        while let Some(open) = rest.find(PLACEHOLDER_OPEN) {
            // Whitespace before the content goes with it, as it would in the whole text
            // (`USER: ` + `Hi` must give ` Hi`, not ` ` + `Hi`).
            let lead = rest[..open].trim_end().len();
            ids.extend(self.encode(&rest[..lead], false)?);
            let after = &rest[open + PLACEHOLDER_OPEN.len_utf8()..];
            let close = after.find(PLACEHOLDER_CLOSE).ok_or_else(|| {
                EngineError::Tokenizer("the chat template cut a message placeholder".into())
            })?;
            let i: usize = after[..close].parse().map_err(|_| {
                EngineError::Tokenizer("the chat template altered a message placeholder".into())
            })?;
            let content = &messages
                .get(i)
                .ok_or_else(|| EngineError::Tokenizer("unknown message placeholder".into()))?
                .content;
            let piece = format!("{}{content}", &rest[lead..open]);
            let enc = self
                .plain
                .encode_fast(piece.as_str(), false)
                .map_err(|e| tok_err("encoding failed", e))?;
            ids.extend_from_slice(enc.get_ids());
            rest = &after[close + PLACEHOLDER_CLOSE.len_utf8()..];
        }
        ids.extend(self.encode(rest, false)?);
        Ok(ids)
    }

    fn starts_with_bos(&self, text: &str) -> bool {
        match self.bos_id.and_then(|id| self.id_to_token(id)) {
            Some(bos) if !bos.is_empty() => text.starts_with(&bos),
            _ => false,
        }
    }
}

/// Placeholder brackets for message content while the template renders (private-use code
/// points; content holding them is refused).
const PLACEHOLDER_OPEN: char = '\u{E000}';
const PLACEHOLDER_CLOSE: char = '\u{E001}';

/// A copy of `t` that encodes special-token spellings as ordinary text.
fn plain_copy(t: &tokenizers::Tokenizer) -> tokenizers::Tokenizer {
    let mut p = t.clone();
    p.set_encode_special_tokens(true);
    p
}

fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| EngineError::malformed(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::io(path, e)),
    }
}

fn json_token_id(v: &serde_json::Value, path: &Path) -> Result<u32> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| EngineError::malformed(path, format!("eos_token_id {v} is not a token id")))
}

/// The chat template from `tokenizer_config.json` (a string, or a list of named templates of
/// which "default" is taken), else `chat_template.jinja`, else `chat_template.json`.
fn hf_chat_template(
    dir: &Path,
    config: &serde_json::Value,
    config_path: &Path,
) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => {
            let named = |want: Option<&str>| {
                list.iter().find_map(|e| {
                    let name = e.get("name").and_then(|n| n.as_str());
                    let template = e.get("template").and_then(|t| t.as_str())?;
                    (want.is_none() || name == want).then(|| template.to_string())
                })
            };
            return match named(Some("default")).or_else(|| named(None)) {
                Some(t) => Ok(Some(t)),
                None => Err(EngineError::malformed(
                    config_path,
                    "chat_template is a list without any {name, template} entry",
                )),
            };
        }
        Some(_) => {
            return Err(EngineError::malformed(
                config_path,
                "chat_template should be a string or a list of {name, template}",
            ))
        }
    }
    let jinja_path = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja_path) {
        Ok(s) => return Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(EngineError::io(&jinja_path, e)),
    }
    let json_path = dir.join("chat_template.json");
    if let Some(v) = read_json_opt(&json_path)? {
        return match v.get("chat_template").and_then(|t| t.as_str()) {
            Some(t) => Ok(Some(t.to_string())),
            None => Err(EngineError::malformed(
                &json_path,
                "expected {\"chat_template\": \"...\"}",
            )),
        };
    }
    Ok(None)
}

/// Streaming detokeniser. Push generated ids one at a time; each call returns the text that
/// became final, never splitting a UTF-8 character (a byte-level token can end mid-character:
/// such bytes are held back until the character completes). The concatenation of all
/// `push` results and `finish` equals `tok.decode(all ids)`.
///
/// Technique ("prefix offset", from text-generation-inference / vLLM): decode a short window
/// of recent tokens with and without the newest ones and emit the difference once it no longer
/// ends in U+FFFD. The window restarts after each emission, so each step costs O(window).
pub struct IncrementalDecoder<'a> {
    tok: &'a Tokenizer,
    /// Tokens from the start of the current window.
    ids: Vec<u32>,
    /// `ids[..read_offset]` has been emitted (its text is the window's context).
    read_offset: usize,
}

impl<'a> IncrementalDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        IncrementalDecoder {
            tok,
            ids: Vec::new(),
            read_offset: 0,
        }
    }

    /// Feed one id; returns newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        self.step(false)
    }

    /// Flush whatever is held back (an incomplete character comes out as U+FFFD) and reset.
    pub fn finish(&mut self) -> Result<String> {
        let out = self.step(true)?;
        self.ids.clear();
        self.read_offset = 0;
        Ok(out)
    }

    fn step(&mut self, flush: bool) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = self.tok.decode(&self.ids[..self.read_offset])?;
        let full = self.tok.decode(&self.ids)?;
        if !flush && (full.len() <= prefix.len() || full.ends_with('\u{FFFD}')) {
            return Ok(String::new());
        }
        let new = match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            // Not expected for byte-level BPE; keep going with the part that differs.
            None => {
                let common = full
                    .char_indices()
                    .zip(prefix.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map_or(0, |((i, c), _)| i + c.len_utf8());
                full[common..].to_string()
            }
        };
        // The tokens just emitted become the next window's context.
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    fn model_path() -> PathBuf {
        if let Some(p) = std::env::var_os("EAGLE_TEST_GGUF") {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "EAGLE_TEST_GGUF={} does not exist",
                p.display()
            );
            return p;
        }
        let home = std::env::var_os("EAGLE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/eagle")))
            .expect("neither EAGLE_HOME nor HOME is set");
        let p = home.join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            p.is_file(),
            "test model not found at {} (set EAGLE_TEST_GGUF or run `eagle fetch smollm2-135m`)",
            p.display()
        );
        p
    }

    fn smol() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            let path = model_path();
            let mut f = std::fs::File::open(&path).unwrap();
            let content = gguf_file::Content::read(&mut f).unwrap();
            Tokenizer::from_gguf(&content, &path).unwrap()
        })
    }

    const ROUND_TRIP: &[&str] = &[
        "Hello, world!",
        "  leading spaces and trailing   ",
        "tabs\tand\nnewlines\r\n\n\nmany",
        "Numbers: 1234567890, 3.14159, -42, 1e10",
        "Unicode: héllo wörld, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어",
        "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️",
        "fn main() {\n    let x: Vec<u32> = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
        "def f(a, b):\n\treturn a ** b  # comment\n",
        "Mixed <b>HTML</b> &amp; symbols ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
        "It's, I'm, we've, they'll, he'd, you're, ISN'T",
        "",
        " ",
        "\u{0}\u{7f}\u{ad}\u{200b}zero-width",
    ];

    #[test]
    fn tokenizer_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn gguf_metadata() {
        let t = smol();
        assert_eq!(t.vocab_size(), 49152);
        assert_eq!(t.bos_id(), Some(1));
        // Primary EOS <|im_end|> first, then <|endoftext|> (an end-of-generation control token).
        assert_eq!(t.eos_ids(), &[2, 0]);
        assert!(!t.add_bos());
        assert_eq!(t.chat_template().name(), "jinja");
        assert_eq!(t.token_to_id("<|im_start|>"), Some(1));
        assert_eq!(t.id_to_token(2).as_deref(), Some("<|im_end|>"));
    }

    #[test]
    fn special_tokens_map_to_ids() {
        let t = smol();
        assert_eq!(t.encode("<|im_start|>", false).unwrap(), vec![1]);
        assert_eq!(t.encode("<|im_end|>", false).unwrap(), vec![2]);
        assert_eq!(t.encode("<|endoftext|>", false).unwrap(), vec![0]);
        let ids = t.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&2));
        assert_eq!(ids.iter().filter(|&&i| i < 17).count(), 2);
        // Special tokens are dropped when decoding.
        assert_eq!(t.decode(&ids).unwrap(), "user\nhi");
        assert_eq!(t.encode("x", true).unwrap()[0], 1);
    }

    /// Ids from llama.cpp's own tokenizer for this GGUF (llama-cpp-python 0.3.16:
    /// `Llama(path, vocab_only=True).tokenize(text.encode(), add_bos=False, special=True)`).
    const LLAMA_CPP_IDS: &[(&str, &[u32])] = &[
            ("Hello, world!",
             &[19556, 28, 905, 17]),
            ("  leading spaces and trailing   ",
             &[216, 2899, 5600, 284, 35079, 333]),
            ("tabs\tand\nnewlines\r\n\n\nmany",
             &[100, 7366, 197, 397, 198, 2241, 5110, 201, 1116, 198, 18431]),
            ("Numbers: 1234567890, 3.14159, -42, 1e10",
             &[39006, 42, 216, 33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 28, 216, 35, 30, 33, 36, 33, 37, 41, 28, 731, 36, 34, 28, 216, 33, 85, 33, 32]),
            ("Unicode: héllo wörld, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어",
             &[3706, 15817, 42, 294, 2756, 31394, 267, 29989, 400, 28, 5664, 239, 17162, 17162, 25723, 11517, 12001, 21118, 26112, 28, 216, 9175, 14714, 9382, 39511, 7872, 24958, 28, 216, 28589, 29184, 36518, 40562, 116, 28, 17097, 241, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226, 28, 216, 33085, 246, 181, 130, 251, 183, 240, 129]),
            ("Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️",
             &[10809, 33777, 42, 40303, 218, 10813, 232, 227, 10813, 235, 119, 321, 231, 10813, 235, 119, 321, 231, 10813, 235, 117, 321, 231, 10813, 235, 116, 15107, 225, 121, 10813, 225, 132, 4636, 247, 114, 31752]),
            ("fn main() {\n    let x: Vec<u32> = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
             &[7853, 1085, 1000, 1662, 472, 1303, 1792, 42, 717, 1159, 44, 101, 35, 34, 46, 446, 37024, 21653, 33, 28, 216, 34, 28, 216, 35, 26695, 472, 1628, 34115, 17, 45257, 104, 42, 47, 15201, 43, 198, 109, 198]),
            ("It's, I'm, we've, they'll, he'd, you're, ISN'T",
             &[1589, 506, 28, 339, 5248, 28, 392, 3543, 28, 502, 3060, 28, 384, 6737, 28, 346, 2316, 28, 4042, 62, 23, 68]),
            ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
             &[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]),
            ("a<|im_end|>b <|endoftext|> <repo_name>x",
             &[81, 2, 82, 216, 0, 216, 3, 104]),
            ("x = 100000 + 2.5e-3;\n\n\n   \t  end",
             &[104, 446, 216, 33, 32, 32, 32, 32, 32, 1232, 216, 34, 30, 37, 85, 29, 35, 43, 13272, 197, 216, 1112]),
            (" \u{a0}non-breaking\u{2003}em space",
             &[216, 15442, 9033, 29, 11194, 321, 221, 391, 1898]),
            ("\u{fb01} ligature \u{c5} vs A\u{30a}",
             &[27141, 13042, 906, 5549, 223, 6375, 330, 151, 228]),
            ("a\u{0}b",
             &[81, 190, 82]),
            ("you're",
             &[8320, 2316]),
            ("  \n  \n",
             &[256, 11181, 198]),
    ];

    #[test]
    fn matches_llama_cpp() {
        let t = smol();
        for (text, expected) in LLAMA_CPP_IDS {
            assert_eq!(&t.encode(text, false).unwrap(), expected, "{text:?}");
        }
    }

    fn smol_content() -> gguf_file::Content {
        let mut f = std::fs::File::open(model_path()).unwrap();
        gguf_file::Content::read(&mut f).unwrap()
    }

    /// The SmolLM2 vocabulary under other pre-tokenizers, against llama.cpp given the same
    /// GGUF with only `tokenizer.ggml.pre` changed (gguf's `gguf_new_metadata.py
    /// --pre-tokenizer`). SmolLM2 has no multi-digit tokens, so `\p{N}{1,3}` still yields
    /// single digits; the newline and punctuation rules differ visibly.
    #[test]
    fn other_pre_tokenizers_match_llama_cpp() {
        let texts = [
            "1234567890 12 123 1234",
            "ISN'T HE'LL we'RE",
            "a\n\n b\r\n\r\nc  \n",
            "...!!!\n\n(hello)$world",
            "a   b\t\tc",
            "x = 100000 + 2.5e-3;\n\n\n   \t  end",
            "h\u{e9}llo \u{4e2d}\u{6587}\u{5b57}\u{7b26} \u{1f600}",
            "\u{c5} vs A\u{30a}",
        ];
        let split_style: [&[u32]; 8] = [
            &[
                33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 216, 33, 34, 216, 33, 34, 35, 216, 33, 34,
                35, 36,
            ],
            &[2721, 62, 23, 68, 18209, 23, 16421, 392, 23, 3256],
            &[81, 1116, 278, 18682, 83, 32057],
            &[2026, 29646, 1116, 24, 28120, 38224, 6693],
            &[81, 256, 278, 197, 197, 83],
            &[
                104, 446, 216, 33, 32, 32, 32, 32, 32, 1232, 216, 34, 30, 37, 85, 29, 35, 43,
                16506, 333, 197, 216, 1112,
            ],
            &[
                88, 2756, 31394, 216, 28589, 29184, 36518, 40562, 116, 40303, 218,
            ],
            &[142, 223, 6375, 330, 151, 228],
        ];
        let gpt2: [&[u32]; 8] = [
            split_style[0],
            split_style[1],
            &[81, 1116, 278, 7209, 198, 83, 32057],
            &[2026, 29646, 198, 198, 24, 28120, 38224, 6693],
            split_style[4],
            &[
                104, 446, 216, 33, 32, 32, 32, 32, 32, 1232, 216, 34, 30, 37, 85, 29, 35, 43,
                13272, 197, 216, 1112,
            ],
            split_style[6],
            split_style[7],
        ];
        let path = model_path();
        let mut content = smol_content();
        for (pre, expected) in [
            ("qwen2", split_style),
            ("llama-bpe", split_style),
            ("gpt-2", gpt2),
        ] {
            content.metadata.insert(
                "tokenizer.ggml.pre".into(),
                gguf_file::Value::String(pre.into()),
            );
            let t = Tokenizer::from_gguf(&content, &path).unwrap();
            for (text, ids) in texts.iter().zip(expected) {
                let got = t.encode(text, false).unwrap();
                if pre == "qwen2" && text.contains('\u{30a}') {
                    // Qwen2's tokenizer.json NFC-normalises (llama.cpp does not): A + ring
                    // becomes \u{c5}, as llama.cpp encodes the precomposed text.
                    assert_eq!(got, [142, 223, 6375, 5549, 223], "{pre} {text:?}");
                    continue;
                } else {
                    assert_eq!(got, ids, "{pre} {text:?}");
                }
                assert_eq!(&t.decode(&got).unwrap(), text, "{pre} {text:?}");
            }
            assert!(!t.add_bos(), "add_bos_token is in the metadata");
        }
        // Without add_bos_token, LLaMA-3 style vocabularies want BOS.
        content.metadata.remove("tokenizer.ggml.add_bos_token");
        content.metadata.insert(
            "tokenizer.ggml.pre".into(),
            gguf_file::Value::String("llama-bpe".into()),
        );
        let mut t = Tokenizer::from_gguf(&content, &path).unwrap();
        assert!(t.add_bos());
        assert_eq!(t.encode("hi", true).unwrap(), [1, 6004]);
        // SmolLM2's BOS is <|im_start|>, which its template already writes first: no second one.
        let msgs = [Message::new("user", "hi")];
        assert_eq!(t.encode_chat(&msgs).unwrap()[..2], [1, 9690]);
        // A template that does not start with BOS gets it prepended.
        t.set_chat_template(ChatTemplate::Vicuna);
        let ids = t.encode_chat(&msgs).unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(
            ids[1..],
            t.encode(&t.render_chat(&msgs).unwrap(), false).unwrap()
        );
    }

    #[test]
    fn bad_gguf_metadata_is_rejected() {
        let path = model_path();
        let check = |key: &str, value: Option<gguf_file::Value>, needle: &str| {
            let mut content = smol_content();
            match value {
                Some(v) => content.metadata.insert(key.into(), v),
                None => content.metadata.remove(key),
            };
            match Tokenizer::from_gguf(&content, &path) {
                Err(EngineError::Malformed { msg, .. }) => {
                    assert!(msg.contains(needle), "{key}: {msg}")
                }
                other => panic!("{key}: expected a malformed-file error, got {other:?}"),
            }
        };
        use gguf_file::Value as V;
        check(
            "tokenizer.ggml.pre",
            Some(V::String("tekken".into())),
            "unsupported tokenizer.ggml.pre \"tekken\" (supported: default, gpt-2",
        );
        check(
            "tokenizer.ggml.model",
            Some(V::String("llama".into())),
            "\"llama\" is not supported",
        );
        check(
            "tokenizer.ggml.tokens",
            None,
            "tokenizer.ggml.tokens is missing",
        );
        check(
            "tokenizer.ggml.merges",
            Some(V::Array(vec![V::String("ab".into())])),
            "merges[0]",
        );
        check(
            "tokenizer.ggml.eos_token_id",
            Some(V::U32(1 << 20)),
            "outside the vocabulary",
        );
        check(
            "tokenizer.ggml.token_type",
            Some(V::Array(vec![V::I32(1)])),
            "1 entries for 49152 tokens",
        );
    }

    #[test]
    fn hf_dir_matches_gguf() {
        let gguf = smol();
        let dir = std::env::temp_dir().join(format!("eagle-tok-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        match Tokenizer::from_hf_dir(&dir) {
            Err(EngineError::MissingFile { path, .. }) => assert!(path.ends_with("tokenizer.json")),
            other => panic!("expected a missing-file error, got {other:?}"),
        }
        std::fs::write(
            dir.join("tokenizer.json"),
            gguf.inner.to_string(false).unwrap(),
        )
        .unwrap();
        let template = match gguf.chat_template() {
            ChatTemplate::Jinja(s) => s.clone(),
            other => panic!("unexpected template {other:?}"),
        };
        let config = serde_json::json!({
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "<|im_end|>", "special": true},
            "chat_template": template,
        });
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"eos_token_id": [2, 0]}"#,
        )
        .unwrap();

        let hf = Tokenizer::from_hf_dir(&dir).unwrap();
        assert_eq!(hf.eos_ids(), &[2, 0]);
        assert_eq!(hf.bos_id(), Some(1));
        assert!(!hf.add_bos(), "no post-processor adds BOS");
        assert_eq!(hf.vocab_size(), 49152);
        for (text, expected) in LLAMA_CPP_IDS {
            assert_eq!(&hf.encode(text, false).unwrap(), expected, "{text:?}");
        }
        let msgs = [Message::new("user", "hi")];
        assert_eq!(
            hf.encode_chat(&msgs).unwrap(),
            gguf.encode_chat(&msgs).unwrap()
        );

        // Templates from chat_template.jinja; add_bos_token honoured; bad JSON reported.
        let config = serde_json::json!({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "add_bos_token": true});
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        std::fs::write(dir.join("chat_template.jinja"), "{{ messages[0].content }}").unwrap();
        let hf = Tokenizer::from_hf_dir(&dir).unwrap();
        assert!(hf.add_bos());
        assert_eq!(hf.render_chat(&msgs).unwrap(), "hi");
        assert_eq!(hf.encode_chat(&msgs).unwrap(), [1, 6004]);
        std::fs::write(dir.join("generation_config.json"), "{").unwrap();
        assert!(matches!(
            Tokenizer::from_hf_dir(&dir),
            Err(EngineError::Malformed { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn digits_are_split_individually() {
        let t = smol();
        let ids = t.encode("1234567890", false).unwrap();
        assert_eq!(ids.len(), 10);
        for (i, d) in "1234567890".chars().enumerate() {
            assert_eq!(t.id_to_token(ids[i]).unwrap(), d.to_string());
        }
        // A space before a number stays a token of its own.
        let ids = t.encode("a 12", false).unwrap();
        let toks: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
        assert_eq!(toks, ["a", "Ġ", "1", "2"]);
    }

    #[test]
    fn round_trip() {
        let t = smol();
        for s in ROUND_TRIP {
            let ids = t.encode(s, false).unwrap();
            assert_eq!(&t.decode(&ids).unwrap(), s, "ids {ids:?}");
        }
    }

    #[test]
    fn incremental_decoder_matches_decode() {
        let t = smol();
        for s in ROUND_TRIP {
            let mut ids = t.encode(s, false).unwrap();
            ids.insert(0, 1); // a special token in the stream decodes to nothing
            ids.push(2);
            let mut dec = IncrementalDecoder::new(t);
            let mut out = String::new();
            for &id in &ids {
                let piece = dec.push(id).unwrap();
                assert!(!piece.contains('\u{FFFD}'), "split character in {piece:?}");
                out.push_str(&piece);
            }
            out.push_str(&dec.finish().unwrap());
            assert_eq!(&out, s);
            assert_eq!(dec.finish().unwrap(), "");
        }
    }

    #[test]
    fn incremental_decoder_holds_partial_characters() {
        let t = smol();
        // Byte-level tokens for the four bytes of 😀 (F0 9F 98 80), one at a time.
        let byte_tok = |b: u8| {
            let ch = bytes_char(b);
            t.token_to_id(&ch.to_string()).unwrap()
        };
        let mut dec = IncrementalDecoder::new(t);
        assert_eq!(dec.push(t.token_to_id("Hi").unwrap()).unwrap(), "Hi");
        for b in [0xF0, 0x9F, 0x98] {
            assert_eq!(dec.push(byte_tok(b)).unwrap(), "");
        }
        assert_eq!(dec.push(byte_tok(0x80)).unwrap(), "😀");
        // An unfinished character comes out (as U+FFFD) only on finish.
        assert_eq!(dec.push(byte_tok(0xE2)).unwrap(), "");
        assert_eq!(dec.finish().unwrap(), "\u{FFFD}");
    }

    /// GPT-2's byte-to-unicode mapping.
    fn bytes_char(b: u8) -> char {
        let printable =
            |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        if printable(b) {
            return char::from(b);
        }
        let n = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + n).unwrap()
    }

    #[test]
    fn chat_encoding() {
        let t = smol();
        let msgs = [Message::new("user", "What is 2+2?")];
        let text = t.render_chat(&msgs).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = t.encode_chat(&msgs).unwrap();
        assert_eq!(ids, t.encode(&text, false).unwrap());
        // add_bos is false: no BOS before <|im_start|>. Expected ids from llama.cpp (below).
        assert_eq!(ids, LLAMA_CPP_IDS[8].1);
        assert!(t.encode_chat(&[]).is_err());

        let mut t2 = t.clone();
        t2.set_chat_template(ChatTemplate::ChatMl);
        assert_eq!(t2.chat_template().name(), "chatml");
        let ids = t2.encode_chat(&msgs).unwrap();
        assert_eq!(t2.decode(&ids).unwrap(), "user\nWhat is 2+2?\nassistant\n");
    }
}
