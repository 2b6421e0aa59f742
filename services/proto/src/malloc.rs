//! The allocator's arena limit for long-running services.
//!
//! glibc's malloc gives threads their own arenas, up to 8 per core, and returns a freed block
//! to the system only from the top of its arena. A server whose threads free and allocate
//! step-sized buffers in turn spreads them over many arenas, and its resident memory climbs
//! towards the sum of every arena's high-water mark. Measured with tests/soak/run.py (64
//! streams, 10 minutes, speculation at every step, 2-vCPU Xeon): before the batch schedulers,
//! when model math ran on whichever blocking thread served a request, the draft service grew
//! 15% after warm-up; with the schedulers both settings stay within 5%, and two arenas keep the
//! level lower (draft service 89 MiB against 117, workers 240-270 MiB against 275-290, the
//! same throughput within the run-to-run noise).
//!
//! Invariant: the limit is set once, before the runtime starts its threads, and only where the
//! operator has not chosen one (glibc reads `MALLOC_ARENA_MAX` itself; that value wins).

/// Arenas when the operator sets none (`MALLOC_ARENA_MAX` overrides).
pub const DEFAULT_ARENAS: i32 = 2;

/// Caps the number of malloc arenas at [`DEFAULT_ARENAS`] unless `MALLOC_ARENA_MAX` is set.
/// Returns the limit set, if any. A no-op outside glibc.
pub fn limit_arenas() -> Option<i32> {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return None;
    }
    set_arena_max(DEFAULT_ARENAS).then_some(DEFAULT_ARENAS)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(n: i32) -> bool {
    // SAFETY: mallopt only changes malloc's tuning parameters; M_ARENA_MAX takes effect for
    // arenas created afterwards.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, n) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_: i32) -> bool {
    false
}
