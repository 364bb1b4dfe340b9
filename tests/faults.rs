//! Fault injection: the real `kura` binary under a mixed concurrent workload, killed
//! with SIGKILL at random instants, round after round. After each restart every call
//! that was in flight is retried, as the CO retries, and the invariants are checked:
//!
//! - the retried call succeeds;
//! - no volume's filesystem is left frozen;
//! - every volume and snapshot that was acknowledged exists, and nothing that was
//!   acknowledged deleted does;
//! - every write that was fsynced reads back;
//!
//! and at the end, once every lane has deleted what it made, nothing is left: no file
//! in the pool, no attachment record, no mount, no loop device.
//!
//! `KURA_FAULT_ROUNDS` sets the number of rounds (10 by default), `KURA_FAULT_SEED`
//! replays a run (the seed is printed).

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::process::Kura;
use common::*;
use kura::csi::proto;
use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::node_client::NodeClient;
use tonic::Code;
use tonic::transport::Channel;

/// Workloads running at once.
const LANES: usize = 3;
/// Volume sizes: XFS (which grows online here) needs 300 MiB at least.
const SIZE: i64 = 320 * MIB;
const GROWN: i64 = 384 * MIB;
/// Bytes of the file each generation of a lane writes and fsyncs.
const DATA: usize = 256 << 10;

/// One volume's life, as a lane lives it, generation after generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Create,
    Stage,
    Publish,
    Write,
    Snapshot,
    Restore,
    StageRestored,
    CheckRestored,
    UnstageRestored,
    DeleteRestored,
    Clone,
    DeleteClone,
    Expand,
    NodeExpand,
    Unpublish,
    Unstage,
    DeleteSnapshot,
    Delete,
}

const LIFE: [Step; 18] = [
    Step::Create,
    Step::Stage,
    Step::Publish,
    Step::Write,
    Step::Snapshot,
    Step::Restore,
    Step::StageRestored,
    Step::CheckRestored,
    Step::UnstageRestored,
    Step::DeleteRestored,
    Step::Clone,
    Step::DeleteClone,
    Step::Expand,
    Step::NodeExpand,
    Step::Unpublish,
    Step::Unstage,
    Step::DeleteSnapshot,
    Step::Delete,
];

/// xorshift64*: enough randomness for kill instants, and replayable from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn xfs() -> proto::VolumeCapability {
    mount_cap("xfs")
}

/// A workload: where it is in its volume's life.
struct Lane {
    index: usize,
    generation: u32,
    next: usize,
    dir: PathBuf,
}

impl Lane {
    fn step(&self) -> Step {
        LIFE[self.next]
    }

    fn advance(&mut self) {
        self.next += 1;
        if self.next == LIFE.len() {
            self.next = 0;
            self.generation += 1;
        }
    }

    /// Whether this generation has finished `step`.
    fn done(&self, step: Step) -> bool {
        LIFE[..self.next].contains(&step)
    }

    fn name(&self, what: &str) -> String {
        format!("l{}-g{}-{what}", self.index, self.generation)
    }

    fn volume_id(&self, what: &str) -> String {
        volume_id(&self.name(what)).to_string()
    }

    fn snapshot_id(&self) -> String {
        snapshot_id(&self.name("snap")).to_string()
    }

    fn staging(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{}-stage", self.name(what)))
    }

    fn target(&self) -> PathBuf {
        self.dir.join(format!("{}-target", self.name("vol")))
    }

    fn data(&self) -> Vec<u8> {
        pattern(
            (self.index as u8).wrapping_mul(40) ^ self.generation as u8,
            DATA,
        )
    }

    fn create_request(
        &self,
        what: &str,
        source: Option<proto::VolumeContentSource>,
    ) -> proto::CreateVolumeRequest {
        let mut request = create_request(&self.name(what), SIZE, &[], source);
        request.volume_capabilities = vec![xfs()];
        request
    }

    /// Runs one step against the driver behind `channel`.
    async fn run(&self, step: Step, channel: &Channel) -> Result<(), String> {
        let mut controller = ControllerClient::new(channel.clone());
        let mut node = NodeClient::new(channel.clone());
        let vol = self.volume_id("vol");
        let restored = self.volume_id("restored");
        match step {
            Step::Create => outcome(
                controller
                    .create_volume(self.create_request("vol", None))
                    .await,
            ),
            Step::Stage => {
                std::fs::create_dir_all(self.staging("vol")).unwrap();
                outcome(
                    node.node_stage_volume(stage_request(&vol, self.staging("vol"), &xfs()))
                        .await,
                )
            }
            Step::Publish => outcome(
                node.node_publish_volume(publish_request(
                    &vol,
                    self.staging("vol"),
                    self.target(),
                    &xfs(),
                    false,
                ))
                .await,
            ),
            Step::Write => {
                let (path, data) = (self.target().join("data"), self.data());
                // Blocks while the filesystem is frozen: a kill mid-snapshot holds it
                // until the restart thaws it.
                tokio::task::spawn_blocking(move || write_file(&path, &data))
                    .await
                    .map_err(|e| format!("write: {e}"))
            }
            Step::Snapshot => {
                let snapshot = controller
                    .create_snapshot(snapshot_request(&self.name("snap"), &vol))
                    .await
                    .map_err(refusal)?
                    .into_inner()
                    .snapshot
                    .unwrap();
                match snapshot.ready_to_use {
                    true => Ok(()),
                    false => Err("a reflink snapshot was not ready".into()),
                }
            }
            Step::Restore => outcome(
                controller
                    .create_volume(
                        self.create_request("restored", Some(snapshot_source(&self.snapshot_id()))),
                    )
                    .await,
            ),
            Step::StageRestored => {
                std::fs::create_dir_all(self.staging("restored")).unwrap();
                let staging = self.staging("restored");
                outcome(
                    node.node_stage_volume(stage_request(&restored, staging, &xfs()))
                        .await,
                )
            }
            Step::CheckRestored => {
                let path = self.staging("restored").join("data");
                let data = self.data();
                let read = tokio::task::spawn_blocking(move || std::fs::read(&path))
                    .await
                    .unwrap();
                match read {
                    Ok(bytes) if bytes == data => Ok(()),
                    Ok(_) => Err("the restored snapshot holds other data".into()),
                    Err(e) => Err(format!("reading the restored data: {e}")),
                }
            }
            Step::UnstageRestored => outcome(
                node.node_unstage_volume(unstage_request(&restored, self.staging("restored")))
                    .await,
            ),
            Step::DeleteRestored => outcome(
                controller
                    .delete_volume(delete_volume_request(&restored))
                    .await,
            ),
            Step::Clone => outcome(
                controller
                    .create_volume(self.create_request("clone", Some(volume_source(&vol))))
                    .await,
            ),
            Step::DeleteClone => outcome(
                controller
                    .delete_volume(delete_volume_request(&self.volume_id("clone")))
                    .await,
            ),
            Step::Expand => outcome(
                controller
                    .controller_expand_volume(proto::ControllerExpandVolumeRequest {
                        volume_capability: Some(xfs()),
                        ..expand_request(&vol, GROWN, 0)
                    })
                    .await,
            ),
            Step::NodeExpand => outcome(
                node.node_expand_volume(proto::NodeExpandVolumeRequest {
                    staging_target_path: self.staging("vol").display().to_string(),
                    volume_capability: Some(xfs()),
                    ..node_expand_request(&vol, self.target(), GROWN, 0)
                })
                .await,
            ),
            Step::Unpublish => outcome(
                node.node_unpublish_volume(unpublish_request(&vol, self.target()))
                    .await,
            ),
            Step::Unstage => outcome(
                node.node_unstage_volume(unstage_request(&vol, self.staging("vol")))
                    .await,
            ),
            Step::DeleteSnapshot => outcome(
                controller
                    .delete_snapshot(delete_snapshot_request(&self.snapshot_id()))
                    .await,
            ),
            Step::Delete => outcome(controller.delete_volume(delete_volume_request(&vol)).await),
        }
    }

    /// Checks that what this generation has made and not deleted exists, what it
    /// deleted does not, and its fsynced data reads back.
    async fn check(&self, channel: &Channel) -> Result<(), String> {
        let mut controller = ControllerClient::new(channel.clone());
        let live = |made: Step, gone: Step| self.done(made) && !self.done(gone);
        for (what, made, gone) in [
            ("vol", Step::Create, Step::Delete),
            ("restored", Step::Restore, Step::DeleteRestored),
            ("clone", Step::Clone, Step::DeleteClone),
        ] {
            let id = self.volume_id(what);
            let found = controller
                .controller_get_volume(get_volume_request(&id))
                .await;
            match (live(made, gone), found) {
                (true, Ok(found)) => {
                    let volume = found.into_inner().volume.unwrap();
                    let want = if what == "vol" && self.done(Step::Expand) {
                        GROWN
                    } else {
                        SIZE
                    };
                    if volume.capacity_bytes != want {
                        return Err(format!(
                            "{what} {id} has {} bytes, not {want}",
                            volume.capacity_bytes
                        ));
                    }
                }
                (false, Err(e)) if e.code() == Code::NotFound => {}
                (true, Err(e)) => {
                    return Err(format!("acknowledged {what} {id} is missing: {e:?}"));
                }
                (false, Ok(_)) => return Err(format!("deleted or never made {what} {id} exists")),
                (false, Err(e)) => return Err(format!("{what} {id}: {e:?}")),
            }
        }
        let snapshots = controller
            .list_snapshots(proto::ListSnapshotsRequest {
                snapshot_id: self.snapshot_id(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("ListSnapshots: {e:?}"))?
            .into_inner()
            .entries;
        match (
            live(Step::Snapshot, Step::DeleteSnapshot),
            snapshots.as_slice(),
        ) {
            (true, [entry]) if entry.snapshot.as_ref().is_some_and(|s| s.ready_to_use) => {}
            (false, []) => {}
            (expected, listed) => {
                return Err(format!("snapshot expected {expected}, listed {listed:?}"));
            }
        }
        if live(Step::Write, Step::Unstage) {
            let path = self.staging("vol").join("data");
            let data = self.data();
            let read = tokio::task::spawn_blocking(move || std::fs::read(&path))
                .await
                .unwrap();
            if read.as_ref().ok() != Some(&data) {
                return Err(format!("fsynced data does not read back: {:?}", read.err()));
            }
        }
        Ok(())
    }
}

/// A call's outcome as a step's: a refusal's code and message.
fn outcome<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Result<(), String> {
    result.map(drop).map_err(refusal)
}

fn refusal(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Runs the lane's steps until `stop` is set or a step fails (the process was killed
/// under it); returns the lane and the step that was interrupted.
async fn live(
    mut lane: Lane,
    channel: Channel,
    stop: Arc<AtomicBool>,
) -> (Lane, Option<(Step, String)>) {
    while !stop.load(Ordering::SeqCst) {
        let step = lane.step();
        match lane.run(step, &channel).await {
            Ok(()) => lane.advance(),
            Err(e) => return (lane, Some((step, e))),
        }
    }
    (lane, None)
}

#[tokio::test(flavor = "multi_thread")]
async fn random_kills_under_a_mixed_workload_break_no_invariant() {
    let rounds = env_number("KURA_FAULT_ROUNDS").unwrap_or(10);
    let seed = env_number("KURA_FAULT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    eprintln!("fault injection: {rounds} rounds, KURA_FAULT_SEED={seed}");
    let mut rng = Rng(seed);
    let mut kura = Kura::new(PoolKind::Image);
    let pool = kura.pool_root();
    let mut channel = kura.start().await;
    let mut lanes: Vec<Lane> = (0..LANES)
        .map(|index| Lane {
            index,
            generation: 0,
            next: 0,
            dir: kura.dir.clone(),
        })
        .collect();
    let mut retried = Vec::new();

    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let running: Vec<_> = lanes
            .drain(..)
            .map(|lane| tokio::spawn(live(lane, channel.clone(), Arc::clone(&stop))))
            .collect();
        tokio::time::sleep(Duration::from_millis(30 + rng.below(900))).await;
        stop.store(true, Ordering::SeqCst);
        kura.kill();
        channel = kura.start().await;
        let context = |lane: &Lane| {
            format!(
                "round {round}, seed {seed}, lane {} gen {}",
                lane.index, lane.generation
            )
        };

        for task in running {
            let (mut lane, interrupted) = task.await.unwrap();
            if let Some((step, error)) = interrupted {
                // Only the kill may fail a call: a step that failed otherwise is a bug
                // that its retry would hide.
                assert!(
                    ["Unavailable", "Unknown", "Cancelled"]
                        .iter()
                        .any(|code| error.starts_with(code)),
                    "{}: {step:?} failed with more than the kill: {error}",
                    context(&lane)
                );
                // The CO retries what was in flight; the retry must succeed.
                if let Err(again) = lane.run(step, &channel).await {
                    panic!(
                        "{}: {step:?} was interrupted ({error}) and its retry failed: {again}",
                        context(&lane)
                    );
                }
                retried.push(step);
                lane.advance();
            }
            lanes.push(lane);
        }
        for mount in kura::sys::mountinfo::read().unwrap() {
            if mount.mount_point.starts_with(&kura.dir) && mount.mount_point != pool {
                assert!(
                    !is_frozen(&mount.mount_point),
                    "round {round}, seed {seed}: {} is frozen after the restart",
                    mount.mount_point.display()
                );
            }
        }
        for lane in &lanes {
            if let Err(e) = lane.check(&channel).await {
                panic!("{}, at {:?}: {e}", context(lane), lane.step());
            }
        }
    }
    eprintln!(
        "{} calls interrupted by kills and retried: {retried:?}",
        retried.len()
    );

    // Each lane finishes its volume's life: everything it made is deleted.
    for lane in &mut lanes {
        while lane.next != 0 {
            let step = lane.step();
            if let Err(e) = lane.run(step, &channel).await {
                panic!("lane {} finishing at {step:?}: {e}", lane.index);
            }
            lane.advance();
        }
    }
    assert_eq!(
        leftovers(&kura.dir, &pool),
        Vec::<String>::new(),
        "seed {seed}"
    );
}
