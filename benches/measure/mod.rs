//! What the scale benchmarks measure outside the agent: settings from the environment, a
//! process's peak memory, and the API server's request counters. Included by path from
//! `scale.rs`, `scale_nodes.rs` and `download/iso.rs`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// The environment variable `name`, or `default`.
pub fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Peak resident set of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// apiserver_request_total, summed: (all requests, requests of the virtplane.io group).
pub fn api_requests() -> (f64, f64) {
    let out = Command::new("kubectl")
        .args(["get", "--raw", "/metrics"])
        .output()
        .expect("kubectl get --raw /metrics");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut all = 0.0;
    let mut ours = 0.0;
    for l in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let v: f64 = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        all += v;
        if l.contains("group=\"virtplane.io\"") {
            ours += v;
        }
    }
    (all, ours)
}

/// Counters of an agent's `/metrics` text that say where its work went: reconciles by kind
/// (`reconciles VirtualMachineStorage`, and the seconds they took), libvirt calls by action
/// (`libvirt calls read the domain`, and their seconds), each a total since the agent started.
pub fn agent_counters(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for l in metrics.lines() {
        let (series, prefix) = if let Some(s) = l.strip_prefix("virtplane_reconciles_total{") {
            (s, "reconciles")
        } else if let Some(s) = l.strip_prefix("virtplane_libvirt_call_duration_seconds_count{") {
            (s, "libvirt calls")
        } else if let Some(s) = l.strip_prefix("virtplane_libvirt_call_duration_seconds_sum{") {
            (s, "libvirt seconds")
        } else if let Some(s) = l.strip_prefix("virtplane_reconcile_duration_seconds_sum{") {
            (s, "reconcile seconds")
        } else if let Some(s) = l.strip_prefix("virtplane_batch_flushes_total{") {
            (s, "batch flushes")
        } else if let Some(v) = l.strip_prefix("virtplane_wakeups_spared_total ") {
            (v, "wake-ups spared")
        } else {
            continue;
        };
        let label = series.split('"').nth(1).unwrap_or_default().to_string();
        let value: f64 = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(format!("{prefix} {label}").trim_end().to_string())
            .or_default() += value;
    }
    out
}
