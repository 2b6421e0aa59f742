//! A reduced draft vocabulary, as EAGLE-3 heads have: the head's own LM head over N target
//! tokens, with `d2t` mapping draft index i to target id `i + d2t[i]` (published as offsets).
//!
//! Invariant: the N target ids are distinct and inside the target vocabulary.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::error::{EngineError, Result};
use crate::layers::Linear;

/// A reduced draft vocabulary (EAGLE-3): the head's own LM head over N target tokens.
#[derive(Clone, Debug)]
pub struct DraftVocab {
    /// [N, hidden]: row i scores target token `d2t[i]`.
    pub lm_head: Linear,
    /// Draft index -> target id, distinct ids.
    pub d2t: Vec<u32>,
}

impl DraftVocab {
    /// Checks the map against the target vocabulary and the LM head's rows.
    pub fn new(lm_head: Linear, d2t: Vec<u32>, vocab: usize) -> Result<Self> {
        if lm_head.out_dim != d2t.len() || d2t.is_empty() {
            return Err(EngineError::Config(format!(
                "draft vocabulary: lm_head has {} rows but d2t maps {} tokens",
                lm_head.out_dim,
                d2t.len()
            )));
        }
        let mut seen = vec![false; vocab];
        for &t in &d2t {
            let slot = seen.get_mut(t as usize).ok_or_else(|| {
                EngineError::Config(format!(
                    "draft vocabulary maps to token {t}, outside the target vocabulary of {vocab}"
                ))
            })?;
            if *slot {
                return Err(EngineError::Config(format!(
                    "draft vocabulary maps to token {t} twice"
                )));
            }
            *slot = true;
        }
        Ok(DraftVocab { lm_head, d2t })
    }

    /// Adds `lm_head.weight` and `d2t` (EAGLE-3 offsets: draft index i is target id
    /// `i + d2t[i]`) to a published-name tensor map.
    pub fn insert_tensors(&self, map: &mut HashMap<String, Tensor>, device: &Device) -> Result<()> {
        map.insert(
            "lm_head.weight".into(),
            self.lm_head.weight.dense()?.clone(),
        );
        let offsets: Vec<i64> = self
            .d2t
            .iter()
            .enumerate()
            .map(|(i, &t)| t as i64 - i as i64)
            .collect();
        map.insert("d2t".into(), Tensor::new(offsets.as_slice(), device)?);
        Ok(())
    }
}
