//! Quantized weights that stay quantized, and integer dot products over them.
//!
//! Invariant: a row's output is bit-identical whatever the other rows of the call are, however
//! many there are, and whichever ISA path runs (AMX tiles, AVX-512 VNNI, AVX2, portable).
//! Three facts give it:
//! - activations are quantized per row (`activation.rs`), by the same scalar code everywhere;
//! - a block's dot product is an integer sum, exact in any order;
//! - each output value combines its blocks with one fixed sequence of f32 operations (given by
//!   the portable path of its family), and the SIMD paths run that same sequence in each lane,
//!   one lane per output row of the weight, never across lanes.
//!
//! Source: llama.cpp's ggml block formats and its int8-activation dot products
//! (`ggml-quants.c`, `vec_dot_q4_1_q8_1`), and its repacked `block_q4_0x8` layout
//! (`ggml-cpu/repack.cpp`) that lets one load serve 8 output rows. Unlike llama.cpp, a loaded
//! weight block serves every row of the batch from registers (register blocking over rows), so
//! a draft tree of 16 tokens streams the weights once, like a single token.
//!
//! Layout of this folder: one file per block family (its layout, its portable definition and
//! its ISA variants side by side), `ggml.rs` for reading GGUF's blocks, `activation.rs` for
//! the int8 activations, `amx.rs` for the AMX tile plumbing (permission, configuration, tile
//! instructions) the families' tile kernels use. `QMatrix` below is what a layer holds.

pub mod activation;
pub mod amx;
pub mod ggml;
pub mod q4;
pub mod q8;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use activation::{ActRow, QActs};

/// Inputs per block.
pub const BLOCK: usize = 32;
/// Output rows interleaved in a packed group.
pub const LANES: usize = 8;
/// Activation rows the AVX2 and portable paths compute per pass over a weight group (register
/// blocking: AVX2 has 16 vector registers; the 512-bit paths take 8 rows, see their kernels).
const ROWS_PER_PASS: usize = 4;

/// Calls `$pass!(R)` with `R` the constant equal to `$n`, one of the listed row counts (any
/// other value is 1): the kernels keep a pass's rows in registers, so R is a const generic.
macro_rules! by_rows {
    ($n:expr, $pass:ident, [$($r:literal),*]) => {
        match $n {
            $($r => $pass!($r),)*
            _ => $pass!(1),
        }
    };
}
/// Fewest rows the AMX path computes on tiles (see `matmul_with`), by family: measured with
/// `examples/quant_bench` on a Sapphire Rapids-class Xeon, the 512-bit VNNI kernels are as fast
/// or faster below these (docs/cpu-kernels.md). For the 8-bit family this rose from 4 to 8
/// when its VNNI kernel began reading x as memory broadcasts: at 4 rows it then took 0.022 ms
/// for the head's [576, 1152] against 0.025-0.029 on tiles.
fn amx_min_rows(family: Family) -> usize {
    match family {
        Family::Q4 => 16,
        Family::Q8 { .. } => 8,
    }
}
/// Parallel tasks per thread: few and large, so each thread streams long contiguous runs of
/// weights (what the hardware prefetchers follow), yet enough to even out the threads.
const TASKS_PER_THREAD: usize = 3;
/// Rows per pass of the 512-bit VNNI kernels: 8 measured a little faster than 4 (fewer passes
/// over the weights for the register pressure).
const VNNI_ROWS: usize = 8;

/// How a packed block stores its scales: f16 when every scale is exactly an f16 (Q4_0, Q4_1,
/// Q8_0, Q5_0), f32 when they are products that only f32 holds exactly (Q6_K), or Q4_K's own
/// compact form (`K4`: f16 super-block scales times 6-bit integers; see `q4.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleKind {
    F16,
    F32,
    K4,
}

impl ScaleKind {
    pub fn bytes(self) -> usize {
        match self {
            ScaleKind::F16 => 2,
            ScaleKind::F32 => 4,
            ScaleKind::K4 => {
                unreachable!("K4 scales are read and written by q4.rs, per super-block")
            }
        }
    }

    fn push(self, v: f32, out: &mut Vec<u8>) {
        match self {
            ScaleKind::F16 => {
                let h = half::f16::from_f32(v);
                debug_assert!(h.to_f32() == v || v.is_nan(), "scale {v} is not an f16");
                out.extend_from_slice(&h.to_le_bytes())
            }
            ScaleKind::F32 => out.extend_from_slice(&v.to_le_bytes()),
            ScaleKind::K4 => {
                unreachable!("K4 scales are read and written by q4.rs, per super-block")
            }
        }
    }

    /// Scale `c` of the run of 8 starting at `at`.
    #[inline(always)]
    fn read(self, at: &[u8], c: usize) -> f32 {
        match self {
            ScaleKind::F16 => half::f16::from_le_bytes([at[2 * c], at[2 * c + 1]]).to_f32(),
            ScaleKind::F32 => f32::from_le_bytes(at[4 * c..4 * c + 4].try_into().unwrap()),
            ScaleKind::K4 => {
                unreachable!("K4 scales are read and written by q4.rs, per super-block")
            }
        }
    }
}

/// The integer families; see `q4.rs` and `q8.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `d * q + m`, q in 0..=15.
    Q4,
    /// `d * q`, q signed, `sub` scales per block.
    Q8 { sub: usize },
}

/// Which code computes the dot products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Intel AMX-INT8 tiles for the integer sums (Sapphire Rapids and later; `amx.rs`), with
    /// the f32 finish on AVX2 registers.
    Amx,
    Avx512Vnni,
    Avx2,
    Portable,
}

impl Isa {
    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Amx => amx::available(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx2.available()
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512f")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Amx => "amx",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    pub const ALL: [Isa; 4] = [Isa::Amx, Isa::Avx512Vnni, Isa::Avx2, Isa::Portable];
}

/// A path forced by [`force_isa`] (0: none; else 1 + the index in `Isa::ALL`).
static FORCED: AtomicU8 = AtomicU8::new(0);

/// Forces every later quantized product onto `isa` (`None` restores the automatic choice):
/// tests run the whole model on each path. Panics if this CPU lacks it.
pub fn force_isa(isa: Option<Isa>) {
    let v = match isa {
        None => 0,
        Some(i) => {
            assert!(i.available(), "this CPU cannot run the {} path", i.name());
            1 + Isa::ALL.iter().position(|&a| a == i).unwrap() as u8
        }
    };
    FORCED.store(v, Ordering::SeqCst);
}

/// The best path this CPU has, chosen once. `EAGLE_KERNEL_ISA=portable|avx2|avx512vnni|amx`
/// narrows it (`EAGLE_PORTABLE_KERNELS` forces the portable path, as for the float kernels).
pub fn isa() -> Isa {
    match FORCED.load(Ordering::Relaxed) {
        0 => {}
        v => return Isa::ALL[v as usize - 1],
    }
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var_os("EAGLE_PORTABLE_KERNELS").is_some() {
            return Isa::Portable;
        }
        let wanted = std::env::var("EAGLE_KERNEL_ISA").ok();
        Isa::ALL
            .into_iter()
            .filter(|i| wanted.as_deref().is_none_or(|w| w == i.name()))
            .find(|i| i.available())
            .unwrap_or(Isa::Portable)
    })
}

/// One packed weight matrix of one format: `n` output rows of `k` inputs, padded to whole
/// groups of 8 rows.
#[derive(Clone)]
pub struct Packed {
    pub family: Family,
    pub scale: ScaleKind,
    /// The GGUF type the numbers come from (`Q4_1`, `Q8_0`, ...), for logs and errors.
    pub source: &'static str,
    pub n: usize,
    pub k: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed({} [{}, {}])", self.source, self.n, self.k)
    }
}

/// Rows of quantized values before packing: the common form every GGUF type is read into.
#[derive(Clone, Debug)]
pub struct Rows {
    pub family: Family,
    pub scale: ScaleKind,
    pub source: &'static str,
    pub n: usize,
    pub k: usize,
    /// [n * k] values: 0..=15 for Q4, signed bytes for Q8.
    pub q: Vec<u8>,
    /// [n * k / 32 * sub] scales.
    pub d: Vec<f32>,
    /// [n * k / 32] offsets (Q4 only).
    pub m: Vec<f32>,
    /// [n * k / 256 * 2] super-block scales (d, dmin) behind `d` and `m` (K4 only).
    pub sup: Vec<f32>,
}

impl Rows {
    fn sub(&self) -> usize {
        match self.family {
            Family::Q4 => 1,
            Family::Q8 { sub } => sub,
        }
    }

    /// Rows in the order `perm` gives (row i of the result is row `perm[i]`).
    pub fn permute(&self, perm: &[usize]) -> Rows {
        let (k, nb, sub) = (self.k, self.k / BLOCK, self.sub());
        let pick = |v: &[u8], w: usize| -> Vec<u8> {
            perm.iter()
                .flat_map(|&r| v[r * w..(r + 1) * w].iter().copied())
                .collect()
        };
        let pickf = |v: &[f32], w: usize| -> Vec<f32> {
            if v.is_empty() {
                return Vec::new();
            }
            perm.iter()
                .flat_map(|&r| v[r * w..(r + 1) * w].iter().copied())
                .collect()
        };
        Rows {
            n: perm.len(),
            q: pick(&self.q, k),
            d: pickf(&self.d, nb * sub),
            m: pickf(&self.m, nb),
            sup: pickf(&self.sup, k / 256 * 2),
            ..self.clone()
        }
    }

    /// Packs into groups of 8 interleaved rows (the last group padded with zero rows).
    pub fn pack(&self) -> Packed {
        let (k, nb, sub) = (self.k, self.k / BLOCK, self.sub());
        let groups = self.n.div_ceil(LANES);
        let zq = vec![0u8; k];
        let zd = vec![0f32; nb * sub];
        let mut data = Vec::with_capacity(groups * nb * self.block_bytes());
        for g in 0..groups {
            let row = |c: usize| g * LANES + c;
            let q: [&[u8]; LANES] = std::array::from_fn(|c| {
                if row(c) < self.n {
                    &self.q[row(c) * k..(row(c) + 1) * k]
                } else {
                    &zq
                }
            });
            let d: [&[f32]; LANES] = std::array::from_fn(|c| {
                let w = nb * sub;
                if row(c) < self.n {
                    &self.d[row(c) * w..(row(c) + 1) * w]
                } else {
                    &zd
                }
            });
            match self.family {
                Family::Q4 => {
                    let m: [&[f32]; LANES] = std::array::from_fn(|c| {
                        if row(c) < self.n {
                            &self.m[row(c) * nb..(row(c) + 1) * nb]
                        } else {
                            &zd[..nb]
                        }
                    });
                    let ns = if self.scale == ScaleKind::K4 {
                        k / 256 * 2
                    } else {
                        0
                    };
                    let zs = vec![0f32; ns];
                    let sup: [&[f32]; LANES] = std::array::from_fn(|c| {
                        if row(c) < self.n && ns > 0 {
                            &self.sup[row(c) * ns..(row(c) + 1) * ns]
                        } else {
                            &zs[..]
                        }
                    });
                    q4::pack_group(q, d, m, sup, self.scale, &mut data);
                }
                Family::Q8 { sub } => {
                    let q: [&[i8]; LANES] = std::array::from_fn(|c| bytes_as_i8(q[c]));
                    q8::pack_group(q, d, sub, self.scale, &mut data);
                }
            }
        }
        Packed {
            family: self.family,
            scale: self.scale,
            source: self.source,
            n: self.n,
            k,
            data,
        }
    }

    fn block_bytes(&self) -> usize {
        match self.family {
            Family::Q4 => q4::block_bytes(self.scale),
            Family::Q8 { sub } => q8::block_bytes(self.scale, sub),
        }
    }
}

fn bytes_as_i8(v: &[u8]) -> &[i8] {
    // SAFETY: u8 and i8 have the same size and alignment.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const i8, v.len()) }
}

impl Packed {
    fn block_bytes(&self) -> usize {
        match self.family {
            Family::Q4 => q4::block_bytes(self.scale),
            Family::Q8 { sub } => q8::block_bytes(self.scale, sub),
        }
    }

    fn groups(&self) -> usize {
        self.n.div_ceil(LANES)
    }

    /// Group `g`'s packed blocks.
    fn group_blocks(&self, g: usize) -> &[u8] {
        let span = self.k / BLOCK * self.block_bytes();
        &self.data[g * span..(g + 1) * span]
    }

    /// The groups behind an output chunk of `n` lanes from group `g` on, for the pair kernels:
    /// `g` and the next, or `g` twice when the chunk holds only its 8 lanes (the matrix's last).
    fn pair(&self, g: usize, n: usize) -> [&[u8]; 2] {
        let next = if n > LANES { g + 1 } else { g };
        [self.group_blocks(g), self.group_blocks(next)]
    }

    /// Bytes held (what one pass over the matrix streams).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Output row `r` as f32 (embedding look-ups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (nb, bb) = (self.k / BLOCK, self.block_bytes());
        let (g, c) = (r / LANES, r % LANES);
        let group = self.group_blocks(g);
        for b in 0..nb {
            let o = &mut out[b * BLOCK..(b + 1) * BLOCK];
            match self.family {
                Family::Q4 => q4::dequantize_lane(group, b, c, self.scale, o),
                Family::Q8 { sub } => {
                    q8::dequantize_lane(&group[b * bb..(b + 1) * bb], c, sub, self.scale, o)
                }
            }
        }
    }

    /// `R` activation rows against group `g`.
    fn group<const R: usize>(
        &self,
        isa: Isa,
        g: usize,
        xs: &[ActRow; R],
        out: &mut [[f32; LANES]; R],
    ) {
        let nb = self.k / BLOCK;
        let blocks = self.group_blocks(g);
        match (self.family, isa) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is only ever a path this CPU has (checked by `matmul_with`).
            (Family::Q4, Isa::Avx2) => unsafe {
                q4::x86::group_avx2(blocks, nb, self.scale, xs, out)
            },
            (_, Isa::Amx | Isa::Avx512Vnni) => {
                unreachable!("the AMX and 512-bit paths run pairs of groups (groups_all_rows)")
            }
            (Family::Q4, _) => q4::group_portable(blocks, nb, self.scale, xs, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            (Family::Q8 { sub }, Isa::Avx2) => unsafe {
                q8::x86::group_avx2(blocks, nb, sub, self.scale, xs, out)
            },
            (Family::Q8 { sub }, _) => q8::group_portable(blocks, nb, sub, self.scale, xs, out),
        }
    }

    /// Groups `g0..` (as many as `cols` spans) for all rows of `acts`, written into `cols`.
    fn groups_all_rows(&self, isa: Isa, g0: usize, acts: &QActs, cols: Cols) {
        if isa == Isa::Amx {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is only ever a path this CPU has (checked by `matmul_with`).
            unsafe {
                return self.groups_amx(g0, acts, cols);
            }
        }
        if isa == Isa::Avx512Vnni {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            unsafe {
                return self.group_pairs_vnni(g0, acts, cols);
            }
        }
        for j in 0..cols.groups() {
            self.group_all_rows(isa, g0 + j, acts, cols.sub(j * LANES, LANES));
        }
    }

    /// The AVX-512 VNNI path: two groups per 512-bit register, up to 8 rows per pass over
    /// their blocks (a lone last group is computed twice).
    ///
    /// # Safety
    /// The CPU must have the `avx512vnni` path.
    #[cfg(target_arch = "x86_64")]
    unsafe fn group_pairs_vnni(&self, g0: usize, acts: &QActs, cols: Cols) {
        let (m, nb) = (acts.m, self.k / BLOCK);
        for j in 0..cols.groups().div_ceil(2) {
            let og = cols.sub(j * 2 * LANES, 2 * LANES);
            let pair = self.pair(g0 + 2 * j, og.lanes);
            let mut i = 0;
            macro_rules! rows {
                ($r:literal) => {{
                    let xs: [ActRow; $r] = std::array::from_fn(|j| acts.row(i + j));
                    let mut o = [[0f32; 2 * LANES]; $r];
                    match self.family {
                        Family::Q4 => q4::x86::group_pair_vnni(pair, nb, self.scale, &xs, &mut o),
                        Family::Q8 { sub } => {
                            q8::x86::group_pair_vnni(pair, nb, sub, self.scale, &xs, &mut o)
                        }
                    }
                    og.put(&o, i);
                    i += $r;
                }};
            }
            while i < m {
                by_rows!((m - i).min(VNNI_ROWS), rows, [8, 7, 6, 5, 4, 3, 2]);
            }
        }
    }

    /// The AMX path: tiles of up to 16 rows, each tile shape configured once for all groups;
    /// the 4-bit family takes two groups per tile product (a lone last group is computed
    /// twice).
    ///
    /// # Safety
    /// [`amx::available`] must be true.
    #[cfg(target_arch = "x86_64")]
    unsafe fn groups_amx(&self, g0: usize, acts: &QActs, cols: Cols) {
        let (m, nb) = (acts.m, self.k / BLOCK);
        let (kb, lanes) = match self.family {
            Family::Q4 => (BLOCK, 2 * LANES),
            Family::Q8 { sub } => (BLOCK / sub, LANES),
        };
        let mut r0 = 0;
        while r0 < m {
            let rows = (m - r0).min(amx::TILE_ROWS);
            let _tiles = amx::Tiles::configure(rows, kb, lanes);
            for j in 0..cols.groups().div_ceil(lanes / LANES) {
                let g = g0 + j * lanes / LANES;
                let og = cols.sub(j * lanes, lanes);
                macro_rules! rows {
                    ($r:literal) => {{
                        match self.family {
                            Family::Q4 => {
                                let pair = self.pair(g, og.lanes);
                                let mut o = [[0f32; 2 * LANES]; $r];
                                q4::x86::group_pair_amx(pair, nb, self.scale, acts, r0, &mut o);
                                og.put(&o, r0);
                            }
                            Family::Q8 { sub } => {
                                let mut o = [[0f32; LANES]; $r];
                                let (blocks, sc) = (self.group_blocks(g), self.scale);
                                match sub {
                                    1 => q8::x86::group_amx::<$r, 1>(
                                        blocks, nb, sc, acts, r0, &mut o,
                                    ),
                                    _ => q8::x86::group_amx::<$r, 2>(
                                        blocks, nb, sc, acts, r0, &mut o,
                                    ),
                                }
                                og.put(&o, r0);
                            }
                        }
                    }};
                }
                by_rows!(
                    rows,
                    rows,
                    [16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2]
                );
            }
            r0 += rows;
        }
    }

    /// Group `g` for all rows of `acts`, written into `cols` (its 8 lanes).
    fn group_all_rows(&self, isa: Isa, g: usize, acts: &QActs, cols: Cols) {
        let m = acts.m;
        let mut i = 0;
        macro_rules! rows {
            ($r:literal) => {{
                let xs: [ActRow; $r] = std::array::from_fn(|j| acts.row(i + j));
                let mut o = [[0f32; LANES]; $r];
                self.group(isa, g, &xs, &mut o);
                cols.put(&o, i);
                i += $r;
            }};
        }
        while i < m {
            by_rows!((m - i).min(ROWS_PER_PASS), rows, [4, 3, 2]);
        }
    }
}

/// A window of columns of a row-major output [m, stride]: the lanes of consecutive groups.
/// Parallel tasks get disjoint windows, so each output value has one writer.
#[derive(Clone, Copy)]
struct Cols {
    /// Row 0's first column of the window.
    ptr: *mut f32,
    stride: usize,
    /// Lanes the window's groups hold (a multiple of 8, past the matrix's last column).
    lanes: usize,
    /// Columns that exist (the rest of the last group is padding, not written).
    cols: usize,
    m: usize,
}

// SAFETY: a `Cols` is only written through by the task that owns its columns (see
// `QMatrix::matmul_with`), while the output it points into is alive and not otherwise used.
unsafe impl Send for Cols {}
unsafe impl Sync for Cols {}

impl Cols {
    fn groups(&self) -> usize {
        self.lanes / LANES
    }

    /// Lanes `c0..c0 + lanes` of this window (clipped to it).
    fn sub(&self, c0: usize, lanes: usize) -> Cols {
        Cols {
            ptr: self.ptr.wrapping_add(c0),
            stride: self.stride,
            lanes: lanes.min(self.lanes - c0),
            cols: lanes.min(self.cols.saturating_sub(c0)),
            m: self.m,
        }
    }

    /// Rows `o` (row i: output row `r0 + i`) into the window's columns that exist.
    fn put<const N: usize>(&self, o: &[[f32; N]], r0: usize) {
        let n = self.cols.min(N);
        for (i, row) in o.iter().enumerate() {
            assert!(r0 + i < self.m);
            // SAFETY: row r0 + i < m and columns < `cols` lie inside the output (see the type's
            // safety note); no other task writes them.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    row.as_ptr(),
                    self.ptr.add((r0 + i) * self.stride),
                    n,
                );
            }
        }
    }
}

/// A weight matrix [n, k] made of one or more packed parts stacked along the output rows (a
/// fused q|k|v may mix formats).
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub parts: Vec<Packed>,
    pub n: usize,
    pub k: usize,
}

impl QMatrix {
    pub fn new(p: Packed) -> Self {
        QMatrix {
            n: p.n,
            k: p.k,
            parts: vec![p],
        }
    }

    /// Stacks matrices along their outputs. All must share `k`.
    pub fn stack(ms: &[&QMatrix]) -> Option<QMatrix> {
        let k = ms.first()?.k;
        if ms.iter().any(|m| m.k != k) {
            return None;
        }
        let parts: Vec<Packed> = ms.iter().flat_map(|m| m.parts.iter().cloned()).collect();
        Some(QMatrix {
            n: parts.iter().map(|p| p.n).sum(),
            k,
            parts,
        })
    }

    /// The formats held, e.g. `Q4_K+Q6_K`.
    pub fn describe(&self) -> String {
        let mut names: Vec<&str> = self.parts.iter().map(|p| p.source).collect();
        names.dedup();
        names.join("+")
    }

    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.bytes()).sum()
    }

    /// Output row `r` as f32.
    pub fn dequantize_row(&self, mut r: usize, out: &mut [f32]) {
        for p in &self.parts {
            if r < p.n {
                return p.dequantize_row(r, out);
            }
            r -= p.n;
        }
        panic!("row {r} past the matrix");
    }

    /// `y = x W^T` for `x` [m, k] f32: [m, n].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(isa(), x, m)
    }

    /// The same on a chosen ISA path (tests compare paths). Panics if the CPU lacks it.
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        assert!(
            isa.available(),
            "this CPU cannot run the {} path",
            isa.name()
        );
        let acts = QActs::quantize(x, m, self.k);
        // Column-major output per part, padded to whole groups.
        let mut out = vec![0f32; m * self.n];
        let mut col0 = 0;
        for p in &self.parts {
            // Few rows stream the weights about once whatever the path, and the tile path's
            // fixed cost per block (unpacking, tile stores and reloads) outweighs its arithmetic
            // there: the 512-bit vector path serves them, with the same bits.
            let isa =
                if isa == Isa::Amx && m < amx_min_rows(p.family) && Isa::Avx512Vnni.available() {
                    Isa::Avx512Vnni
                } else {
                    isa
                };
            let groups = p.groups();
            let cols = Cols {
                ptr: out.as_mut_ptr().wrapping_add(col0),
                stride: self.n,
                lanes: groups * LANES,
                cols: p.n,
                m,
            };
            let work = m * groups * LANES * self.k;
            if work < 1 << 16 {
                p.groups_all_rows(isa, 0, &acts, cols);
            } else {
                // Whole pairs of groups per task (the AMX path computes two at once), each
                // writing its own columns of every row.
                let per = groups
                    .div_ceil(TASKS_PER_THREAD * super::pool::threads())
                    .next_multiple_of(2);
                super::pool::run(groups.div_ceil(per), &|t| {
                    p.groups_all_rows(isa, t * per, &acts, cols.sub(t * per * LANES, per * LANES));
                });
            }
            col0 += p.n;
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::ScaleKind;

    /// 8 consecutive scales as f32 (F16C for f16).
    #[inline(always)]
    pub unsafe fn load_scales(p: *const u8, scale: ScaleKind) -> __m256 {
        match scale {
            ScaleKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            ScaleKind::F32 => _mm256_loadu_ps(p as *const f32),
            ScaleKind::K4 => {
                unreachable!("K4 scales are read and written by q4.rs, per super-block")
            }
        }
    }

    /// Two groups' 8 lanes side by side as 16 (the pair kernels' scales).
    #[inline(always)]
    pub unsafe fn wide(lo: __m256, hi: __m256) -> __m512 {
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
            _mm256_castps_pd(hi),
        ))
    }

    /// 32 bytes at `lo` then 32 at `hi`: a chunk of two groups, 16 lanes.
    #[inline(always)]
    pub unsafe fn load_pair(lo: *const u8, hi: *const u8) -> __m512i {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_loadu_si256(lo as *const __m256i)),
            _mm256_loadu_si256(hi as *const __m256i),
        )
    }

    /// How many blocks ahead the 512-bit VNNI kernels prefetch each group's weights: two
    /// streams per pair of groups, which the hardware prefetchers follow less well than one.
    pub const VNNI_PREFETCH_BLOCKS: usize = 4;

    /// Prefetches the `bytes` of a block at `at` (which may lie past the weights: a prefetch
    /// never faults).
    #[inline(always)]
    pub unsafe fn prefetch_block(at: *const u8, bytes: usize) {
        for line in 0..bytes.div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * line) as *const i8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(13) ^ seed;
                (h % 20011) as f32 / 10005.5 - 1.0
            })
            .collect()
    }

    /// Random rows of every supported format, through the GGUF byte layout (quantized by
    /// candle's port of ggml), packed.
    fn every_format(n: usize, k: usize) -> Vec<QMatrix> {
        use candle_core::quantized::QTensor;
        use candle_core::{Device, Tensor};
        let w = Tensor::from_vec(data(n * k, 7), (n, k), &Device::Cpu).unwrap();
        let mut out = Vec::new();
        for (ty, g) in ggml::CANDLE_TYPES {
            let q = QTensor::quantize(&w, g).unwrap();
            let rows = ggml::decode(ty, &q.data().unwrap(), n, k).unwrap();
            out.push(QMatrix::new(rows.pack()));
        }
        out
    }

    fn dequantized(q: &QMatrix) -> Vec<f32> {
        let mut w = vec![0f32; q.n * q.k];
        for (r, row) in w.chunks_exact_mut(q.k).enumerate() {
            q.dequantize_row(r, row);
        }
        w
    }

    /// Against the dequantized weights in f64, the only error is the activations' rounding
    /// to int8: |x - dx qx| <= dx / 2 per element, so an output may be off by at most
    /// sum over blocks of dx / 2 * sum |w| (plus f32 rounding, covered by a 1e-4 relative
    /// margin). The test checks each output against its own bound.
    #[test]
    fn quantized_matmul_matches_dequantized_weights_within_the_rounding_bound() {
        let (m, n, k) = (5, 21, 512);
        let x = data(m * k, 3);
        for q in every_format(n, k) {
            let w = dequantized(&q);
            let acts = QActs::quantize(&x, m, k);
            let y = q.matmul(&x, m);
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut bound, mut scale) = (0f64, 0f64, 0f64);
                    for b in 0..k / BLOCK {
                        let mut wsum = 0f64;
                        for e in b * BLOCK..(b + 1) * BLOCK {
                            let (xv, wv) = (x[i * k + e] as f64, w[j * k + e] as f64);
                            exact += xv * wv;
                            scale += (xv * wv).abs();
                            wsum += wv.abs();
                        }
                        bound += acts.d[i * (k / BLOCK) + b] as f64 / 2.0 * wsum;
                    }
                    let err = (y[i * n + j] as f64 - exact).abs();
                    assert!(
                        err <= bound * 1.0001 + 1e-4 * scale + 1e-6,
                        "{}: out[{i}][{j}] = {} vs {exact} (error {err}, bound {bound})",
                        q.describe(),
                        y[i * n + j]
                    );
                }
            }
        }
    }

    /// Row i of an m-row product equals the same row alone, bit for bit, on every path, and
    /// every path equals the portable one.
    #[test]
    fn paths_agree_bitwise_and_rows_are_batch_invariant() {
        let (n, k) = (19, 256);
        let x = data(33 * k, 11);
        for q in every_format(n, k) {
            let reference = q.matmul_with(Isa::Portable, &x, 33);
            for isa in Isa::ALL {
                if !isa.available() {
                    eprintln!("skipping the {} path: this CPU lacks it", isa.name());
                    continue;
                }
                // Every row count to 33: each tile height of the AMX path (a 16-row tile and
                // a tail of 1..=16), each pass size of the vector paths.
                for m in 1..=33 {
                    let y = q.matmul_with(isa, &x[..m * k], m);
                    for i in 0..m {
                        for j in 0..n {
                            assert_eq!(
                                y[i * n + j].to_bits(),
                                reference[i * n + j].to_bits(),
                                "{} on {}: m={m} row {i} col {j}",
                                q.describe(),
                                isa.name()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn stacked_parts_of_mixed_formats_fill_their_columns() {
        let k = 256;
        let all = every_format(10, k);
        let refs: Vec<&QMatrix> = all.iter().collect();
        let stacked = QMatrix::stack(&refs).unwrap();
        assert_eq!(stacked.n, 60);
        let x = data(3 * k, 5);
        let y = stacked.matmul(&x, 3);
        for (p, q) in all.iter().enumerate() {
            let yp = q.matmul(&x, 3);
            for i in 0..3 {
                for j in 0..10 {
                    assert_eq!(y[i * 60 + p * 10 + j].to_bits(), yp[i * 10 + j].to_bits());
                }
            }
        }
    }
}
