//! One operation at a time per volume or snapshot.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The set of keys with an operation in flight. A second operation on a held key is
/// refused at once (the caller answers ABORTED), never queued.
#[derive(Debug, Default, Clone)]
pub struct Locks {
    held: Arc<Mutex<HashSet<String>>>,
}

/// Releases its key when dropped.
#[derive(Debug)]
pub struct Guard {
    held: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Locks {
    /// Takes `key`, or returns `None` when an operation already holds it.
    pub fn try_acquire(&self, key: &str) -> Option<Guard> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.insert(key.to_owned()).then(|| Guard {
            held: Arc::clone(&self.held),
            key: key.to_owned(),
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_release() {
        let locks = Locks::default();
        let guard = locks.try_acquire("a").unwrap();
        assert!(locks.try_acquire("a").is_none());
        assert!(locks.try_acquire("b").is_some());
        drop(guard);
        assert!(locks.try_acquire("a").is_some());
    }
}
