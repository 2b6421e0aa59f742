//! What makes a head EAGLE-3 (Li et al., 2025, "EAGLE-3: Scaling up Inference Acceleration of
//! Large Language Models via Training-Time Test"; reference: SafeAILab/EAGLE, `cnets.py`).
//!
//! - The target gives three of its layers' outputs, low, middle and high, side by side
//!   ([m, 3H], before the final norm); `fc` [H, 3H] (no bias) fuses them into one feature.
//!   Deeper draft steps feed the head's own output back, H wide, without `fc`.
//! - The decoder layer (`midlayer`) keeps the feature as its residual stream; its attention reads
//!   `[input_layernorm(embedding), hidden_norm(feature)]`, 2H wide.
//! - Logits are `lm_head(norm(output))` with the head's own norm and LM head (usually over a
//!   reduced draft vocabulary, `d2t` / `t2d`).
//!
//! Invariant: the layers are the reference's: the inputs of target layers 2, L/2 and L-3, that
//! is the outputs of layers 1, L/2-1 and L-4 (0-based), unless the head's `config.json` names
//! others in `eagle_config.eagle_aux_hidden_state_layer_ids` (SpecForge's and SGLang's key, read
//! as they read it: output indices, 0-based; vLLM's speculators format counts inputs instead,
//! id j being the output of layer j-1, and names its architecture `Eagle3Speculator`, which
//! this loader does not read).

use crate::error::{EngineError, Result};
use crate::layers::RmsNorm;

/// The config.json `architectures` entry of an EAGLE-3 head (as published).
pub const ARCHITECTURE: &str = "LlamaForCausalLMEagle3";

/// Which EAGLE generation a head is, from its config.json.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadKind {
    /// EAGLE-1 / EAGLE-2: `fc(concat(embedding, feature))`, the target's last features.
    Eagle,
    /// EAGLE-3 over the outputs of these target layers (0-based, low to high).
    Eagle3 { layers: [usize; 3] },
}

impl HeadKind {
    /// The reference's layers for a target of `num_layers` layers.
    pub fn eagle3_for(num_layers: usize) -> HeadKind {
        HeadKind::Eagle3 {
            layers: [
                1.min(num_layers.saturating_sub(1)),
                (num_layers / 2).saturating_sub(1),
                num_layers.saturating_sub(4),
            ],
        }
    }

    /// The kind a head's config.json declares, checked against a target of `num_layers`.
    pub fn from_config(config: &serde_json::Value, num_layers: usize) -> Result<HeadKind> {
        Self::parse_features(&draft_features(config), num_layers)
    }

    /// The kind that reads the target features `spec` names: `last` (EAGLE-1/2), `eagle3`
    /// (the reference's three layers for a target of `num_layers`), or three layer indices
    /// `a,b,c` (EAGLE-3 over those). The worker's `--draft-features` takes the same words.
    pub fn parse_features(spec: &str, num_layers: usize) -> Result<HeadKind> {
        let kind = match spec.trim() {
            "last" | "" => HeadKind::Eagle,
            "eagle3" => HeadKind::eagle3_for(num_layers),
            list => {
                let ids = list
                    .split(',')
                    .map(|x| x.trim().parse::<usize>())
                    .collect::<std::result::Result<Vec<usize>, _>>()
                    .map_err(|e| {
                        EngineError::Config(format!(
                            "draft features {list:?}: `last`, `eagle3` or three layer indices \
                             a,b,c ({e})"
                        ))
                    })?;
                let layers: [usize; 3] = ids.try_into().map_err(|ids: Vec<usize>| {
                    EngineError::Config(format!(
                        "draft features {list:?} name {} layers; an EAGLE-3 head fuses 3",
                        ids.len()
                    ))
                })?;
                HeadKind::Eagle3 { layers }
            }
        };
        kind.check(num_layers)?;
        Ok(kind)
    }

    /// The target layers must exist and rise, low to high.
    pub fn check(&self, num_layers: usize) -> Result<()> {
        if let HeadKind::Eagle3 { layers } = self {
            if let Some(&bad) = layers.iter().find(|&&l| l >= num_layers) {
                return Err(EngineError::Config(format!(
                    "the EAGLE-3 head reads target layer {bad}, but the target has {num_layers}"
                )));
            }
            if layers.windows(2).any(|w| w[0] >= w[1]) {
                return Err(EngineError::Config(format!(
                    "an EAGLE-3 head reads three distinct target layers, low to high, not \
                     {layers:?} (a target of {num_layers} layers is too shallow for the default \
                     choice: name them in eagle_config.eagle_aux_hidden_state_layer_ids)"
                )));
            }
        }
        Ok(())
    }

    /// The target layers whose outputs are the draft features; empty for the last features.
    pub fn target_layers(&self) -> &[usize] {
        match self {
            HeadKind::Eagle => &[],
            HeadKind::Eagle3 { layers } => layers,
        }
    }

    /// Values of target features per token for a target of hidden size `hidden`.
    pub fn feature_width(&self, hidden: usize) -> usize {
        match self {
            HeadKind::Eagle => hidden,
            HeadKind::Eagle3 { .. } => 3 * hidden,
        }
    }
}

/// The target features a head's config.json asks for, in the words of
/// [`HeadKind::parse_features`]: what a process that serves the target but holds no head (the
/// worker) is told to send.
pub fn draft_features(config: &serde_json::Value) -> String {
    let eagle3 = config
        .get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| {
            a.iter()
                .any(|n| n.as_str().is_some_and(|n| n.ends_with("Eagle3")))
        });
    if !eagle3 {
        return "last".into();
    }
    let ids = config
        .get("eagle_config")
        .and_then(|c| c.get("eagle_aux_hidden_state_layer_ids"))
        .and_then(|v| v.as_array());
    match ids {
        None => "eagle3".into(),
        Some(ids) => ids
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// The norms only an EAGLE-3 head has.
#[derive(Clone, Debug)]
pub struct Eagle3Norms {
    /// `midlayer.input_layernorm`: on the token embedding.
    pub embed: RmsNorm,
    /// `midlayer.hidden_norm`: on the feature.
    pub hidden: RmsNorm,
    /// `norm`: on the output, before the LM head.
    pub output: RmsNorm,
}
