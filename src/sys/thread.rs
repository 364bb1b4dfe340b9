//! Threads for blocking work: started without panicking when the OS refuses one, and
//! waited for with a deadline when the work may hang.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Error, Result};

/// Starts `work` in a thread of its own; the OS refusing one is an error, not a panic.
pub fn spawn<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(what.chars().take(15).collect())
        .spawn(work)
        .map_err(|source| Error::Thread {
            what: what.to_owned(),
            source,
        })
}

/// Makes the calling thread yield to everything else on the node: nice 10 for the
/// CPU, and the lowest best-effort I/O priority (never the idle class, which a volume
/// busy all the time would starve for good). For background work that competes with
/// the volumes' own I/O (shipping replicas). Best effort: a refusal is logged.
pub fn lower_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on this thread's own ID; no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "setpriority");
    }
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    let lowest_best_effort = (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 7;
    // SAFETY: ioprio_set on this thread's own ID with a valid priority value; no
    // memory is passed.
    let set = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            lowest_best_effort,
        )
    };
    if set != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "ioprio_set");
    }
}

/// Where a bounded step's result meets its caller.
enum Slot<T> {
    Waiting,
    Done(Result<T>),
    GaveUp,
}

/// Runs blocking `work` (a system call that can hang: a freeze of a busy filesystem)
/// and waits for it at most `deadline`. When the deadline passes first, the error
/// names `step`, and `undo` runs on the work's result whenever it does come, so a late
/// success is rolled back (a freeze that lands after its caller gave up is thawed).
pub fn within<T: Send + 'static>(
    step: &str,
    deadline: Duration,
    work: impl FnOnce() -> Result<T> + Send + 'static,
    undo: impl FnOnce(T) + Send + 'static,
) -> Result<T> {
    let shared = Arc::new((Mutex::new(Slot::Waiting), Condvar::new()));
    let worker = Arc::clone(&shared);
    spawn(step, move || {
        let result = work();
        let (slot, ready) = &*worker;
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*slot, Slot::GaveUp) {
            drop(slot);
            if let Ok(value) = result {
                undo(value);
            }
        } else {
            *slot = Slot::Done(result);
            ready.notify_one();
        }
    })?;
    let (slot, ready) = &*shared;
    let guard = slot.lock().unwrap_or_else(|e| e.into_inner());
    let (mut guard, _) = ready
        .wait_timeout_while(guard, deadline, |s| matches!(s, Slot::Waiting))
        .unwrap_or_else(|e| e.into_inner());
    match std::mem::replace(&mut *guard, Slot::GaveUp) {
        Slot::Done(result) => result,
        Slot::Waiting | Slot::GaveUp => Err(Error::Timeout {
            step: step.to_owned(),
            seconds: deadline.as_secs(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_prompt_step_returns_its_result() {
        let value = within("quick", Duration::from_secs(10), || Ok(7), |_| {}).unwrap();
        assert_eq!(value, 7);
    }

    #[test]
    fn a_late_step_times_out_and_is_undone_when_it_lands() {
        let (release, hold) = mpsc::channel::<()>();
        let (undone, was_undone) = mpsc::channel();
        let err = within(
            "slow step",
            Duration::from_millis(50),
            move || {
                let _ = hold.recv();
                Ok(42)
            },
            move |v| undone.send(v).unwrap(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("slow step"), "{err}");
        release.send(()).unwrap();
        assert_eq!(was_undone.recv_timeout(Duration::from_secs(10)), Ok(42));
    }
}
