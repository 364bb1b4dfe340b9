//! The real `kura` binary as child processes: one [`Proc`] for every role (all-in-one,
//! node, controller), started and waited for on its CSI socket, stopped by its PID as a
//! test needs (SIGKILL, SIGTERM, SIGSTOP and SIGCONT), and killed when dropped, also
//! when the test fails. [`Kura`] is an all-in-one process on a test directory of its
//! own; the split roles are in [`super::cluster`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kura::csi::proto;
use kura::csi::proto::identity_client::IdentityClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::Channel;

use super::{
    Csi, PausePoints, PoolKind, RemoveOnDrop, SOCKET, all_in_one_args, lazy_channel, node_topology,
    pool_root, test_dir,
};

/// How long a process may take to come up or to stop.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// One `kura` child process, its CSI socket and its logs (one file per run).
pub struct Proc {
    pub name: String,
    pub args: Vec<String>,
    /// Where its logs and pause points are, and where [`Csi::path`] points.
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    runs: usize,
    /// The process's test pause points (`KURA_TEST_PAUSE_DIR` points here).
    pub pause: PausePoints,
}

impl Proc {
    pub fn new(name: &str, dir: &Path, socket: PathBuf, args: Vec<String>) -> Proc {
        Proc {
            name: name.to_owned(),
            args,
            dir: dir.to_owned(),
            socket,
            child: None,
            runs: 0,
            pause: PausePoints::new(&dir.join(format!("{name}-pause"))),
        }
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.dir.join(format!("{}-{run}.log", self.name))
    }

    /// Starts the process and waits until its socket answers Probe; returns the
    /// channel that got the answer. Panics with the logs if it exits or never answers.
    pub async fn start(&mut self) -> Channel {
        assert!(self.child.is_none(), "{} is already running", self.name);
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kura"))
            .args(&self.args)
            .env("RUST_LOG", "info,kura=debug")
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
                panic!("{} exited on start ({status}):\n{}", self.name, self.logs());
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
                "{} did not come up:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
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
        kill(self.pid(), Signal::SIGTERM).expect("SIGTERM");
        let mut child = self.child.take().unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if started.elapsed() > DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} ignored SIGTERM:\n{}", self.name, self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGSTOP, returning once every thread of the process has stopped: the signal
    /// is delivered as each thread next runs, and a thread still running could answer
    /// one more call.
    pub fn stop_signal(&self) {
        kill(self.pid(), Signal::SIGSTOP).expect("SIGSTOP");
        let tasks = format!("/proc/{}/task", self.pid());
        let all_stopped = || {
            std::fs::read_dir(&tasks).unwrap().flatten().all(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|rest| rest.trim().chars().next());
                matches!(state, Some('T') | Some('t'))
            })
        };
        let started = Instant::now();
        while !all_stopped() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} did not stop",
                self.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn continue_signal(&self) {
        kill(self.pid(), Signal::SIGCONT).expect("SIGCONT");
    }

    /// Available capacity the process reports for one node's segment.
    pub async fn capacity(&self, node_id: &str) -> i64 {
        self.controller()
            .get_capacity(proto::GetCapacityRequest {
                accessible_topology: Some(node_topology(node_id)),
                ..Default::default()
            })
            .await
            .expect("GetCapacity")
            .into_inner()
            .available_capacity
    }

    /// Waits until a controller reports capacity for every one of `nodes`.
    pub async fn wait_for_nodes(&self, nodes: &[&str]) {
        let started = Instant::now();
        for node in nodes {
            while self.capacity(node).await == 0 {
                assert!(
                    started.elapsed() < DEADLINE,
                    "the controller did not find {node}:\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Every run's logs, each under a `--- <name> run <n> ---` line.
    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|run| {
                let text = std::fs::read_to_string(self.log_path(run)).unwrap_or_default();
                format!("--- {} run {run} ---\n{text}", self.name)
            })
            .collect()
    }
}

impl Csi for Proc {
    fn channel(&self) -> Channel {
        lazy_channel(&self.socket)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process still dies of SIGKILL; SIGCONT first anyway so
            // nothing lingers half-stopped.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
        }
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Makes `$role`, a struct with a `proc` field, a [`Proc`] with more: it derefs to
/// its process, and is [`Csi`] as its process is.
macro_rules! is_a_proc {
    ($role:ty) => {
        impl $crate::common::Csi for $role {
            fn channel(&self) -> tonic::transport::Channel {
                self.proc.channel()
            }

            fn path(&self, name: &str) -> std::path::PathBuf {
                self.proc.path(name)
            }
        }

        impl std::ops::Deref for $role {
            type Target = $crate::common::process::Proc;

            fn deref(&self) -> &Self::Target {
                &self.proc
            }
        }

        impl std::ops::DerefMut for $role {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.proc
            }
        }
    };
}

/// `kura all-in-one` as a child process on a test directory of its own. Dropped, it
/// kills the child, then removes the directory's mounts, loop devices and files.
pub struct Kura {
    proc: Proc,
    // After the process: it holds what the cleanup removes.
    _dir: RemoveOnDrop,
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
        let socket = dir.join(SOCKET);
        let mut args = all_in_one_args(&dir, &socket, &pool);
        args.extend(extra.iter().map(|s| s.to_string()));
        Kura {
            proc: Proc::new("kura", &dir, socket, args),
            _dir: RemoveOnDrop(dir),
        }
    }

    pub fn pool_root(&self) -> PathBuf {
        pool_root(&self.dir, &self.args)
    }
}

is_a_proc!(Kura);
