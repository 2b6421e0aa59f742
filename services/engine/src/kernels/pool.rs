//! The kernels' thread pool: persistent workers that spin briefly between jobs before they park.
//!
//! Invariant: `run(n, f)` calls `f(i)` exactly once for every task index `i < n` and returns
//! after the last one; which thread runs a task never changes what it computes (the kernels
//! split work by output columns or heads, never inside a reduction), so results do not depend
//! on the thread count or the scheduling.
//!
//! Why not rayon: a decode step runs about 150 short parallel regions (4 matrices and the
//! attention per layer); rayon's workers sleep on futexes between them, and a perf profile of
//! an EAGLE step showed about 30% of the time in wake-ups (`futex_wait`, `sched_yield`). Here
//! the workers spin for `EAGLE_SPIN_US` (default 200) after a job before parking, so the jobs of
//! one step meet awake workers. Jobs from several threads at once (a worker serving sessions in
//! parallel) do not queue: a job that finds the pool busy runs on its own thread.
//!
//! Source: the spin-then-park worker loop of OpenMP runtimes (`OMP_WAIT_POLICY`,
//! `KMP_BLOCKTIME`) and of llama.cpp's ggml threadpool.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One job: a task function valid until every worker has acknowledged it.
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
}

struct Pool {
    workers: usize,
    spin: Duration,
    /// Held by the thread whose job the pool runs.
    owner: Mutex<()>,
    job: UnsafeCell<Job>,
    epoch: AtomicUsize,
    next: AtomicUsize,
    acks: AtomicUsize,
    /// A task panicked on a worker during the current job.
    failed: AtomicBool,
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the owner while no worker reads it (every worker has
// acknowledged the previous job), and read by workers only between an epoch change and their
// acknowledgement, while the owner waits; the task function is `Sync`.
unsafe impl Sync for Pool {}
unsafe impl Send for Pool {}

thread_local! {
    /// Set on pool workers and on a thread while it runs a job: nested jobs run inline.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

fn threads_wanted() -> usize {
    ["EAGLE_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let spin_us = std::env::var("EAGLE_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200u64);
        let p: &'static Pool = Box::leak(Box::new(Pool {
            workers: threads_wanted() - 1,
            spin: Duration::from_micros(spin_us),
            owner: Mutex::new(()),
            job: UnsafeCell::new(Job { f: &|_| {}, n: 0 }),
            epoch: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            acks: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for i in 0..p.workers {
            std::thread::Builder::new()
                .name(format!("eagle-kernel-{i}"))
                .spawn(move || p.work())
                .expect("spawn a kernel thread");
        }
        p
    })
}

/// Threads a job runs on (the caller included).
pub fn threads() -> usize {
    pool().workers + 1
}

/// Calls `f(i)` for every `i < n`, spread over the pool; returns when all are done.
pub fn run(n: usize, f: &(dyn Fn(usize) + Sync)) {
    let p = pool();
    if n <= 1 || p.workers == 0 || INSIDE.with(|c| c.get()) {
        (0..n).for_each(f);
        return;
    }
    let _owner = match p.owner.try_lock() {
        Ok(g) => g,
        // A job that panicked poisoned the lock; the pool itself is sound.
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            // Another thread's job holds the pool: this one runs here, in parallel with it.
            (0..n).for_each(f);
            return;
        }
    };
    INSIDE.with(|c| c.set(true));
    p.next.store(0, SeqCst);
    p.acks.store(0, SeqCst);
    // SAFETY: every worker acknowledged the previous job, so none reads `job` now; `f`
    // outlives the job because this function waits for every acknowledgement below.
    unsafe {
        *p.job.get() = Job {
            f: std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f),
            n,
        };
    }
    p.epoch.fetch_add(1, SeqCst);
    if p.sleepers.load(SeqCst) > 0 {
        let _g = p.park.lock().unwrap_or_else(|e| e.into_inner());
        p.wake.notify_all();
    }
    // A panicking task must not unwind past the workers still running `f`: catch it, wait for
    // every acknowledgement, then resume it.
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.take_tasks(f, n)));
    let mut spins = 0u32;
    while p.acks.load(SeqCst) < p.workers {
        spins += 1;
        if spins < 1 << 16 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    INSIDE.with(|c| c.set(false));
    if let Err(e) = mine {
        std::panic::resume_unwind(e);
    }
    if p.failed.swap(false, SeqCst) {
        panic!("a kernel task panicked on a pool thread (its message is above)");
    }
}

impl Pool {
    fn take_tasks(&self, f: &(dyn Fn(usize) + Sync), n: usize) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= n {
                return;
            }
            f(i);
        }
    }

    fn work(&self) {
        INSIDE.with(|c| c.set(true));
        // Epoch 0 is the pool's initial state: a job published before this thread got here
        // still counts on it.
        let mut seen = 0;
        loop {
            seen = self.wait_past(seen);
            // SAFETY: the owner published this job before bumping the epoch and keeps it
            // alive until this worker acknowledges it.
            let (f, n) = unsafe {
                let j = &*self.job.get();
                (&*j.f, j.n)
            };
            // A panic is reported to the owner, never allowed to kill this thread (the owner
            // would wait for its acknowledgement forever).
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.take_tasks(f, n)))
                .is_err()
            {
                self.failed.store(true, SeqCst);
            }
            self.acks.fetch_add(1, SeqCst);
        }
    }

    /// Waits for an epoch other than `seen`: spins for `self.spin`, then parks.
    fn wait_past(&self, seen: usize) -> usize {
        let start = Instant::now();
        let mut i = 0u32;
        loop {
            let e = self.epoch.load(SeqCst);
            if e != seen {
                return e;
            }
            i = i.wrapping_add(1);
            if i.is_multiple_of(64) && start.elapsed() >= self.spin {
                break;
            }
            std::hint::spin_loop();
        }
        let mut g = self.park.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, SeqCst);
        loop {
            let e = self.epoch.load(SeqCst);
            if e != seen {
                self.sleepers.fetch_sub(1, SeqCst);
                return e;
            }
            g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Splits `out` into chunks of `chunk` elements and calls `f(index, chunk)` for each, in
/// parallel (the pool's `par_chunks_mut`).
pub fn for_each_chunk<T: Send>(out: &mut [T], chunk: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    let len = out.len();
    let n = len.div_ceil(chunk.max(1));
    let base = SendPtr(out.as_mut_ptr());
    run(n, &|i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: task i owns elements start..end alone; `out` outlives `run`.
        let s = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, s);
    });
}

struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: only used to hand disjoint chunks of one slice to the pool's threads.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_even_from_many_threads_and_nested() {
        let counts: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        run(1000, &|i| {
                            counts[i].fetch_add(1, SeqCst);
                            if i == 0 {
                                run(3, &|_| {});
                            }
                        });
                    }
                });
            }
        });
        assert!(counts.iter().all(|c| c.load(SeqCst) == 200));
        // A panicking task fails its job on the caller, and the pool keeps working.
        let r = std::panic::catch_unwind(|| run(64, &|i| assert!(i != 40, "task 40 fails")));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        run(64, &|_| {
            count.fetch_add(1, SeqCst);
        });
        assert_eq!(count.load(SeqCst), 64);
        let mut v = vec![0usize; 103];
        for_each_chunk(&mut v, 10, &|i, c| c.iter_mut().for_each(|x| *x = i));
        assert!(v.iter().enumerate().all(|(j, &x)| x == j / 10));
    }
}
