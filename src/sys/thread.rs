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
