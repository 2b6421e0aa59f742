//! Chat formatting for training: a conversation as the target's chat template renders it, with
//! a loss mask on the assistant's tokens.
//!
//! Invariant: the ids are exactly what the engine would feed the target for this conversation
//! (the same template, BOS rule and tokenizer as `Tokenizer::encode_chat`), and `mask[j] == 1`
//! iff token j belongs to an assistant reply (its text and the template's end-of-turn tokens),
//! as in the EAGLE paper's data ("the loss on assistant tokens").
//!
//! How: the assistant span of turn k starts where the rendering of turns `..k` with the
//! generation prompt ends, and ends where the rendering of turns `..=k` ends. Each prefix is
//! encoded and matched against the full encoding; the span is the part of the full encoding
//! between the two common-prefix lengths, so a token merged across a boundary never shifts
//! the mask.

use eagle_engine::chat::Message;
use eagle_engine::tokenizer::Tokenizer;

use crate::error::Result;

/// A tokenized conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    /// 1 on assistant tokens.
    pub mask: Vec<u8>,
}

fn render(tok: &Tokenizer, messages: &[Message], generation_prompt: bool) -> Result<Vec<u32>> {
    let bos = tok.bos_id().and_then(|id| tok.id_to_token(id));
    let eos = tok.id_to_token(tok.eos_ids()[0]);
    let text = tok.chat_template().render(
        messages,
        bos.as_deref().unwrap_or(""),
        eos.as_deref().unwrap_or(""),
        generation_prompt,
    )?;
    let template_has_bos = matches!(&bos, Some(b) if !b.is_empty() && text.starts_with(b.as_str()));
    Ok(tok.encode(&text, tok.add_bos() && !template_has_bos)?)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Renders and tokenizes `messages`, keeping at most `max_len` tokens. Leading assistant turns
/// (a reply to nothing) are dropped. Returns `None` when no assistant token is left.
pub fn tokenize_conversation(
    tok: &Tokenizer,
    messages: &[Message],
    max_len: usize,
) -> Result<Option<Tokenized>> {
    let first = messages
        .iter()
        .position(|m| m.role != "assistant")
        .unwrap_or(messages.len());
    let messages = &messages[first..];
    if !messages.iter().any(|m| m.role == "assistant") {
        return Ok(None);
    }
    let full = render(tok, messages, false)?;
    let mut mask = vec![0u8; full.len()];
    let mut any = false;
    for (k, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = common_prefix(&render(tok, &messages[..k], true)?, &full);
        if start >= max_len {
            break;
        }
        let end = common_prefix(&render(tok, &messages[..=k], false)?, &full);
        for v in &mut mask[start..end.max(start)] {
            *v = 1;
        }
        any |= end.min(max_len) > start;
    }
    if !any {
        return Ok(None);
    }
    let mut ids = full;
    ids.truncate(max_len);
    mask.truncate(max_len);
    Ok(Some(Tokenized { ids, mask }))
}
