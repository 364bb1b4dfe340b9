//! NodeUnstageVolume returns only once the volume's loop device is really detached, so
//! a DeleteVolume right after it succeeds. Unstages of several volumes at once are the
//! case that used to fail: each stage and unstage looks through every bound loop
//! device (opening it for LOOP_GET_STATUS64), and a LOOP_CLR_FD while another thread
//! holds the device open only marks it for the kernel to detach at that thread's last
//! close, which could come after the unstage had answered.
//!
//! That other opener holds a device for microseconds, so the race shows only now and
//! then, on a loaded machine. To make it show every time, the test itself plays the
//! other opener for some of the volumes: it opens their loop devices read-only just
//! before the unstages and closes them a moment later, from another thread.

mod common;

use std::time::Duration;

use common::*;
use futures_util::future::join_all;

/// Volumes staged and unstaged at once, per round.
const VOLUMES: usize = 16;
/// Rounds: the race is a matter of timing, so it is given several chances to show.
const ROUNDS: usize = 3;
/// Every this many volumes, the test holds the loop device open across the unstage.
const HELD_EVERY: usize = 4;
/// How long it holds it: well past an unstage's own time, well within the deadline
/// kura waits for a detach.
const HOLD: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_unstage_detaches_before_answering_so_delete_succeeds_at_once() {
    let driver = Driver::start().await;
    for round in 0..ROUNDS {
        let mut ids = Vec::new();
        for i in 0..VOLUMES {
            let name = format!("detach-{round}-{i}");
            // Half raw block, half ext4 mounts: both detach the same way.
            let volume = driver.create_volume(&name, 64 * MIB, &[]).await;
            ids.push((volume.volume_id, name, i % 2 == 0));
        }
        let staged = join_all(ids.iter().map(|(id, name, block)| {
            let cap = if *block {
                block_cap()
            } else {
                mount_cap("ext4")
            };
            let (driver, id, name) = (&driver, id.clone(), name.clone());
            async move {
                let (staging, target) = driver.stage_and_publish(&id, &cap, &name).await;
                (id, staging, target)
            }
        }))
        .await;
        let volumes = driver.pool_root().join("volumes");
        let holders: Vec<_> = staged
            .iter()
            .step_by(HELD_EVERY)
            .map(|(id, _, _)| {
                let image = volumes.join(format!("{id}.img"));
                let device = kura::sys::loopdev::find_by_backing(&image)
                    .unwrap()
                    .expect("a staged volume has a loop device")
                    .path;
                let held = std::fs::File::open(&device).expect("open the loop device");
                std::thread::spawn(move || {
                    std::thread::sleep(HOLD);
                    drop(held);
                })
            })
            .collect();
        join_all(
            staged
                .iter()
                .map(|(id, staging, target)| driver.unpublish_and_unstage(id, staging, target)),
        )
        .await;
        // No pause between the unstages' answers and the deletes: that is the point.
        let deleted = join_all(staged.iter().map(|(id, _, _)| {
            let mut controller = driver.controller();
            let id = id.clone();
            async move {
                let answer = controller.delete_volume(delete_volume_request(&id)).await;
                (id, answer)
            }
        }))
        .await;
        for holder in holders {
            holder.join().unwrap();
        }
        for (id, answer) in deleted {
            if let Err(status) = answer {
                panic!(
                    "round {round}: DeleteVolume of {id} right after its unstage: {:?} {}",
                    status.code(),
                    status.message()
                );
            }
        }
        let prefix = driver.pool_root().join("volumes").display().to_string();
        let left: Vec<_> = kura::sys::loopdev::list_bound()
            .unwrap()
            .into_iter()
            .filter(|d| d.backing_name.starts_with(&prefix))
            .map(|d| d.path)
            .collect();
        assert!(
            left.is_empty(),
            "round {round}: loop devices of deleted volumes: {left:?}"
        );
    }
}
