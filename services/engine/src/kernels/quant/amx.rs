//! Intel AMX tiles for the integer paths: detection, the per-process permission, the tile
//! configuration, and the four tile instructions the kernels use, through inline assembly (Rust
//! has no stable AMX intrinsics). The kernels themselves live beside their block family
//! (`q4.rs`, `q8.rs`).
//!
//! Invariant: a tile product here only ever sums one block (or sub-block) of one activation row
//! against one weight lane: `C[r][c] = sum_k A[r][k] * B[k/4][4c + k%4]`, an exact int32 sum
//! that equals the other paths' integer sums bit for bit. The f32 sequence per output that
//! follows it is the family's definition, unchanged; so rows stay batch-invariant and the
//! path gives the portable path's bits.
//!
//! Shapes (N = 8 output lanes, one packed group, or 16, two groups side by side; R <= 16
//! activation rows):
//! - A (`tmm1`, `tmm4`): R rows x `kb` bytes of int8 activations, read straight from the
//!   quantized rows with a stride of `k` bytes;
//! - B (`tmm2`, `tmm5`): `kb / 4` rows x 4N bytes in VNNI layout (4 consecutive inputs of each
//!   lane per row), as `q8.rs` packs a group and `q4.rs` unpacks two;
//! - C (`tmm0`, `tmm3`): R rows x N int32, stored to a scratch block for the f32 finish.
//!
//! Two tile sets alternate between consecutive blocks, so one block's tile product overlaps
//! the previous block's f32 finish.
//!
//! Source: Intel's SDM (vol. 1 ch. 3, "Intel Advanced Matrix Extensions"), the Intel
//! intrinsics guide for `TDPBSSD` / `TDPBSUD`, and Linux's `Documentation/arch/x86/xstate.rst`
//! (`ARCH_REQ_XCOMP_PERM` grants the tile data state to a process).

#[cfg(target_arch = "x86_64")]
pub use imp::*;

#[cfg(not(target_arch = "x86_64"))]
pub fn available() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
pub fn spin_products(_n: usize) -> f64 {
    0.0
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::asm;
    use std::arch::x86_64::__cpuid_count;
    use std::sync::OnceLock;

    /// Most activation rows one tile holds.
    pub const TILE_ROWS: usize = 16;

    /// How many blocks ahead the kernels prefetch a group's weights.
    pub const PREFETCH_BLOCKS: usize = 6;

    /// Whether this CPU has AMX-TILE and AMX-INT8 (and AVX-512VL, FMA and F16C for the f32 finish)
    /// and Linux granted this process the tile state. Asked once.
    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            if std::env::var_os("EAGLE_NO_AMX").is_some() {
                return false;
            }
            let vector = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl");
            let leaf7 = __cpuid_count(7, 0);
            let amx_tile = leaf7.edx >> 24 & 1 == 1;
            let amx_int8 = leaf7.edx >> 25 & 1 == 1;
            vector && amx_tile && amx_int8 && request_permission()
        })
    }

    /// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: without it the first tile
    /// instruction kills the process. The grant covers every thread of the process.
    fn request_permission() -> bool {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
        const XFEATURE_XTILEDATA: u64 = 18;
        let ret: i64;
        // SAFETY: a plain Linux system call; it reads no memory of ours.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack)
            );
        }
        ret == 0
    }

    /// The 64-byte tile configuration (palette 1).
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    impl Config {
        /// Palette 1, every tile unused.
        fn new() -> Config {
            Config {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                colsb: [0; 16],
                rows: [0; 16],
            }
        }

        /// Loads this configuration on the current thread (`ldtilecfg`).
        ///
        /// # Safety
        /// [`available`] must have returned true.
        unsafe fn load(&self) -> Tiles {
            asm!("ldtilecfg [{}]", in(reg) self, options(nostack, readonly));
            Tiles(())
        }
    }

    /// Tiles configured for `rows` activation rows, `kb` input bytes per tile product (32 for a
    /// block, 16 for a half block) and `lanes` outputs (8 or 16), on the current thread, until
    /// dropped.
    pub struct Tiles(());

    impl Tiles {
        /// # Safety
        /// [`available`] must have returned true.
        pub unsafe fn configure(rows: usize, kb: usize, lanes: usize) -> Tiles {
            assert!((1..=TILE_ROWS).contains(&rows) && (kb == 16 || kb == 32));
            assert!(lanes == 8 || lanes == 16);
            let mut cfg = Config::new();
            for set in [0, 3] {
                // C: rows x lanes int32.
                cfg.colsb[set] = 4 * lanes as u16;
                cfg.rows[set] = rows as u8;
                // A: rows x kb activation bytes.
                cfg.colsb[set + 1] = kb as u16;
                cfg.rows[set + 1] = rows as u8;
                // B: kb / 4 rows x (lanes x 4 bytes).
                cfg.colsb[set + 2] = 4 * lanes as u16;
                cfg.rows[set + 2] = (kb / 4) as u8;
            }
            cfg.load()
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: tiles were configured on this thread by `configure`.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// Int32 sums of one tile product, up to 16 lanes per activation row (64 bytes apart),
    /// for the f32 finish.
    #[repr(C, align(64))]
    pub struct Sums(pub [[i32; 16]; TILE_ROWS]);

    impl Sums {
        pub fn new() -> Sums {
            Sums([[0; 16]; TILE_ROWS])
        }
    }

    impl Default for Sums {
        fn default() -> Self {
            Sums::new()
        }
    }

    /// Whether the weights are signed (`Q8` family: `tdpbssd`) or unsigned (`Q4` family, 0..=15:
    /// `tdpbsud`); activations are always signed.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub enum Weights {
        Signed,
        Unsigned,
    }

    /// `sums = A x B` on tile set `set` (0 or 1): A is the configured rows of `kb` bytes at `a`,
    /// `a_stride` bytes apart; B the configured rows at `b`, `b_stride` bytes apart.
    ///
    /// # Safety
    /// Tiles must be configured on this thread ([`Tiles::configure`]) and the memory behind
    /// `a` and `b` readable for the configured shapes.
    #[inline(always)]
    pub unsafe fn product(
        set: usize,
        weights: Weights,
        a: *const i8,
        a_stride: usize,
        b: *const u8,
        b_stride: usize,
        sums: &mut Sums,
    ) {
        let c = sums.0.as_mut_ptr() as *mut u8;
        macro_rules! step {
            ($tc:literal, $ta:literal, $tb:literal, $op:literal) => {
                asm!(
                    concat!("tilezero ", $tc),
                    concat!("tileloadd ", $ta, ", [{a} + {sa}*1]"),
                    concat!("tileloadd ", $tb, ", [{b} + {sb}*1]"),
                    concat!($op, " ", $tc, ", ", $ta, ", ", $tb),
                    concat!("tilestored [{c} + {sc}*1], ", $tc),
                    a = in(reg) a,
                    sa = in(reg) a_stride,
                    b = in(reg) b,
                    sb = in(reg) b_stride,
                    c = in(reg) c,
                    sc = in(reg) 64usize,
                    options(nostack)
                )
            };
        }
        match (set & 1, weights) {
            (0, Weights::Unsigned) => step!("tmm0", "tmm1", "tmm2", "tdpbsud"),
            (_, Weights::Unsigned) => step!("tmm3", "tmm4", "tmm5", "tdpbsud"),
            (0, Weights::Signed) => step!("tmm0", "tmm1", "tmm2", "tdpbssd"),
            (_, Weights::Signed) => step!("tmm3", "tmm4", "tmm5", "tdpbssd"),
        }
    }

    /// The tile unit's peak, for benchmarks: `n` rounds of four independent full-size products
    /// (16 x 64 bytes by 64 x 16, 16,384 multiply-adds each) on this thread; returns the
    /// multiply-adds done. Panics without [`available`].
    pub fn spin_products(n: usize) -> f64 {
        assert!(available(), "this CPU or kernel gives no AMX tiles");
        let mut cfg = Config::new();
        cfg.colsb[..6].fill(64);
        cfg.rows[..6].fill(16);
        let data = [1u8; 1024];
        // SAFETY: tiles are available; every tile load reads 16 rows of 64 bytes of `data`.
        unsafe {
            let _tiles = cfg.load();
            asm!(
                "tileloadd tmm4, [{d} + {s}*1]",
                "tileloadd tmm5, [{d} + {s}*1]",
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tdpbssd tmm0, tmm4, tmm5",
                "tdpbssd tmm1, tmm4, tmm5",
                "tdpbssd tmm2, tmm4, tmm5",
                "tdpbssd tmm3, tmm4, tmm5",
                "dec {n}",
                "jnz 2b",
                d = in(reg) data.as_ptr(),
                s = in(reg) 64usize,
                n = inout(reg) n.max(1) => _,
                options(nostack)
            );
        }
        (n.max(1) * 4 * 16 * 16 * 64) as f64
    }
}
