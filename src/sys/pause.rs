//! Test-only pause points: named places in long operations where a test can hold the
//! process, so that "an operation is in flight" or "the process dies at exactly this
//! instant" does not depend on how fast the machine is.
//!
//! They are off unless the environment variable [`ENV`] names a directory, which
//! production never sets (the in-process test harness passes the directory directly).
//! When on, a point named `p` holds the first operation that reaches it while the file
//! `<dir>/p` exists (others pass): the test creates it (arms the point), waits for
//! `<dir>/p.reached` to appear, does what it checks
//! (calls that must see the operation in flight, or a SIGKILL), and removes `<dir>/p`
//! to let the operation go on. A point that is not armed costs one `stat`.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The variable that turns pause points on, naming their directory. Test-only.
pub const ENV: &str = "KURA_TEST_PAUSE_DIR";

/// How often a paused operation looks whether it has been released.
const POLL: Duration = Duration::from_millis(10);

/// The pause points of one process (or of one in-process test driver).
#[derive(Debug, Clone, Default)]
pub struct Points {
    dir: Option<PathBuf>,
}

impl Points {
    /// Off: every point is a no-op. What production runs.
    pub fn off() -> Self {
        Points { dir: None }
    }

    /// On, with points armed by files in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Points {
            dir: Some(dir.to_owned()),
        }
    }

    /// From [`ENV`]: off unless a test set it.
    pub fn from_env() -> Self {
        match std::env::var_os(ENV) {
            Some(dir) if !dir.is_empty() => {
                tracing::warn!(dir = ?dir, "test pause points are on ({ENV} is set)");
                Points::in_dir(Path::new(&dir))
            }
            _ => Points::off(),
        }
    }

    /// Whether the one-shot hook `name` is armed; taking it disarms it (removes the
    /// file), so it fires once. What a test uses to make a fault happen exactly once
    /// (a chunk damaged in flight).
    pub fn take(&self, name: &str) -> bool {
        let Some(dir) = &self.dir else {
            return false;
        };
        let fired = std::fs::remove_file(dir.join(name)).is_ok();
        if fired {
            tracing::warn!(hook = name, "test hook fired");
        }
        fired
    }

    /// Pauses here while the point `name` is armed.
    pub fn at(&self, name: &str) {
        let Some(dir) = &self.dir else {
            return;
        };
        let armed = dir.join(name);
        if !armed.exists() {
            return;
        }
        // One operation is held at a time; others pass, so a test that checks a lock
        // sees a second operation go through (and fail the test) when the lock is gone.
        let reached = dir.join(format!("{name}.reached"));
        let held = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&reached);
        if held.is_err() {
            return;
        }
        tracing::warn!(
            point = name,
            "test pause point reached; waiting for its release"
        );
        while armed.exists() {
            std::thread::sleep(POLL);
        }
        let _ = std::fs::remove_file(&reached);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn an_armed_point_holds_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let points = Points::in_dir(dir.path());
        points.at("not-armed");
        Points::off().at("anything");

        std::fs::write(dir.path().join("p"), b"").unwrap();
        let worker = {
            let points = points.clone();
            std::thread::spawn(move || points.at("p"))
        };
        let reached = dir.path().join("p.reached");
        let started = Instant::now();
        while !reached.exists() {
            assert!(started.elapsed() < Duration::from_secs(10), "never reached");
            std::thread::sleep(POLL);
        }
        assert!(!worker.is_finished(), "an armed point let the worker go");
        // A second operation passes while the first is held.
        points.at("p");
        std::fs::remove_file(dir.path().join("p")).unwrap();
        worker.join().unwrap();
        assert!(
            !reached.exists(),
            "the reached marker is left after release"
        );
    }
}
