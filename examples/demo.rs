//! One volume's life, driven over a running kura's CSI socket, the way the kubelet and
//! the external-provisioner drive it: create, stage, publish, write, read back,
//! unpublish, unstage, delete.
//!
//!     demo unix:///var/lib/kura-demo/csi.sock /var/lib/kura-demo/work

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kura::csi::proto::controller_client::ControllerClient;
use kura::csi::proto::identity_client::IdentityClient;
use kura::csi::proto::node_client::NodeClient;
use kura::csi::proto::{self, volume_capability};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(endpoint), Some(work)) = (args.next(), args.next()) else {
        return Err("usage: demo unix:///path/csi.sock WORK_DIR".into());
    };
    let socket = kura::server::socket_path(&endpoint).map_err(|e| e.to_string())?;
    let work = PathBuf::from(work);
    let channel = kura::csi::client::connect(&socket).await?;
    let mut identity = IdentityClient::new(channel.clone());
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);

    let info = identity
        .get_plugin_info(proto::GetPluginInfoRequest {})
        .await?
        .into_inner();
    let ready = identity
        .probe(proto::ProbeRequest {})
        .await?
        .into_inner()
        .ready;
    step(&format!(
        "driver {} {} ready={}",
        info.name,
        info.vendor_version,
        ready.unwrap_or(true)
    ));
    let node_info = node
        .node_get_info(proto::NodeGetInfoRequest {})
        .await?
        .into_inner();

    let capability = proto::VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            },
        )),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    };
    let started = Instant::now();
    let volume = controller
        .create_volume(proto::CreateVolumeRequest {
            name: "pvc-kura-demo".into(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability.clone()],
            accessibility_requirements: Some(proto::TopologyRequirement {
                requisite: node_info.accessible_topology.clone().into_iter().collect(),
                preferred: node_info.accessible_topology.into_iter().collect(),
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .ok_or("CreateVolume returned no volume")?;
    let id = volume.volume_id.clone();
    step(&format!(
        "created {id} ({} bytes) in {:?}",
        volume.capacity_bytes,
        started.elapsed()
    ));

    let staging = work.join("staging");
    let target = work.join("target");
    std::fs::create_dir_all(&staging)?;
    node.node_stage_volume(proto::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: path(&staging),
        volume_capability: Some(capability.clone()),
        ..Default::default()
    })
    .await?;
    step(&format!(
        "staged: loop device with direct I/O, ext4, mounted at {}",
        staging.display()
    ));
    node.node_publish_volume(proto::NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: path(&staging),
        target_path: path(&target),
        volume_capability: Some(capability),
        ..Default::default()
    })
    .await?;
    step(&format!("published at {}", target.display()));

    let file = target.join("hello.txt");
    let message = format!("hello from kura, volume {id}\n");
    std::fs::write(&file, &message)?;
    std::fs::File::open(&file)?.sync_all()?;
    let read_back = std::fs::read_to_string(&file)?;
    if read_back != message {
        return Err(format!("read back {read_back:?}, wrote {message:?}").into());
    }
    step(&format!(
        "wrote and read back {}: {}",
        file.display(),
        read_back.trim()
    ));

    let stats = node
        .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: path(&target),
            ..Default::default()
        })
        .await?
        .into_inner();
    if let Some(bytes) = stats.usage.first() {
        step(&format!(
            "usage: {} of {} bytes used",
            bytes.used, bytes.total
        ));
    }

    node.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: path(&target),
    })
    .await?;
    step("unpublished");
    node.node_unstage_volume(proto::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: path(&staging),
    })
    .await?;
    step("unstaged: unmounted, loop device detached");
    controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await?;
    step("deleted");
    std::fs::remove_dir(&staging)?;
    Ok(())
}

fn step(text: &str) {
    println!("demo: {text}");
}

fn path(p: &Path) -> String {
    p.display().to_string()
}
