//! Requests' names in flight in this controller process: a retried or doubled create
//! waits for nothing and makes nothing twice; it is refused (ABORTED) while the first
//! one runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type Held = Arc<Mutex<HashMap<String, Option<String>>>>;

/// The names held, each with the ID it is making once that is known (so a second
/// caller's refusal names the object).
#[derive(Debug, Default)]
pub struct Names {
    held: Held,
}

/// Releases its name when dropped.
pub struct NameGuard {
    held: Held,
    key: String,
}

impl Names {
    /// Takes `key`, or says who holds it: the key, with the ID being made if known.
    pub fn try_acquire(&self, key: String) -> Result<NameGuard, String> {
        let mut held = lock(&self.held);
        if let Some(id) = held.get(&key) {
            return Err(match id {
                Some(id) => format!("{id} ({key})"),
                None => key,
            });
        }
        held.insert(key.clone(), None);
        Ok(NameGuard {
            held: Arc::clone(&self.held),
            key,
        })
    }
}

impl NameGuard {
    /// Records the ID the holder is making.
    pub fn making(&self, id: &str) {
        lock(&self.held).insert(self.key.clone(), Some(id.to_owned()));
    }
}

impl Drop for NameGuard {
    fn drop(&mut self) {
        lock(&self.held).remove(&self.key);
    }
}

fn lock(held: &Held) -> std::sync::MutexGuard<'_, HashMap<String, Option<String>>> {
    held.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_name_is_refused_with_what_it_makes_until_released() {
        let names = Names::default();
        let guard = names.try_acquire("volume name \"a\"".into()).unwrap();
        assert_eq!(
            names.try_acquire("volume name \"a\"".into()).err().unwrap(),
            "volume name \"a\""
        );
        guard.making("v-1");
        assert_eq!(
            names.try_acquire("volume name \"a\"".into()).err().unwrap(),
            "v-1 (volume name \"a\")"
        );
        assert!(names.try_acquire("volume name \"b\"".into()).is_ok());
        drop(guard);
        assert!(names.try_acquire("volume name \"a\"".into()).is_ok());
    }
}
