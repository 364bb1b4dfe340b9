//! The real `kura` binary run as a child process on a temporary directory, for tests
//! that kill it, stop it with a signal, or restart it.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kura::csi::proto;
use kura::csi::proto::identity_client::IdentityClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::Channel;

use super::{PausePoints, PoolKind, all_in_one_args, cleanup, pool_root, test_dir};

/// How long the binary may take to come up or to stop.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// The `kura` binary as a child process. Drop kills the child (only the one this
/// started) and removes its mounts, loop devices and files.
pub struct Kura {
    pub dir: PathBuf,
    pub socket: PathBuf,
    args: Vec<String>,
    child: Option<std::process::Child>,
    runs: usize,
    /// The binary's test pause points (`KURA_TEST_PAUSE_DIR` points here).
    pub pause: PausePoints,
}

impl Kura {
    /// `pool`: `Image` is XFS with reflinks; `Dir` is /tmp's own filesystem (ext4
    /// here), without reflinks, so clones and restores are real data copies.
    pub fn new(pool: PoolKind) -> Kura {
        Self::with_args(pool, &[])
    }

    /// Like [`Kura::new`], with more flags after the harness's own.
    pub fn with_args(pool: PoolKind, extra: &[&str]) -> Kura {
        let dir = test_dir();
        let socket = dir.join("csi.sock");
        let mut args = all_in_one_args(&dir, &socket, &pool);
        args.extend(extra.iter().map(|s| s.to_string()));
        let pause = PausePoints::new(&dir.join("pause"));
        Kura {
            dir,
            socket,
            args,
            child: None,
            runs: 0,
            pause,
        }
    }

    pub fn pool_root(&self) -> PathBuf {
        pool_root(&self.dir, &self.args)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Starts the binary and waits until it answers Probe on its socket.
    pub async fn start(&mut self) -> Channel {
        assert!(self.child.is_none(), "kura is already running");
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kura"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env(kura::sys::pause::ENV, self.pause.dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("kura starts");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("kura exited on start ({status}):\n{}", self.logs());
            }
            if let Ok(channel) = kura::csi::client::connect(&self.socket).await
                && IdentityClient::new(channel.clone())
                    .probe(proto::ProbeRequest {})
                    .await
                    .is_ok()
            {
                return channel;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "kura did not come up:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash or an OOM kill would stop it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as the kubelet stops a pod; returns the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("kura is running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if started.elapsed() > DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kura ignored SIGTERM:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.dir.join(format!("kura-{run}.log"))
    }

    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|run| {
                let text = std::fs::read_to_string(self.log_path(run)).unwrap_or_default();
                format!("--- kura run {run} ---\n{text}")
            })
            .collect()
    }
}

impl Drop for Kura {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        cleanup(&self.dir);
    }
}
