//! Threads for background CPU work at a lower scheduling priority: a resync's signature checks and auth reads
//! must not take the CPU from a user's `/sync` or send on a small machine. The threads run at nice
//! [`NICE`] (Linux schedules each thread by its own nice value: a nice-5 thread gets about a quarter of a core
//! that a nice-0 thread also wants, and all of an idle one), so background work still runs at full speed when
//! nobody else needs the CPU, and gives way when someone does.
//!
//! Not lower: the priority is against every process of the machine, not only our users' requests. At nice 10 a
//! 100k-member resync beside a CI run's compilers spent 66 s verifying instead of 24-37 s, and a 10k one took 9 s
//! instead of 3-4 s to its full member list, while the users' p99 under that load did not measurably improve
//! (bench/PROFILE.md, round 3).
//!
//! Like tokio's blocking pool this is one pool per process, started on first use: the threads are an executor,
//! not a service, and each caller passes in everything its work needs.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

/// The nice value of the pool's threads (0 is normal, 19 the lowest priority).
pub const NICE: i32 = 5;

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Pool {
    jobs: Mutex<mpsc::Sender<Job>>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("hearth-lowprio-{i}")).spawn(move || {
                lower_this_thread();
                loop {
                    // The lock is held only to take one job, never while running it.
                    let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    job();
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start a low-priority thread");
            }
        }
        Pool { jobs: Mutex::new(tx) }
    })
}

/// Lowers the calling thread's priority to [`NICE`] (Linux: per thread). Failure only costs the priority.
fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take and return plain integers; no memory is shared.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, NICE) != 0 {
            tracing::debug!("could not lower a background thread's priority");
        }
    }
}

/// Runs `f` on a low-priority thread and waits for its result. A panic in `f` is an error here, as a panicking
/// `spawn_blocking` task is.
pub async fn run<R, F>(f: F) -> Result<R, String>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(result.map_err(|_| "background task panicked".to_owned()));
    });
    let sent = pool().jobs.lock().unwrap_or_else(|e| e.into_inner()).send(job);
    if sent.is_err() {
        return Err("no low-priority threads".into());
    }
    rx.await.map_err(|_| "background task was dropped".to_owned())?
}

/// Runs `f` on a thread of its own at [`NICE`] and waits for its result: for long background work that mostly
/// waits (a producer that blocks while its consumer catches up), which would hold one of the pool's few threads.
pub async fn run_alone<R, F>(name: &str, f: F) -> Result<R, String>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            lower_this_thread();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(result.map_err(|_| "background thread panicked".to_owned()));
        })
        .map_err(|e| format!("could not start a thread: {e}"))?;
    rx.await.map_err(|_| "background thread was dropped".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_work_on_niced_threads_and_reports_panics() {
        let (value, nice) = run(|| {
            // SAFETY: as in lower_this_thread.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::syscall(libc::SYS_gettid) as libc::id_t) };
            (6 * 7, nice)
        })
        .await
        .unwrap();
        assert_eq!(value, 42);
        assert!(nice >= NICE, "thread nice {nice}");
        let r: Result<(), String> = run(|| panic!("boom")).await;
        assert!(r.is_err());
        // The pool survives a panicking job.
        assert_eq!(run(|| 1).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn runs_long_work_alone_on_a_niced_thread() {
        // SAFETY: as in lower_this_thread.
        let nice = run_alone("test-alone", || unsafe {
            libc::getpriority(libc::PRIO_PROCESS, libc::syscall(libc::SYS_gettid) as libc::id_t)
        })
        .await
        .unwrap();
        assert!(nice >= NICE, "thread nice {nice}");
        let panicked: Result<(), String> = run_alone("test-alone", || panic!("boom")).await;
        assert!(panicked.is_err());
    }
}
