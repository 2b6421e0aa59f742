//! Packed training batches.
//!
//! A batch concatenates several conversations into one sequence of m (token, feature) pairs;
//! pair i of a conversation is (embed(t_{i+1}), f_i) with target f_{i+1} at rotary position i,
//! exactly the pairs the drafter feeds the head at serving time. A block-diagonal causal mask
//! keeps conversations apart, so one packed forward equals separate forwards, without padding.
//!
//! For a training-time test (EAGLE-3) a batch also carries the later steps k = 1.. of every
//! row: at step k, row i reads token t_{i+1+k} at position i+k (and the head's own output of
//! step k-1 as its feature) and is scored against the target at t_{i+1+k}. EAGLE-3 data feeds
//! step 0 the three target layers' outputs [m, 3H] instead of f_i.
//!
//! Invariant: row r of a batch sees exactly the rows of its own conversation at or before it,
//! and the loss rows (of every step) are the pairs whose token t_{i+1+k} is an assistant token
//! inside the conversation.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::shards::Dataset;

/// One packed batch on the training device.
pub struct Batch {
    /// t_{i+1} of every pair.
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    /// [m, m] additive mask: 0 visible, -inf hidden.
    pub mask: Tensor,
    /// f_i [m, H] f32.
    pub inputs: Tensor,
    /// f_{i+1} [m, H] f32.
    pub next: Tensor,
    /// Rows with a loss, u32 [k].
    pub loss_rows: Tensor,
    pub n_loss: usize,
    /// Steps 1.. of a training-time test (empty without one).
    pub later: Vec<LaterStep>,
}

/// Step k >= 1 of a training-time test over a batch's rows.
pub struct LaterStep {
    /// t_{i+1+k} of every row (0 past its conversation's end).
    pub tokens: Vec<u32>,
    /// i + k.
    pub positions: Vec<usize>,
    /// f_{i+1+k} [m, H] f32 (a row's last feature past the end).
    pub next: Tensor,
    /// Rows with a loss at this step, u32.
    pub loss_rows: Tensor,
    pub n_loss: usize,
}

/// A later step's rows while a batch is built: tokens, positions, the rows of `next` and the
/// loss rows.
#[derive(Default)]
struct LaterRows {
    tokens: Vec<u32>,
    positions: Vec<usize>,
    next: Vec<u32>,
    loss: Vec<u32>,
}

/// What a batch holds besides the pairs: see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    /// Step 0 reads the stored layer features (EAGLE-3 data) instead of f_i.
    pub layer_inputs: bool,
    /// Steps of the training-time test, 1 for none.
    pub steps: usize,
}

impl Default for BatchShape {
    fn default() -> Self {
        BatchShape {
            layer_inputs: false,
            steps: 1,
        }
    }
}

impl Batch {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Tokens of a conversation a batch of `batch_tokens` pairs can take.
fn take(len: usize, batch_tokens: usize) -> usize {
    len.min(batch_tokens + 1)
}

/// Groups conversations (in the given order) into batches of at most `batch_tokens` pairs; a
/// conversation longer than that is cut to fit a batch of its own.
pub fn pack(data: &Dataset, order: &[usize], batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut used = 0;
    for &i in order {
        let pairs = take(data.convs[i].len, batch_tokens).saturating_sub(1);
        if pairs == 0 {
            continue;
        }
        if used + pairs > batch_tokens && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
            used = 0;
        }
        cur.push(i);
        used += pairs;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The block-diagonal causal mask of conversations with `pairs` rows each.
pub fn block_causal_mask(pairs: &[usize], device: &Device) -> Result<Tensor> {
    let m: usize = pairs.iter().sum();
    let mut mask = vec![f32::NEG_INFINITY; m * m];
    let mut s = 0;
    for &p in pairs {
        for r in 0..p {
            let row = (s + r) * m;
            mask[row + s..=row + s + r].fill(0.0);
        }
        s += p;
    }
    Ok(Tensor::from_vec(mask, (m, m), device)?)
}

/// Loads the conversations `convs` into one batch on `device`.
pub fn build(
    data: &Dataset,
    convs: &[usize],
    batch_tokens: usize,
    device: &Device,
) -> Result<Batch> {
    build_with(data, convs, batch_tokens, BatchShape::default(), device)
}

/// [`build`] for a batch of `shape`.
pub fn build_with(
    data: &Dataset,
    convs: &[usize],
    batch_tokens: usize,
    shape: BatchShape,
    device: &Device,
) -> Result<Batch> {
    let h = data.hidden();
    let row_bytes = h * data.dtype.size_in_bytes();
    let layer_row = data.layer_width() * data.dtype.size_in_bytes();
    let mut layer_bytes: Vec<u8> = Vec::new();
    let later_steps = shape.steps.max(1) - 1;
    let mut later: Vec<LaterRows> = (0..later_steps).map(|_| LaterRows::default()).collect();
    let mut bytes: Vec<u8> = Vec::new();
    let mut tokens = Vec::new();
    let mut positions = Vec::new();
    let mut in_rows: Vec<u32> = Vec::new();
    let mut loss: Vec<u32> = Vec::new();
    let mut pairs = Vec::new();
    let mut row0 = 0usize;
    for &i in convs {
        let c = &data.convs[i];
        let l = take(c.len, batch_tokens);
        let (ids, mask) = data.ids_mask(c);
        bytes.extend_from_slice(&data.feature_bytes(c)[..l * row_bytes]);
        if shape.layer_inputs {
            layer_bytes.extend_from_slice(&data.layer_feature_bytes(c)[..l * layer_row]);
        }
        for j in 0..l - 1 {
            for (k, step) in (1..).zip(later.iter_mut()) {
                let at = j + 1 + k;
                if at < l && mask[at] == 1 {
                    step.loss.push(tokens.len() as u32);
                }
                step.tokens.push(if at < l { ids[at] } else { 0 });
                step.positions.push(j + k);
                step.next.push((row0 + at.min(l - 1)) as u32);
            }
            if mask[j + 1] == 1 {
                loss.push(tokens.len() as u32);
            }
            tokens.push(ids[j + 1]);
            positions.push(j);
            in_rows.push((row0 + j) as u32);
        }
        pairs.push(l - 1);
        row0 += l;
    }
    let feats = Tensor::from_raw_buffer(&bytes, data.dtype, &[row0, h], &Device::Cpu)?
        .to_device(device)?
        .to_dtype(DType::F32)?;
    let next_rows: Vec<u32> = in_rows.iter().map(|r| r + 1).collect();
    let idx = |v: &[u32]| Tensor::new(v, device);
    let n_loss = loss.len();
    let inputs = if shape.layer_inputs {
        Tensor::from_raw_buffer(
            &layer_bytes,
            data.dtype,
            &[row0, data.layer_width()],
            &Device::Cpu,
        )?
        .to_device(device)?
        .to_dtype(DType::F32)?
    } else {
        feats.clone()
    };
    let later = later
        .into_iter()
        .map(|r| {
            Ok(LaterStep {
                next: feats.index_select(&idx(&r.next)?, 0)?,
                n_loss: r.loss.len(),
                loss_rows: idx(&r.loss)?,
                tokens: r.tokens,
                positions: r.positions,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Batch {
        later,
        inputs: inputs.index_select(&idx(&in_rows)?, 0)?,
        next: feats.index_select(&idx(&next_rows)?, 0)?,
        mask: block_causal_mask(&pairs, device)?,
        loss_rows: idx(&loss)?,
        n_loss,
        tokens,
        positions,
    })
}
