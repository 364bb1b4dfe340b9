//! Runs external tools. This is the only place that checks exit codes; quirks of a
//! particular tool (an exit code that is not a failure) sit in that tool's wrapper.

use std::process::{Command, Output, Stdio};

use super::{Error, Result};

/// Runs `program` with `args`, failing unless it exits with one of `ok_codes`.
pub fn run_accepting(program: &str, args: &[&str], ok_codes: &[i32]) -> Result<Output> {
    tracing::debug!(program, ?args, "running");
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: program.to_owned(),
            source,
        })?;
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
}
