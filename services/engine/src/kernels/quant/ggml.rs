//! Reading GGUF's block formats into [`Rows`] (the values, scales and offsets of every block),
//! and quantizing float weights to `Q8_0` (`--dtype q8_0`).
//!
//! Each reader follows llama.cpp's `dequantize_row_*` (`ggml-quants.c`) for the meaning of the
//! bits, and keeps every number exact: the integer values as they are, the scales as the f32
//! products llama.cpp itself forms (an f16 times a small integer, exact in f32).

use half::f16;

use super::{Family, Rows, ScaleKind, BLOCK};

/// The GGUF types this engine keeps quantized, by their ggml names.
pub const SUPPORTED: [&str; 6] = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K"];

/// Elements per ggml block and bytes per block of the supported types.
pub fn block_shape(ty: &str) -> Option<(usize, usize)> {
    Some(match ty {
        "Q4_0" => (32, 18),
        "Q4_1" => (32, 20),
        "Q5_0" => (32, 22),
        "Q8_0" => (32, 34),
        "Q4_K" => (256, 144),
        "Q6_K" => (256, 210),
        _ => return None,
    })
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decodes `data` holding `n` rows of `k` elements of type `ty`. `None` for other types.
pub fn decode(ty: &'static str, data: &[u8], n: usize, k: usize) -> Option<Rows> {
    let (per, bytes) = block_shape(ty)?;
    if !k.is_multiple_of(per) || data.len() != n * k / per * bytes {
        return None;
    }
    let nb = n * k / BLOCK;
    let (family, scale) = match ty {
        "Q4_0" | "Q4_1" => (Family::Q4, ScaleKind::F16),
        "Q4_K" => (Family::Q4, ScaleKind::K4),
        "Q5_0" | "Q8_0" => (Family::Q8 { sub: 1 }, ScaleKind::F16),
        _ => (Family::Q8 { sub: 2 }, ScaleKind::F32),
    };
    let mut r = Rows {
        family,
        scale,
        source: ty,
        n,
        k,
        q: Vec::with_capacity(n * k),
        d: Vec::with_capacity(nb * 2),
        m: Vec::with_capacity(if family == Family::Q4 { nb } else { 0 }),
        sup: Vec::new(),
    };
    for b in data.chunks_exact(bytes) {
        match ty {
            "Q4_0" | "Q4_1" => {
                let (d, m, qs) = if ty == "Q4_0" {
                    (h(b, 0), -8.0 * h(b, 0), &b[2..18])
                } else {
                    (h(b, 0), h(b, 2), &b[4..20])
                };
                r.d.push(d);
                r.m.push(m);
                r.q.extend(qs.iter().map(|v| v & 15));
                r.q.extend(qs.iter().map(|v| v >> 4));
            }
            "Q5_0" => {
                r.d.push(h(b, 0));
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = &b[6..22];
                let hi = |j: usize| (((qh >> j) & 1) << 4) as u8;
                r.q.extend((0..16).map(|j| ((qs[j] & 15) | hi(j)).wrapping_sub(16)));
                r.q.extend((0..16).map(|j| ((qs[j] >> 4) | hi(j + 16)).wrapping_sub(16)));
            }
            "Q8_0" => {
                r.d.push(h(b, 0));
                r.q.extend_from_slice(&b[2..34]);
            }
            "Q4_K" => {
                let (d, dmin) = (h(b, 0), h(b, 2));
                r.sup.extend([d, dmin]);
                let sc = &b[4..16];
                let qs = &b[16..144];
                for j in 0..8 {
                    let (s, m) = scale_min_k4(j, sc);
                    r.d.push(d * s as f32);
                    r.m.push(-(dmin * m as f32));
                    let quarter = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
                    if j % 2 == 0 {
                        r.q.extend(quarter.iter().map(|v| v & 15));
                    } else {
                        r.q.extend(quarter.iter().map(|v| v >> 4));
                    }
                }
            }
            _ => {
                // Q6_K: ql[128], qh[64], scales[16] (i8), d (f16).
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = h(b, 208);
                let mut vals = [0u8; 256];
                for half in 0..2 {
                    let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
                    for l in 0..32 {
                        let v = |lo: u8, shift: u32| {
                            (lo | (((qh[l] >> shift) & 3) << 4)).wrapping_sub(32)
                        };
                        vals[half * 128 + l] = v(ql[l] & 15, 0);
                        vals[half * 128 + l + 32] = v(ql[l + 32] & 15, 2);
                        vals[half * 128 + l + 64] = v(ql[l] >> 4, 4);
                        vals[half * 128 + l + 96] = v(ql[l + 32] >> 4, 6);
                    }
                }
                r.q.extend_from_slice(&vals);
                r.d.extend(sc.iter().map(|&s| d * (s as i8) as f32));
            }
        }
    }
    Some(r)
}

/// llama.cpp's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` of a Q4_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Quantizes `w` [n, k] (k a multiple of 32) to Q8_0: per block, d = amax / 127 stored as f16,
/// values rounded with that d (llama.cpp's `quantize_row_q8_0_ref`).
pub fn quantize_q8_0(w: &[f32], n: usize, k: usize) -> Option<Rows> {
    if !k.is_multiple_of(BLOCK) || w.len() != n * k {
        return None;
    }
    let mut r = Rows {
        family: Family::Q8 { sub: 1 },
        scale: ScaleKind::F16,
        source: "Q8_0",
        n,
        k,
        q: Vec::with_capacity(n * k),
        d: Vec::with_capacity(n * k / BLOCK),
        m: Vec::new(),
        sup: Vec::new(),
    };
    for x in w.chunks_exact(BLOCK) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        r.q.extend(x.iter().map(|v| ((v * id).round() as i8) as u8));
        r.d.push(f16::from_f32(d).to_f32());
    }
    Some(r)
}

/// The supported types with candle's names for them (tests quantize with candle's ggml port).
#[cfg(test)]
pub(crate) const CANDLE_TYPES: [(&str, candle_core::quantized::GgmlDType); 6] = {
    use candle_core::quantized::GgmlDType;
    [
        ("Q4_0", GgmlDType::Q4_0),
        ("Q4_1", GgmlDType::Q4_1),
        ("Q5_0", GgmlDType::Q5_0),
        ("Q8_0", GgmlDType::Q8_0),
        ("Q4_K", GgmlDType::Q4K),
        ("Q6_K", GgmlDType::Q6K),
    ]
};

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Our reading of each block type dequantizes to what candle's ggml port gives.
    #[test]
    fn decoding_matches_candle_dequantization() {
        let (n, k) = (16, 512);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i as u32).wrapping_mul(2654435761) % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        for (ty, g) in CANDLE_TYPES {
            let q = QTensor::quantize(&t, g).unwrap();
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let bytes = q.data().unwrap();
            let rows = decode(ty, &bytes, n, k).expect(ty).pack();
            let mut got = vec![0f32; k];
            for r in 0..n {
                rows.dequantize_row(r, &mut got);
                for (j, (a, b)) in got.iter().zip(&want[r * k..(r + 1) * k]).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{ty} row {r} col {j}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
