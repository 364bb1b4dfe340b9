//! Generates the gRPC code for the CSI contract and for kura's own agent API. protox
//! compiles the proto files in pure Rust, so building kura needs no system protoc.
//! Also records the source revision for `kura_build_info` (`KURA_REVISION`).

use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/csi.proto", "proto/agent.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Chunk data is passed on without copying it into a Vec.
        .bytes(".kura.agent.v1.ExportChunk.data")
        .compile_fds(descriptors)?;
    println!("cargo:rustc-env=KURA_REVISION={}", revision());
    Ok(())
}

/// The revision the build is made from: `git rev-parse HEAD` in a git checkout (CI
/// builds from a clone), else `KURA_REVISION` from the environment (a build from a
/// source archive), else "unknown".
fn revision() -> String {
    println!("cargo:rerun-if-env-changed=KURA_REVISION");
    if let Some(head) = git(&["rev-parse", "HEAD"]) {
        // Built again when HEAD moves: HEAD itself, the branch it names, packed refs.
        let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
        watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
        for name in watched {
            // A path that does not exist would make every build run this again.
            if let Some(path) = git(&["rev-parse", "--git-path", &name])
                && std::path::Path::new(&path).exists()
            {
                println!("cargo:rerun-if-changed={path}");
            }
        }
        return head;
    }
    std::env::var("KURA_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A git command's output, trimmed; `None` if git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}
