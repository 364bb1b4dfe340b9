//! Runs external tools. This is the only place that checks exit codes; quirks of a
//! particular tool (an exit code that is not a failure) sit in that tool's wrapper.
//!
//! Every run has a deadline: a tool that hangs (a mount on a dead device, an mkfs
//! stuck in I/O) is killed and its step reported as timed out, instead of holding its
//! volume's lock, and so every retry of the CO, forever.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{Error, Result};

/// How long a tool may run unless its wrapper says otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);

/// How often a running tool is checked on where pidfds are missing.
const POLL: Duration = Duration::from_millis(5);

/// Runs `program` with `args` for at most `deadline`, failing unless it exits with
/// one of `ok_codes`.
pub fn run_within(
    program: &str,
    args: &[&str],
    ok_codes: &[i32],
    deadline: Duration,
) -> Result<Output> {
    tracing::debug!(program, ?args, "running");
    let started = Instant::now();
    let mut command = dying_with_kura(program)?;
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| Error::Spawn {
        program: program.to_owned(),
        source,
    })?;
    // The pipes are drained while the tool runs, so a chatty tool never blocks on a
    // full pipe and looks hung.
    let stdout = drain(child.stdout.take(), program)?;
    let stderr = drain(child.stderr.take(), program)?;
    let status = match wait_within(&mut child, deadline) {
        Ok(status) => status,
        Err(waited) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(waited.map_or_else(
                |source| Error::Spawn {
                    program: program.to_owned(),
                    source,
                },
                |()| Error::Timeout {
                    step: format!("{program} {}", args.join(" ")),
                    seconds: deadline.as_secs(),
                },
            ));
        }
    };
    tracing::debug!(
        program,
        ?status,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "ran"
    );
    let output = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    match output.status.code() {
        Some(code) if ok_codes.contains(&code) => Ok(output),
        _ => Err(Error::Command {
            program: program.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            status: output.status.to_string(),
            stderr: summary(&String::from_utf8_lossy(&output.stderr)),
        }),
    }
}

/// A command that runs `program` and dies with kura: after a crash, the CO's retry
/// must not race a mkfs or a resize that the dead process left running. The child
/// asks for SIGKILL at its parent's death (PR_SET_PDEATHSIG, kept across exec).
///
/// Where util-linux's setpriv can ask for it, the tool is started through
/// `setpriv --pdeathsig KILL`, which sets it and then becomes the tool (same PID): the
/// command then needs no code between fork and exec, so the standard library starts it
/// with posix_spawn (a vfork) instead of a fork that copies kura's page tables and
/// makes every thread of kura pay copy-on-write faults afterwards; with many volumes
/// staged at once that fork was most of the node's CPU time. Without setpriv the
/// child sets it itself, after a fork.
fn dying_with_kura(program: &str) -> Result<Command> {
    let Some(setpriv) = setpriv() else {
        let mut command = Command::new(program);
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed; prctl is one, and it touches no memory
        // of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        return Ok(command);
    };
    // setpriv reports a missing tool only as exit code 127; looked up here, it is the
    // same spawn error as without setpriv.
    let path = find_program(program).ok_or_else(|| Error::Spawn {
        program: program.to_owned(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let mut command = Command::new(setpriv);
    command.args(["--pdeathsig", "KILL", "--"]).arg(path);
    Ok(command)
}

/// setpriv, when it is installed and takes `--pdeathsig` (util-linux 2.33 and later);
/// looked for once.
fn setpriv() -> Option<&'static Path> {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    SETPRIV
        .get_or_init(|| {
            let path = find_program("setpriv")?;
            let works = Command::new(&path)
                .args(["--pdeathsig", "KILL", "--", "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            works.then_some(path)
        })
        .as_deref()
}

/// Where `program` is: itself when it names a path, else the first executable file of
/// that name in `PATH`, as exec would find it.
fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let dirs = std::env::var_os("PATH")?;
    std::env::split_paths(&dirs)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Waits for the child until `deadline`: `Err(Ok(()))` when it passed, `Err(Err(_))`
/// when waiting itself failed. It sleeps on a pidfd, which wakes at the child's exit,
/// so a tool's time is not rounded up to a polling period (nor are the waits of many
/// concurrent stages so many wake-ups); without pidfds (before Linux 5.3) it polls.
fn wait_within(
    child: &mut Child,
    deadline: Duration,
) -> std::result::Result<std::process::ExitStatus, std::result::Result<(), std::io::Error>> {
    let started = Instant::now();
    let exited = pidfd_open(child.id());
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if started.elapsed() >= deadline => return Err(Ok(())),
            Ok(None) => match &exited {
                Some(fd) => wait_readable(fd, deadline.saturating_sub(started.elapsed())),
                None => std::thread::sleep(POLL),
            },
            Err(e) => return Err(Err(e)),
        }
    }
}

/// A descriptor that becomes readable when process `pid` exits.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a process ID and flags and returns a new descriptor, or
    // -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sleeps until `fd` is readable or `timeout` passes (or a signal comes).
fn wait_readable(fd: &OwnedFd, timeout: Duration) {
    let mut watched = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: `watched` is one valid pollfd that outlives the call.
    unsafe { libc::poll(&mut watched, 1, ms) };
}

/// Reads a pipe to its end in a thread of its own.
fn drain(
    pipe: Option<impl Read + Send + 'static>,
    program: &str,
) -> Result<std::thread::JoinHandle<Vec<u8>>> {
    super::thread::spawn(&format!("{program} output"), move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// The first lines of a tool's stderr: enough to say what went wrong, short enough
/// for a kubelet event (some tools print their whole usage text).
fn summary(stderr: &str) -> String {
    const LINES: usize = 4;
    let lines: Vec<&str> = stderr.trim().lines().collect();
    let mut text = lines[..lines.len().min(LINES)].join("; ");
    if lines.len() > LINES {
        text.push_str(" ...");
    }
    text
}

/// Runs `program` with `args`, failing unless it exits with one of `ok_codes`.
pub fn run_accepting(program: &str, args: &[&str], ok_codes: &[i32]) -> Result<Output> {
    run_within(program, args, ok_codes, DEFAULT_DEADLINE)
}

/// Runs `program` with `args`, failing unless it exits with status 0.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    run_accepting(program, args, &[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_carries_program_status_and_stderr() {
        let err = run("sh", &["-c", "echo oops >&2; exit 3"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sh -c"), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("oops"), "{text}");
    }

    #[test]
    fn accepted_exit_codes_are_success() {
        let out = run_accepting("sh", &["-c", "echo hi; exit 2"], &[0, 2]).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        assert!(matches!(
            run("kura-no-such-program", &[]),
            Err(Error::Spawn { .. })
        ));
    }

    #[test]
    fn a_hung_tool_is_killed_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!("echo $$ > {}; exec sleep 600", pid_file.display());
        let err = run_within("sh", &["-c", &script], &[0], Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("sleep 600"), "{err}");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The tool is gone (killed and reaped), not left running.
        assert_eq!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
    }

    #[test]
    fn plenty_of_output_does_not_stall_a_tool() {
        let out = run("sh", &["-c", "head -c 1000000 /dev/zero; echo done >&2"]).unwrap();
        assert_eq!(out.stdout.len(), 1_000_000);
    }
}
