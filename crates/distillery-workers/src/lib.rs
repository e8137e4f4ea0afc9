//! Worker threads for the parallel products of decoding.
//!
//! A decoding step makes a hundred or more products of a few rows each, every one split over
//! the threads and each worth tens of microseconds. Between them the calling thread spends
//! tens to hundreds of microseconds on norms, rotary embeddings and attention. rayon's idle
//! workers go to sleep after a few dozen yields, so nearly every product waited for a worker
//! to be woken: on a 2-core KVM guest two tasks of 30 µs took 44 to 115 µs on rayon's threads
//! against 31 µs here (`cargo run --release -p distillery-workers --example handoff`). These
//! workers keep looking for work for [`STAY_AWAKE`] after their last task, yielding the core
//! to any other runnable thread while they look, and only then sleep.
//!
//! The calling thread takes tasks too, from the same counter as the workers, so a product
//! never waits for a worker that has not woken: it only waits for tasks already started.
//! Which thread runs a task never changes what the task computes, so results do not depend on
//! the number of threads.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker keeps looking for the next task before it sleeps: longer than the
/// gaps between a decoding step's products and between its steps, short enough that a pause
/// in generation soon leaves the cores to others.
pub const STAY_AWAKE: Duration = Duration::from_millis(5);

/// Runs `task(index)` for every index below `tasks` on the calling thread and the workers, and
/// returns when all have run. As many threads take part as rayon's current pool has (so
/// `RAYON_NUM_THREADS` and a test's own rayon pool set it). Called from inside a task, or while
/// another thread's tasks are running, it runs the tasks on the calling thread, in order. A
/// task's panic is raised on the calling thread once every task has finished.
pub fn for_each_task(tasks: usize, task: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads().min(tasks);
    if threads < 2 || IN_TASKS.with(Cell::get) {
        return in_order(tasks, &task);
    }
    let pool = pool();
    let Ok(submission) = pool.submission.try_lock() else {
        return in_order(tasks, &task);
    };
    let helpers = (threads - 1).min(pool.workers);
    let mut panic = None;
    for first in (0..tasks).step_by(MOST_TASKS) {
        let count = MOST_TASKS.min(tasks - first);
        let list_panic = pool.run(count, helpers, &|index| task(first + index));
        panic = panic.or(list_panic);
    }
    // Released before a task's panic goes on, so that it does not poison the lock and leave
    // every later call on one thread.
    drop(submission);
    if let Some(payload) = panic {
        resume_unwind(payload);
    }
}

/// The tasks one after another on the calling thread, each run even after another's panic.
fn in_order(tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    let mut first_panic = None;
    for index in 0..tasks {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| task(index))) {
            first_panic.get_or_insert(payload);
        }
    }
    if let Some(payload) = first_panic {
        resume_unwind(payload);
    }
}

/// `chunks` of `values` (each `chunk` long, the last possibly shorter) given to `task(index,
/// chunk)` as in [`for_each_task`].
pub fn for_each_chunk_mut<T: Send>(
    values: &mut [T],
    chunk: usize,
    task: impl Fn(usize, &mut [T]) + Sync,
) {
    let tasks = chunk_count(values.len(), chunk);
    let values = SharedSlice::new(values);
    // SAFETY: each index below `tasks` is run once and takes only its own chunk.
    for_each_task(tasks, |index| {
        task(index, unsafe { values.chunk(index, chunk) })
    });
}

/// Chunk `index` of both `first` and `second` (`first_chunk` and `second_chunk` long, the last
/// of each possibly shorter) given to `task(index, first, second)` as in [`for_each_task`];
/// both slices hold the same number of chunks.
pub fn for_each_chunk_pair_mut<T: Send, U: Send>(
    (first, first_chunk): (&mut [T], usize),
    (second, second_chunk): (&mut [U], usize),
    task: impl Fn(usize, &mut [T], &mut [U]) + Sync,
) {
    let tasks = chunk_count(first.len(), first_chunk);
    assert_eq!(
        tasks,
        chunk_count(second.len(), second_chunk),
        "as many chunks of one slice as of the other"
    );
    let (first, second) = (SharedSlice::new(first), SharedSlice::new(second));
    for_each_task(tasks, |index| {
        // SAFETY: each index below `tasks` is run once and takes only its own chunks.
        let (first, second) = unsafe {
            (
                first.chunk(index, first_chunk),
                second.chunk(index, second_chunk),
            )
        };
        task(index, first, second)
    });
}

/// `task(index)` for every index below `tasks`, run as in [`for_each_task`], in index order.
pub fn map_tasks<T: Send>(tasks: usize, task: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut results: Vec<Option<T>> = std::iter::repeat_with(|| None).take(tasks).collect();
    for_each_chunk_mut(&mut results, 1, |index, result| {
        result[0] = Some(task(index));
    });
    results
        .into_iter()
        .map(|result| result.expect("every task ran"))
        .collect()
}

fn chunk_count(length: usize, chunk: usize) -> usize {
    assert!(chunk > 0, "chunks of no values");
    length.div_ceil(chunk)
}

/// A slice whose disjoint chunks tasks take, each its own.
struct SharedSlice<T> {
    start: *mut T,
    length: usize,
}

// SAFETY: tasks reach only disjoint chunks through it, as `chunk`'s callers guarantee.
unsafe impl<T: Send> Sync for SharedSlice<T> {}

impl<T> SharedSlice<T> {
    fn new(values: &mut [T]) -> Self {
        Self {
            start: values.as_mut_ptr(),
            length: values.len(),
        }
    }

    /// Chunk `index` of `chunk` values (the last possibly shorter).
    ///
    /// # Safety
    /// No other reference to the chunk may live while the one returned does, and the slice
    /// `new` took must stay borrowed meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn chunk(&self, index: usize, chunk: usize) -> &mut [T] {
        let first = index * chunk;
        assert!(first < self.length, "chunk {index} of {chunk} values");
        // SAFETY: `first..first + count` lies inside the slice, which the caller vouches no
        // other reference reaches meanwhile.
        unsafe {
            std::slice::from_raw_parts_mut(self.start.add(first), chunk.min(self.length - first))
        }
    }
}

thread_local! {
    /// Whether this thread is running tasks: a worker always, a caller while its tasks run.
    static IN_TASKS: Cell<bool> = const { Cell::new(false) };
}

/// A task list as the workers see it: the caller's closure, valid while its tasks are unfinished.
type Job = *const (dyn Fn(usize) + Sync);

struct Pool {
    workers: usize,
    /// Held by the one caller whose tasks are running.
    submission: Mutex<()>,
    /// The current task list: its number, its length and its next unclaimed task, in one
    /// word, so that a claim is only ever made on the list the claimant read the length of.
    claims: AtomicU64,
    /// Workers with an index below this take part in the current task list.
    helpers: AtomicUsize,
    finished: AtomicUsize,
    job: UnsafeCell<Option<Job>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    sleepers: AtomicUsize,
    sleeping: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the caller holding `submission`, before it publishes a new
// task list in `claims` and while no task of the previous list runs; a worker reads it only
// after claiming a task of the list it belongs to, which that caller waits for.
unsafe impl Sync for Pool {}

/// Bits of a task index, and of a list's length, in `claims`; the list's number takes the
/// 24 bits above them.
const INDEX_BITS: u32 = 20;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
const LIST_SHIFT: u32 = 2 * INDEX_BITS;
const LIST_MASK: u64 = (1 << (64 - LIST_SHIFT)) - 1;
/// The longest list the workers take at once; longer ones run as several in turn.
const MOST_TASKS: usize = INDEX_MASK as usize;

/// The claims word's list number, length and next task.
fn unpack(claims: u64) -> (u64, usize, usize) {
    (
        claims >> LIST_SHIFT,
        ((claims >> INDEX_BITS) & INDEX_MASK) as usize,
        (claims & INDEX_MASK) as usize,
    )
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let workers = machine_threads().saturating_sub(1);
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            workers,
            submission: Mutex::new(()),
            claims: AtomicU64::new(0),
            helpers: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            panic: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            sleeping: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for worker in 0..workers {
            std::thread::Builder::new()
                .name(format!("distillery-worker-{worker}"))
                .spawn(move || pool.work(worker))
                .expect("spawning a worker thread");
        }
        pool
    })
}

/// The threads rayon's global pool has: `RAYON_NUM_THREADS` where it is set to a number, else
/// the machine's. Sized by the pool current at the first call instead, the workers could
/// outnumber the cores, and a worker left out of a list spun on a core another needed.
fn machine_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|threads| threads.parse().ok())
        .filter(|&threads| threads > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
}

impl Pool {
    /// Runs the tasks as [`for_each_task`] does, returning the first task's panic.
    fn run(
        &self,
        tasks: usize,
        helpers: usize,
        task: &(dyn Fn(usize) + Sync),
    ) -> Option<Box<dyn Any + Send>> {
        assert!(tasks <= MOST_TASKS, "{tasks} tasks");
        // SAFETY: the caller holds `submission` and the previous list's tasks have all
        // finished. The lifetime is erased because this function does not return while a
        // worker may still call it: it waits for every claimed task to finish.
        unsafe {
            *self.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(task));
        }
        self.helpers.store(helpers, Ordering::Relaxed);
        self.finished.store(0, Ordering::Relaxed);
        let (last, _, _) = unpack(self.claims.load(Ordering::Relaxed));
        let list = (last + 1) & LIST_MASK;
        let length = (tasks as u64) << INDEX_BITS;
        self.claims
            .store((list << LIST_SHIFT) | length, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            drop(self.sleeping.lock());
            self.wake.notify_all();
        }
        IN_TASKS.with(|busy| busy.set(true));
        self.take_tasks(list);
        IN_TASKS.with(|busy| busy.set(false));
        while self.finished.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
        }
        self.panic.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Runs tasks of list `list` until none is left unclaimed.
    fn take_tasks(&self, list: u64) {
        loop {
            let claims = self.claims.load(Ordering::Acquire);
            let (claims_list, tasks, index) = unpack(claims);
            if claims_list != list || index >= tasks {
                return;
            }
            let claimed = self.claims.compare_exchange_weak(
                claims,
                claims + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            if claimed.is_err() {
                continue;
            }
            // SAFETY: the claim succeeded for the current list, whose caller set `job` before
            // publishing it and does not return before this task has finished.
            let job = unsafe { (*self.job.get()).expect("a published task list") };
            // SAFETY: as above, the closure outlives this call.
            let outcome = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(index) }));
            if let Err(payload) = outcome {
                self.panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(payload);
            }
            self.finished.fetch_add(1, Ordering::Release);
        }
    }

    fn work(&self, worker: usize) {
        IN_TASKS.with(|busy| busy.set(true));
        let mut seen = 0;
        loop {
            let list = self.next_list(seen);
            seen = list;
            if worker < self.helpers.load(Ordering::Relaxed) {
                self.take_tasks(list);
            }
        }
    }

    /// Waits for a task list numbered other than `seen` and returns its number.
    fn next_list(&self, seen: u64) -> u64 {
        let current = || unpack(self.claims.load(Ordering::SeqCst)).0;
        let idle_since = Instant::now();
        let mut looks = 0u32;
        loop {
            let list = current();
            if list != seen {
                return list;
            }
            looks = looks.wrapping_add(1);
            if looks.is_multiple_of(64) && idle_since.elapsed() > STAY_AWAKE {
                break;
            }
            std::thread::yield_now();
        }
        let mut guard = self.sleeping.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let mut list = current();
        while list == seen {
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            list = current();
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicU32;
    use std::thread::ThreadId;

    /// Taken by every test: the tests of one binary share the workers, and a test's calls run
    /// on its own thread alone while another's hold them.
    static ONE_TEST_AT_A_TIME: Mutex<()> = Mutex::new(());

    fn one_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        ONE_TEST_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The threads two-thread calls run on: the caller and a worker, if the machine's rayon
    /// pool (which sizes the workers) has more than one thread.
    fn two_threads() -> usize {
        1 + pool().workers.min(1)
    }

    /// Runs `body` with rayon's current pool at `threads` threads.
    fn with_threads<R: Send>(threads: usize, body: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a rayon pool")
            .install(body)
    }

    fn busy(duration: Duration) {
        let start = Instant::now();
        while start.elapsed() < duration {
            std::hint::spin_loop();
        }
    }

    /// The threads of the first of up to 20 calls of 64 tasks of 1 ms that ran on more than
    /// one (a busy virtual machine may start a woken thread only after the 64 ms of a call).
    fn threads_of_a_shared_call() -> HashSet<ThreadId> {
        let mut threads = HashSet::new();
        for _ in 0..20 {
            threads = threads_running(64, Duration::from_millis(1));
            if threads.len() > 1 {
                break;
            }
        }
        threads
    }

    /// The threads that ran `tasks` tasks of `duration` each, after checking each ran once.
    fn threads_running(tasks: usize, duration: Duration) -> HashSet<ThreadId> {
        let runs: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
        let threads = Mutex::new(HashSet::new());
        for_each_task(tasks, |index| {
            busy(duration);
            runs[index].fetch_add(1, Ordering::Relaxed);
            threads.lock().unwrap().insert(std::thread::current().id());
        });
        let counts: Vec<u32> = runs.iter().map(|run| run.load(Ordering::Relaxed)).collect();
        assert_eq!(counts, vec![1; tasks]);
        threads.into_inner().unwrap()
    }

    #[test]
    fn every_task_runs_once_whatever_the_threads() {
        let _alone = one_test_at_a_time();
        for threads in [1, 2, 3] {
            with_threads(threads, || {
                for tasks in [0, 1, 2, 7, 64, 1000] {
                    threads_running(tasks, Duration::ZERO);
                }
            });
        }
    }

    #[test]
    fn a_worker_takes_tasks_before_and_after_sleeping() {
        let _alone = one_test_at_a_time();
        with_threads(2, || {
            let caller = std::thread::current().id();
            for pause in [Duration::ZERO, STAY_AWAKE * 3] {
                std::thread::sleep(pause);
                let threads = threads_of_a_shared_call();
                assert!(threads.contains(&caller), "the caller takes tasks too");
                assert_eq!(threads.len(), two_threads(), "after a pause of {pause:?}");
            }
        });
    }

    #[test]
    fn a_late_worker_never_takes_a_task_of_the_next_list() {
        with_threads(2, || {
            // Lists of changing lengths one right after another: a worker still looking at the
            // last list's claims while the next is being set up must not run a task twice.
            let runs: Vec<AtomicU32> = (0..64).map(|_| AtomicU32::new(0)).collect();
            for list in 0..300_000usize {
                let tasks = 1 + list * 7 % 64;
                for_each_task(tasks, |index| {
                    runs[index].fetch_add(1, Ordering::Relaxed);
                });
                for (index, run) in runs.iter().enumerate() {
                    let expected = u32::from(index < tasks);
                    assert_eq!(run.swap(0, Ordering::Relaxed), expected, "list {list}");
                }
            }
        });
    }

    #[test]
    fn one_thread_runs_every_task_in_order() {
        let _alone = one_test_at_a_time();
        with_threads(1, || {
            let order = Mutex::new(Vec::new());
            for_each_task(5, |index| order.lock().unwrap().push(index));
            assert_eq!(order.into_inner().unwrap(), vec![0, 1, 2, 3, 4]);
        });
    }

    #[test]
    fn tasks_inside_tasks_run_on_their_thread() {
        let _alone = one_test_at_a_time();
        with_threads(2, || {
            let sums: Vec<AtomicU32> = (0..8).map(|_| AtomicU32::new(0)).collect();
            for_each_task(8, |outer| {
                let thread = std::thread::current().id();
                for_each_task(4, |inner| {
                    assert_eq!(std::thread::current().id(), thread);
                    sums[outer].fetch_add(inner as u32 + 1, Ordering::Relaxed);
                });
            });
            let sums: Vec<u32> = sums.iter().map(|sum| sum.load(Ordering::Relaxed)).collect();
            assert_eq!(sums, vec![10; 8]);
        });
    }

    #[test]
    fn callers_on_several_threads_each_get_their_own_results() {
        let _alone = one_test_at_a_time();
        std::thread::scope(|scope| {
            let callers: Vec<_> = (0..4u64)
                .map(|caller| {
                    scope.spawn(move || {
                        let mut values = vec![0u64; 1000];
                        for _ in 0..50 {
                            for_each_chunk_mut(&mut values, 7, |index, chunk| {
                                for (offset, value) in chunk.iter_mut().enumerate() {
                                    *value += caller * 10_000 + (index * 7 + offset) as u64;
                                }
                            });
                        }
                        values
                    })
                })
                .collect();
            for (caller, handle) in callers.into_iter().enumerate() {
                let values = handle.join().unwrap();
                let expected: Vec<u64> = (0..1000u64)
                    .map(|at| 50 * (caller as u64 * 10_000 + at))
                    .collect();
                assert_eq!(values, expected, "caller {caller}");
            }
        });
    }

    #[test]
    fn a_panic_reaches_the_caller_after_every_other_task() {
        let _alone = one_test_at_a_time();
        with_threads(2, || {
            let finished = AtomicU32::new(0);
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                for_each_task(32, |index| {
                    busy(Duration::from_micros(200));
                    assert_ne!(index, 5, "task five fails");
                    finished.fetch_add(1, Ordering::Relaxed);
                })
            }));
            let payload = outcome.expect_err("the task's panic");
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default();
            assert!(message.contains("task five fails"), "{message}");
            assert_eq!(finished.load(Ordering::Relaxed), 31);
            let threads = threads_of_a_shared_call();
            assert_eq!(threads.len(), two_threads(), "the workers still take tasks");
        });
    }

    #[test]
    fn chunks_cover_the_slice_and_the_last_is_shorter() {
        let _alone = one_test_at_a_time();
        with_threads(2, || {
            let mut values = vec![0usize; 10];
            let mut lengths = vec![0usize; 3];
            for_each_chunk_pair_mut(
                (&mut values, 4),
                (&mut lengths, 1),
                |index, chunk, length| {
                    length[0] = chunk.len();
                    chunk.fill(index + 1);
                },
            );
            assert_eq!(values, [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]);
            assert_eq!(lengths, [4, 4, 2]);
        });
    }

    #[test]
    fn mapped_tasks_come_back_in_index_order() {
        let _alone = one_test_at_a_time();
        for threads in [1, 2, 3] {
            with_threads(threads, || {
                for tasks in [0, 1, 5, 100] {
                    let squares = map_tasks(tasks, |index| index * index);
                    assert_eq!(squares, (0..tasks).map(|i| i * i).collect::<Vec<_>>());
                }
            });
        }
    }

    #[test]
    #[should_panic(expected = "as many chunks of one slice as of the other")]
    fn pairs_of_chunks_must_match() {
        let _alone = one_test_at_a_time();
        for_each_chunk_pair_mut((&mut [0u8; 10], 5), (&mut [0u8; 3], 1), |_, _, _| {});
    }
}
