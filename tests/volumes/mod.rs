//! Helpers of the volume-provisioning tests (tests/provision.rs).

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use virtplane::api::VirtualMachineStorage;

use crate::common::*;

pub type Vms = VirtualMachineStorage;
pub const T: Duration = Duration::from_secs(90);
pub const MIB: u64 = 1 << 20;

pub fn ready(o: &Vms) -> Option<(String, String, String)> {
    condition_of(&o.status.as_ref()?.conditions, "Ready")
}

pub fn current(o: &Vms) -> bool {
    o.status.as_ref().and_then(|s| s.observed_generation) == o.metadata.generation
}

pub async fn wait_ready(client: &Client, ns: &str, name: &str) -> Vms {
    wait_obj::<Vms>(client, ns, name, "Ready=True", T, |o| {
        current(o) && ready(o).is_some_and(|(s, _, _)| s == "True")
    })
    .await
}

pub async fn wait_reason(client: &Client, ns: &str, name: &str, reason: &str) -> Vms {
    wait_obj::<Vms>(client, ns, name, reason, T, |o| {
        current(o) && ready(o).is_some_and(|(s, r, _)| s == "False" && r == reason)
    })
    .await
}

/// A VirtualMachineStorage creating volume `volume` of `pool` with `create` (JSON).
pub fn manifest(
    name: &str,
    vm: &str,
    pool: &str,
    volume: &str,
    create: serde_json::Value,
) -> String {
    json!({
        "apiVersion": "virtplane.io/v1alpha1",
        "kind": "VirtualMachineStorage",
        "metadata": {"name": name},
        "spec": {
            "vm": vm, "type": "disk", "bus": "virtio",
            "source": {"volume": {"pool": pool, "name": volume, "create": create}}
        }
    })
    .to_string()
}

pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `qemu-img info` of an image, as JSON.
pub fn img_info(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The capacity libvirt reports for the running guest's disk `target` (`virsh domblkinfo`).
pub fn block_capacity(domain: &str, target: &str) -> u64 {
    virsh(&["domblkinfo", domain, target])
        .lines()
        .find_map(|l| l.strip_prefix("Capacity:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Runs a shell command in the guest through qemu-ga's `guest-exec`; its stdout.
pub fn guest_sh(domain: &str, script: &str) -> Option<String> {
    let cmd = json!({"execute": "guest-exec", "arguments": {
        "path": "/bin/sh", "arg": ["-c", script], "capture-output": true}});
    let out = Command::new("virsh")
        .args(["-c", &libvirt_uri(), "qemu-agent-command", domain])
        .arg(cmd.to_string())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let pid = v["return"]["pid"].as_i64()?;
    for _ in 0..50 {
        let st = json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
        let out = Command::new("virsh")
            .args(["-c", &libvirt_uri(), "qemu-agent-command", domain])
            .arg(st.to_string())
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        if v["return"]["exited"].as_bool() == Some(true) {
            let data = v["return"]["out-data"].as_str().unwrap_or("").to_string();
            let mut child = Command::new("base64")
                .arg("-d")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .ok()?;
            use std::io::Write;
            child.stdin.take()?.write_all(data.as_bytes()).ok()?;
            let out = child.wait_with_output().ok()?;
            return Some(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The sizes in bytes of the guest's virtio disks, as its kernel sees them.
pub fn guest_disk_sizes(domain: &str) -> Vec<u64> {
    guest_sh(
        domain,
        "for d in /sys/block/vd*; do [ -e $d/size ] && cat $d/size; done",
    )
    .unwrap_or_default()
    .lines()
    .filter_map(|l| l.trim().parse::<u64>().ok())
    .map(|sectors| sectors * 512)
    .collect()
}

pub async fn patch_capacity(api: &Api<Vms>, name: &str, capacity: &str) {
    let vol = api
        .get(name)
        .await
        .unwrap()
        .spec
        .source
        .unwrap()
        .volume
        .unwrap();
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"source": {"volume": {
            "pool": vol.pool, "name": vol.name, "create": {"capacity": capacity}}}}})),
    )
    .await
    .unwrap();
}
