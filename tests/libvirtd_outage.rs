//! The agent reports libvirtd going away and comes back with it.
//!
//! This test stops and restarts the node's libvirtd, so it lives in its own test binary (cargo
//! runs test binaries one after another).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use virtplane::conditions::find;

use common::*;

fn libvirtd_pids() -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-x", "libvirtd"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn start_libvirtd() {
    if libvirtd_pids().is_empty() {
        let status = Command::new("libvirtd")
            .arg("-d")
            .status()
            .expect("start libvirtd");
        assert!(status.success(), "libvirtd -d failed");
    }
}

/// Whether libvirtd answers.
fn libvirtd_answers() -> bool {
    Command::new("virsh")
        .args(["-c", &libvirt_uri(), "version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Restarts libvirtd even when the test fails half-way. A libvirtd still shutting down (it
/// forces its own shutdown after 30 s) is waited for first: `libvirtd -d` would not start while
/// it holds its pid file.
struct RestartOnDrop;
impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        if libvirtd_answers() {
            return;
        }
        for _ in 0..120 {
            if libvirtd_pids().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        start_libvirtd();
    }
}

fn ready(h: &virtplane::api::Hypervisor) -> Option<(String, String)> {
    let c = find(&h.status.as_ref()?.conditions, "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn hypervisor_not_ready_while_libvirtd_is_down() {
    let client = client().await;
    install_crds(&client).await;
    let node = unique("vp-outage");
    let agent = Agent::start(&node, &["--heartbeat-seconds", "2"]);
    wait_hypervisor(&client, &node, "Ready=True", Duration::from_secs(60), |h| {
        ready(h).is_some_and(|(s, _)| s == "True")
    })
    .await;

    let _restart = RestartOnDrop;
    let pids = libvirtd_pids();
    assert!(!pids.is_empty(), "libvirtd is not running");
    for pid in &pids {
        Command::new("kill").args(["-TERM", pid]).status().unwrap();
    }
    // libvirtd waits for its drivers for up to 30 s before it forces its shutdown.
    eventually("libvirtd to exit", Duration::from_secs(90), || async {
        libvirtd_pids().is_empty().then_some(())
    })
    .await;

    let down = wait_hypervisor(
        &client,
        &node,
        "Ready=False while libvirtd is down",
        Duration::from_secs(30),
        |h| ready(h).is_some_and(|(s, _)| s == "False"),
    )
    .await;
    let cond = find(&down.status.as_ref().unwrap().conditions, "Ready")
        .unwrap()
        .clone();
    assert_eq!(cond.reason, "LibvirtUnavailable");
    assert!(
        cond.message.contains("libvirtd"),
        "message should tell what to check: {}",
        cond.message
    );

    start_libvirtd();
    wait_hypervisor(
        &client,
        &node,
        "Ready=True after libvirtd returns",
        Duration::from_secs(60),
        |h| ready(h).is_some_and(|(s, r)| s == "True" && r == "LibvirtConnected"),
    )
    .await;
    assert!(agent.process.log_text().contains("connected to libvirt"));
}
