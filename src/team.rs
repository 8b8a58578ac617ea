//! A team of threads that stays awake between the many small matrix–vector
//! products of a decode step (and the attention heads between them).
//!
//! One decode step of a 0.5B model is ~170 products of 20 µs to 10 ms each,
//! separated by a few µs of other work. rayon's pool puts idle workers to
//! sleep and, called from a thread outside the pool, blocks the caller while
//! two workers are woken: measured in place, that cost ~30 µs per product
//! (a 128×896 product took 37 µs, its arithmetic 5). Here the caller works
//! too, and the helpers spin for a short while before they sleep, as
//! llama.cpp's threads do; chunks of rows are handed out from one atomic
//! counter, so a slow thread takes fewer of them.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a helper spins for the next job before it sleeps: longer than
/// the gaps inside a decode step, short enough not to hold a core from
/// other work for long.
const SPIN: Duration = Duration::from_micros(300);

/// A job: `f(chunk)` for every chunk in `0..chunks`.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    chunks: usize,
}

// SAFETY: `f` points to a `Sync` closure that `Team::run` keeps alive until
// every helper has finished with it.
unsafe impl Send for Job {}

struct Shared {
    /// Bumped for every job; helpers wait for it to change.
    epoch: AtomicUsize,
    job: Mutex<Option<Job>>,
    next_chunk: AtomicUsize,
    /// Helpers still working on the current job.
    pending: AtomicUsize,
    panicked: AtomicBool,
    sleeping: AtomicUsize,
    wake: Condvar,
    sleep_lock: Mutex<()>,
}

pub struct Team {
    shared: Arc<Shared>,
    helpers: usize,
    /// One job at a time (callers on other threads wait here).
    busy: Mutex<()>,
}

impl Team {
    /// The team for this process, sized by rayon's thread count (which
    /// `--threads` sets) the first time it is used.
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| Team::new(rayon::current_num_threads()))
    }

    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            next_chunk: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            wake: Condvar::new(),
            sleep_lock: Mutex::new(()),
        });
        let helpers = threads.max(1) - 1;
        for i in 0..helpers {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("qcoder-team-{i}"))
                .spawn(move || helper(&shared))
                .expect("spawn a team thread");
        }
        Self {
            shared,
            helpers,
            busy: Mutex::new(()),
        }
    }

    /// Calls `f(chunk)` for every chunk in `0..chunks`, on this thread and
    /// the helpers, and returns when all are done.
    pub fn run(&self, chunks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers == 0 || chunks <= 1 {
            (0..chunks).for_each(f);
            return;
        }
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY (of the lifetime erasure): this function does not return
        // before `pending` is back to zero, i.e. before every helper is done
        // with `f`.
        let f: *const (dyn Fn(usize) + Sync + 'static) =
            unsafe { std::mem::transmute(f as *const (dyn Fn(usize) + Sync + '_)) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(Job { f, chunks });
        s.next_chunk.store(0, SeqCst);
        s.pending.store(self.helpers, SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        if s.sleeping.load(SeqCst) > 0 {
            let _g = s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // SAFETY: `f` is the caller's live closure.
        let result = catch_unwind(AssertUnwindSafe(|| work(s, unsafe { &*f }, chunks)));
        while s.pending.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
        if s.panicked.swap(false, SeqCst) {
            panic!("a team thread panicked");
        }
    }

    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers + 1
    }

    /// `f(start, part)` for every part `data[bounds[i]..bounds[i + 1]]`,
    /// spread over the team as [`Team::run_chunks_mut`] spreads its chunks
    /// (`start` is the part's offset in `data`). `bounds` rises from 0 to
    /// `data.len()`.
    pub fn run_parts_mut<T: Send>(
        &self,
        data: &mut [T],
        bounds: &[usize],
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        assert!(
            bounds.first() == Some(&0)
                && bounds.last() == Some(&data.len())
                && bounds.windows(2).all(|w| w[0] <= w[1]),
            "parts that do not cover the data in order"
        );
        let base = SharedMut(data.as_mut_ptr());
        self.run(bounds.len() - 1, &|i| {
            let (start, end) = (bounds[i], bounds[i + 1]);
            // SAFETY: `run` calls this closure once per `i`, the parts are
            // disjoint and in bounds (checked above), and `data` stays
            // mutably borrowed until `run` returns, after every call.
            let part = unsafe { std::slice::from_raw_parts_mut(base.at(start), end - start) };
            f(start, part)
        });
    }

    /// `f(i, chunk)` for every `chunk_len`-element chunk `i` of `data` (the
    /// last may be shorter), spread over the team as [`Team::run`] spreads
    /// its chunks: each chunk goes to exactly one call, so the calls may
    /// write their chunks without locks.
    pub fn run_chunks_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk_len: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        assert!(chunk_len > 0, "chunks of no elements");
        let len = data.len();
        let base = SharedMut(data.as_mut_ptr());
        self.run(len.div_ceil(chunk_len), &|i| {
            let start = i * chunk_len;
            // SAFETY: `run` calls this closure once per `i`, the chunks are
            // disjoint and in bounds, and `data` stays mutably borrowed
            // until `run` returns, after every call has finished.
            let chunk = unsafe {
                std::slice::from_raw_parts_mut(base.at(start), chunk_len.min(len - start))
            };
            f(i, chunk)
        });
    }
}

/// The start of a slice whose disjoint chunks the team's threads write.
struct SharedMut<T>(*mut T);

// SAFETY: only `run_chunks_mut` makes these, and it hands each element to
// one thread at a time.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// # Safety
    /// `offset` lies within the slice.
    unsafe fn at(&self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}

fn work(s: &Shared, f: &(dyn Fn(usize) + Sync), chunks: usize) {
    loop {
        let c = s.next_chunk.fetch_add(1, SeqCst);
        if c >= chunks {
            return;
        }
        f(c);
    }
}

fn helper(s: &Shared) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(SeqCst) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                let mut g = s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleeping.fetch_add(1, SeqCst);
                while s.epoch.load(SeqCst) == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleeping.fetch_sub(1, SeqCst);
            }
        }
        seen = s.epoch.load(SeqCst);
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            // SAFETY: `Team::run` keeps the closure alive until `pending`
            // reaches zero, which needs this helper's decrement below.
            let f = unsafe { &*job.f };
            if catch_unwind(AssertUnwindSafe(|| work(s, f, job.chunks))).is_err() {
                s.panicked.store(true, SeqCst);
            }
        }
        s.pending.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once_across_threads() {
        let team = Team::new(3);
        for chunks in [0, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
            team.run(chunks, &|c| {
                hits[c].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "{chunks} chunks");
        }
        // After the helpers fell asleep.
        std::thread::sleep(SPIN * 5);
        let total = AtomicUsize::new(0);
        team.run(64, &|c| {
            total.fetch_add(c, SeqCst);
        });
        assert_eq!(total.load(SeqCst), 63 * 64 / 2);
    }

    #[test]
    fn parts_of_a_slice_each_go_to_one_call() {
        let team = Team::new(3);
        for bounds in [vec![0, 3, 3, 10, 11], vec![0, 11], vec![0; 1]] {
            let len = *bounds.last().unwrap();
            let mut data = vec![usize::MAX; len];
            team.run_parts_mut(&mut data, &bounds, &|start, part| {
                for (k, v) in part.iter_mut().enumerate() {
                    *v = start + k;
                }
            });
            assert_eq!(data, (0..len).collect::<Vec<_>>(), "{bounds:?}");
        }
    }

    #[test]
    fn chunks_of_a_slice_each_go_to_one_call() {
        let team = Team::new(3);
        for (len, chunk_len) in [(1000, 7), (5, 5), (0, 3), (3, 8)] {
            let mut data = vec![usize::MAX; len];
            team.run_chunks_mut(&mut data, chunk_len, &|i, chunk| {
                assert!(chunk.len() == chunk_len || (i + 1) * chunk_len >= len);
                for v in chunk {
                    *v = i;
                }
            });
            let want: Vec<usize> = (0..len).map(|j| j / chunk_len).collect();
            assert_eq!(data, want, "{len} in chunks of {chunk_len}");
        }
    }

    #[test]
    fn a_panic_in_a_chunk_reaches_the_caller() {
        let team = Team::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.run(50, &|c| assert!(c != 40, "chunk 40"));
        }));
        assert!(r.is_err());
        // The team still works afterwards.
        let n = AtomicUsize::new(0);
        team.run(10, &|_| {
            n.fetch_add(1, SeqCst);
        });
        assert_eq!(n.load(SeqCst), 10);
    }
}
