//! The on-disk training data: safetensors shards plus a `manifest.json`.
//!
//! A shard `shard-NNNNN.safetensors` holds a run of conversations, concatenated:
//! - `ids` u32 [N]: token ids;
//! - `loss_mask` u8 [N]: 1 on assistant tokens;
//! - `features` f16 or bf16 [N, H]: the target's features (last hidden state after the final
//!   norm) at each token;
//! - `offsets` i64 [C + 1]: conversation c is tokens `offsets[c]..offsets[c + 1]`;
//! - `held_out` u8 [C]: 1 for held-out conversations;
//!
//! and, in the safetensors metadata, `format` and `record_ids` (a JSON list of the
//! conversations' ids).
//!
//! Invariant: a shard named in the manifest is complete (written to a temporary name, then
//! renamed, and only then added to the manifest, itself replaced atomically); its `next_record`
//! is the input record index to continue from, which is what makes generation resumable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

pub const SHARD_FORMAT: &str = "eagle-train-shard-v1";
pub const MANIFEST_FORMAT: &str = "eagle-train-data-v1";
pub const MANIFEST: &str = "manifest.json";

/// One complete shard.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    pub file: String,
    pub conversations: usize,
    pub held_out: usize,
    pub tokens: usize,
    /// The input record to continue from after this shard.
    pub next_record: usize,
}

/// Records that were read but not stored.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Skipped {
    /// Complete records that are not conversations (wrong types, unknown roles).
    pub malformed: usize,
    /// Conversations without an assistant reply (within the length limit).
    pub no_assistant: usize,
    /// Conversations the chat template refused.
    pub template: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    /// The target, as named on the command line.
    pub model: String,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Feature dtype: `f16` or `bf16`.
    pub dtype: String,
    pub max_len: usize,
    pub held_out_frac: f64,
    /// Where the conversations came from.
    pub input: String,
    pub shards: Vec<ShardInfo>,
    pub conversations: usize,
    pub held_out_conversations: usize,
    pub tokens: usize,
    pub records_read: usize,
    pub skipped: Skipped,
    /// The first few skip reasons, for a person to read.
    pub skip_examples: Vec<String>,
    /// The input was read to its end.
    pub complete: bool,
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TrainError::io(&path, e)),
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| TrainError::data(&path, format!("not a data manifest: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(TrainError::data(
                &path,
                format!("format {:?}, expected {MANIFEST_FORMAT:?}", m.format),
            ));
        }
        Ok(Some(m))
    }

    /// Writes the manifest atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let tmp = dir.join(format!("{MANIFEST}.tmp"));
        let text = serde_json::to_string_pretty(self).expect("manifest serializes") + "\n";
        std::fs::write(&tmp, text).map_err(|e| TrainError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| TrainError::io(&path, e))
    }

    pub fn feature_dtype(&self) -> Result<DType> {
        parse_feature_dtype(&self.dtype)
    }
}

pub fn parse_feature_dtype(s: &str) -> Result<DType> {
    match s {
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        "f32" => Ok(DType::F32),
        o => Err(TrainError::Config(format!(
            "feature dtype {o:?}: use f16, bf16 or f32"
        ))),
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// Shard file name for index `i`.
pub fn shard_name(i: usize) -> String {
    format!("shard-{i:05}.safetensors")
}

/// Raw little-endian bytes under a safetensors dtype and shape.
struct Raw {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Accumulates conversations for one shard.
pub struct ShardWriter {
    dtype: DType,
    hidden: usize,
    ids: Vec<u8>,
    mask: Vec<u8>,
    features: Vec<u8>,
    offsets: Vec<i64>,
    held_out: Vec<u8>,
    record_ids: Vec<String>,
}

impl ShardWriter {
    pub fn new(dtype: DType, hidden: usize) -> Self {
        ShardWriter {
            dtype,
            hidden,
            ids: Vec::new(),
            mask: Vec::new(),
            features: Vec::new(),
            offsets: vec![0],
            held_out: Vec::new(),
            record_ids: Vec::new(),
        }
    }

    pub fn tokens(&self) -> usize {
        *self.offsets.last().unwrap() as usize
    }

    pub fn conversations(&self) -> usize {
        self.held_out.len()
    }

    pub fn held_out(&self) -> usize {
        self.held_out.iter().filter(|&&h| h == 1).count()
    }

    /// Adds a conversation: `features` [T, H] on any device, converted to the shard dtype.
    pub fn push(
        &mut self,
        id: &str,
        ids: &[u32],
        mask: &[u8],
        features: &Tensor,
        held_out: bool,
    ) -> Result<()> {
        let t = ids.len();
        if mask.len() != t || features.dims() != [t, self.hidden] {
            return Err(TrainError::Config(format!(
                "conversation {id}: {t} ids, {} mask entries, features {:?} (hidden {})",
                mask.len(),
                features.dims(),
                self.hidden
            )));
        }
        let f = features
            .to_dtype(self.dtype)?
            .to_device(&candle_core::Device::Cpu)?
            .contiguous()?;
        self.features
            .extend_from_slice(&safetensors::View::data(&f));
        for &i in ids {
            self.ids.extend_from_slice(&i.to_le_bytes());
        }
        self.mask.extend_from_slice(mask);
        self.offsets.push(self.tokens() as i64 + t as i64);
        self.held_out.push(held_out as u8);
        self.record_ids.push(id.to_string());
        Ok(())
    }

    /// Writes the shard to `path` (through a temporary file and a rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let n = self.tokens();
        let c = self.conversations();
        let st_dtype = match self.dtype {
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            _ => safetensors::Dtype::F32,
        };
        let offsets: Vec<u8> = self.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        let tensors = [
            Raw {
                dtype: safetensors::Dtype::U32,
                shape: vec![n],
                bytes: self.ids.clone(),
            },
            Raw {
                dtype: safetensors::Dtype::U8,
                shape: vec![n],
                bytes: self.mask.clone(),
            },
            Raw {
                dtype: st_dtype,
                shape: vec![n, self.hidden],
                bytes: self.features.clone(),
            },
            Raw {
                dtype: safetensors::Dtype::I64,
                shape: vec![c + 1],
                bytes: offsets,
            },
            Raw {
                dtype: safetensors::Dtype::U8,
                shape: vec![c],
                bytes: self.held_out.clone(),
            },
        ];
        let names = ["ids", "loss_mask", "features", "offsets", "held_out"];
        let meta = HashMap::from([
            ("format".to_string(), SHARD_FORMAT.to_string()),
            (
                "record_ids".to_string(),
                serde_json::to_string(&self.record_ids).expect("ids serialize"),
            ),
        ]);
        let tmp = path.with_extension("safetensors.tmp");
        safetensors::serialize_to_file(
            names.iter().map(|s| s.to_string()).zip(tensors.iter()),
            Some(meta),
            &tmp,
        )
        .map_err(|e| TrainError::data(&tmp, format!("cannot write shard: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
    }
}

/// Where one conversation lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvRef {
    pub shard: usize,
    /// Token offset in the shard.
    pub start: usize,
    pub len: usize,
    pub held_out: bool,
}

/// A data directory opened for training: every shard memory-mapped, conversations indexed.
pub struct Dataset {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub dtype: DType,
    shards: Vec<MmapedSafetensors>,
    pub convs: Vec<ConvRef>,
}

fn le_u32(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl Dataset {
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::load(dir)?.ok_or_else(|| {
            TrainError::data(
                dir,
                "no manifest.json: generate the data first (`eagle data --out DIR`)",
            )
        })?;
        let dtype = manifest.feature_dtype()?;
        let mut shards = Vec::new();
        let mut convs = Vec::new();
        for (si, info) in manifest.shards.iter().enumerate() {
            let path = dir.join(&info.file);
            // SAFETY: read-only map of a file this process does not modify.
            let st = unsafe { MmapedSafetensors::new(&path) }
                .map_err(|e| TrainError::data(&path, format!("cannot open shard: {e}")))?;
            let get = |name: &str| {
                st.get(name)
                    .map_err(|e| TrainError::data(&path, format!("tensor {name}: {e}")))
            };
            let offsets: Vec<i64> = get("offsets")?
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let held = get("held_out")?.data().to_vec();
            let feats = get("features")?;
            if offsets.len() != held.len() + 1
                || held.len() != info.conversations
                || feats.shape() != [info.tokens, manifest.hidden_size]
            {
                return Err(TrainError::data(
                    &path,
                    "shard does not match the manifest (conversations, tokens or hidden size)",
                ));
            }
            for (c, h) in held.iter().enumerate() {
                let (a, b) = (offsets[c] as usize, offsets[c + 1] as usize);
                convs.push(ConvRef {
                    shard: si,
                    start: a,
                    len: b - a,
                    held_out: *h == 1,
                });
            }
            shards.push(st);
        }
        Ok(Dataset {
            dir: dir.to_path_buf(),
            manifest,
            dtype,
            shards,
            convs,
        })
    }

    pub fn hidden(&self) -> usize {
        self.manifest.hidden_size
    }

    fn bytes(&self, shard: usize, name: &str) -> &[u8] {
        self.shards[shard]
            .get(name)
            .expect("checked when opened")
            .data()
    }

    /// Token ids and loss mask of a conversation.
    pub fn ids_mask(&self, c: &ConvRef) -> (Vec<u32>, Vec<u8>) {
        let ids = &self.bytes(c.shard, "ids")[c.start * 4..(c.start + c.len) * 4];
        let mask = &self.bytes(c.shard, "loss_mask")[c.start..c.start + c.len];
        (le_u32(ids), mask.to_vec())
    }

    /// The raw feature bytes [len, H] of a conversation, in the dataset dtype.
    pub fn feature_bytes(&self, c: &ConvRef) -> &[u8] {
        let row = self.hidden() * self.dtype.size_in_bytes();
        &self.bytes(c.shard, "features")[c.start * row..(c.start + c.len) * row]
    }

    /// Indices (into `convs`) of the training or the held-out conversations.
    pub fn split(&self, held_out: bool) -> Vec<usize> {
        (0..self.convs.len())
            .filter(|&i| self.convs[i].held_out == held_out)
            .collect()
    }
}
