//! Shared test harness: the real kube-apiserver and libvirtd that `hack/env-up.sh` starts.
//!
//! Every test gets its own namespace, its own agent process with a unique node name, and its own
//! throwaway libvirt domains, and removes them when it ends (also when it fails).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use virtplane::api::Hypervisor;

mod fixture_http;
#[allow(unused_imports)]
pub use fixture_http::FixtureServer;

/// How to bring the environment up, for failure messages.
pub const HOW_TO_START: &str = "start the test environment first: `eval \"$(hack/env-up.sh)\"` \
    (or run the whole suite with `hack/test.sh`)";

/// A short random suffix for names.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = nanos ^ (std::process::id() << 8);
    format!("{prefix}-{:08x}", n.wrapping_mul(2_654_435_761))
}

/// A client for the test apiserver; fails with instructions when the environment is not up.
pub async fn client() -> Client {
    let Ok(path) = std::env::var("KUBECONFIG") else {
        panic!("KUBECONFIG is not set: {HOW_TO_START}");
    };
    assert!(
        std::path::Path::new(&path).exists(),
        "KUBECONFIG={path} does not exist: {HOW_TO_START}"
    );
    let client = Client::try_default()
        .await
        .unwrap_or_else(|e| panic!("cannot load {path} ({e}): {HOW_TO_START}"));
    client.apiserver_version().await.unwrap_or_else(|e| {
        panic!("the apiserver in {path} does not answer ({e}): {HOW_TO_START}")
    });
    client
}

/// Installs (server-side applies) every CRD and waits until each is Established.
pub async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("virtplane-tests").force();
    for crd in virtplane::crdgen::all() {
        let name = crd.name_any();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
        // An apply removes only the fields no other manager owns: a field an older CRD had and
        // `kubectl apply` or Helm also wrote would stay. Replaced, the schema is exactly ours.
        for attempt in 0.. {
            let live = api.get(&name).await.unwrap();
            let mut want = crd.clone();
            want.metadata.resource_version = live.metadata.resource_version;
            match api.replace(&name, &PostParams::default(), &want).await {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if e.code == 409 && attempt < 10 => {}
                Err(e) => panic!("replace CRD {name}: {e}"),
            }
        }
    }
    for crd in virtplane::crdgen::all() {
        let name = crd.name_any();
        eventually(
            &format!("CRD {name} Established"),
            Duration::from_secs(30),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let crd = api.get(&name).await.ok()?;
                    crd.status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(())
                }
            },
        )
        .await;
    }
}

/// Polls `check` every 200 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_every(what, timeout, Duration::from_millis(200), check).await
}

/// Polls `check` every `interval` until it returns `Some`, or panics after `timeout`.
pub async fn eventually_every<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(interval).await;
    }
}

/// A namespace deleted when dropped.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str) -> Self {
        let name = unique(prefix);
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        Self { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // The test's agent is gone by now: release what its finalizers still hold, so the
        // namespace really goes away and nothing lingers into later tests (MACs, names).
        let out = Command::new("kubectl")
            .args([
                "get",
                "-n",
                &self.name,
                "virtualmachinestorages,vminterfaces,vmclones,isodownloads",
                "-o",
                "name",
            ])
            .output();
        if let Ok(out) = out {
            for obj in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = Command::new("kubectl")
                    .args([
                        "patch",
                        "-n",
                        &self.name,
                        obj,
                        "--type=merge",
                        "-p",
                        r#"{"metadata":{"finalizers":null}}"#,
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = Command::new("kubectl")
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Where test processes write their logs.
pub fn log_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("logs");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `virtplane` process (agent or controller), stopped with SIGTERM when dropped.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, args: &[&str]) -> Self {
        let log = log_dir().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_virtplane"))
            .args(args)
            .env("RUST_LOG", "info,virtplane=debug")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn virtplane");
        Self {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stderr(Stdio::null())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address its HTTP endpoint listens on (read from its log).
    pub fn http_addr(&self) -> String {
        let log = self.log_text();
        let at = log.find("addr=").expect("the process logs its address");
        log[at + 5..].split_whitespace().next().unwrap().to_string()
    }

    /// `GET path` on its HTTP endpoint, with curl.
    pub fn http_get(&self, path: &str) -> String {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://{}{path}", self.http_addr())])
            .output()
            .unwrap();
        assert!(out.status.success(), "curl {path} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// The tenancy a test's agent and controller run with unless their arguments name one:
/// `open`, today's behaviour. A test of tenancy passes `--tenancy namespaced` (see
/// [`NAMESPACED`]) and grants its namespaces what they use.
pub const DEFAULT_TENANCY: [&str; 2] = ["--tenancy", "open"];

/// The arguments that start an agent or a controller in namespaced mode.
pub const NAMESPACED: [&str; 2] = ["--tenancy", "namespaced"];

/// `args` with [`DEFAULT_TENANCY`] appended unless they choose a tenancy themselves.
fn with_tenancy(mut args: Vec<&str>) -> Vec<&str> {
    if !args
        .iter()
        .any(|a| *a == "--tenancy" || a.starts_with("--tenancy="))
    {
        args.extend_from_slice(&DEFAULT_TENANCY);
    }
    args
}

/// The test servers' loopback network, which the agent refuses by default: a test's agent
/// may download from it unless its arguments set `--download-allow-cidr` themselves (the
/// hardening tests pass [`NO_LOOPBACK`] to see loopback refused).
pub const TEST_SERVERS: [&str; 2] = ["--download-allow-cidr", "127.0.0.0/8"];

/// Arguments that leave the default deny list whole (TEST-NET-2 is not in it anyway).
pub const NO_LOOPBACK: [&str; 2] = ["--download-allow-cidr", "198.51.100.0/24"];

/// `args` with [`TEST_SERVERS`] appended unless they set an allow list themselves.
fn with_test_servers(mut args: Vec<&str>) -> Vec<&str> {
    if !args.iter().any(|a| a.starts_with("--download-allow-cidr")) {
        args.extend_from_slice(&TEST_SERVERS);
    }
    args
}

/// An agent with a unique node name; its Hypervisor object is deleted when dropped.
pub struct Agent {
    pub node: String,
    pub process: Process,
    args: Vec<String>,
}

impl Agent {
    pub fn start(node: &str, extra: &[&str]) -> Self {
        let mut args = vec!["agent", "--node-name", node, "--http-addr", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let args = with_test_servers(with_tenancy(args));
        let process = Process::spawn(node, &args);
        Self {
            node: node.to_string(),
            process,
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Stops the agent with SIGTERM and starts it again with the same arguments.
    pub fn restart(&mut self) {
        assert!(self.process.terminate(), "the agent did not stop cleanly");
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.process = Process::spawn(&format!("{}-restarted", self.node), &args);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.process.terminate();
        let _ = Command::new("kubectl")
            .args([
                "delete",
                "hypervisor",
                &self.node,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("kubectl")
            .args([
                "delete",
                "lease",
                "-n",
                "kube-node-lease",
                &format!("virtplane-node-{}", self.node),
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Waits until the Hypervisor `node` satisfies `check`, returning it.
pub async fn wait_hypervisor(
    client: &Client,
    node: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Hypervisor) -> bool,
) -> Hypervisor {
    let api: Api<Hypervisor> = Api::all(client.clone());
    eventually(&format!("Hypervisor {node}: {what}"), timeout, || {
        let api = api.clone();
        let check = &check;
        async move { api.get(node).await.ok().filter(|h| check(h)) }
    })
    .await
}

/// Runs `virsh` against the test libvirt and returns stdout; panics on failure.
pub fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(libvirt_uri())
        .args(args)
        .output()
        .expect("run virsh");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // libvirtd down: say how to start it rather than show a bare virsh error.
        if err.contains("Failed to connect") || err.contains("failed to connect") {
            panic!(
                "libvirtd at {} does not answer ({err}): {HOW_TO_START}",
                libvirt_uri()
            );
        }
        panic!("virsh {args:?} failed: {err}");
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The libvirt URI of the test environment.
pub fn libvirt_uri() -> String {
    std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| "qemu:///system".into())
}

/// A throwaway libvirt domain (TCG, no OS), destroyed and undefined when dropped.
pub struct TestDomain {
    pub name: String,
}

impl TestDomain {
    /// Defines a minimal q35 domain with no OS.
    pub fn define(prefix: &str) -> Self {
        let name = unique(prefix);
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='q35'>hvm</type></os>\
             <devices><controller type='usb' model='none'/><memballoon model='none'/></devices></domain>"
        );
        let path = log_dir().join(format!("{name}.xml"));
        std::fs::write(&path, xml).unwrap();
        virsh(&["define", path.to_str().unwrap()]);
        Self { name }
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        for args in [
            vec!["destroy", &self.name],
            vec!["undefine", &self.name, "--nvram"],
        ] {
            let _ = Command::new("virsh")
                .arg("-c")
                .arg(libvirt_uri())
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Deletes an object, ignoring "not found".
pub async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let _ = api.delete(name, &DeleteParams::default()).await;
}

/// A controller process with its own Lease in `namespace`.
pub fn start_controller(identity: &str, namespace: &str, lease: &str, extra: &[&str]) -> Process {
    let mut args = vec![
        "controller",
        "--http-addr",
        "127.0.0.1:0",
        "--lease-namespace",
        namespace,
        "--lease-name",
        lease,
        "--identity",
        identity,
    ];
    args.extend_from_slice(extra);
    Process::spawn(identity, &with_tenancy(args))
}

/// A throwaway directory storage pool, destroyed and undefined when dropped.
pub struct TestPool {
    pub name: String,
    pub path: PathBuf,
}

impl TestPool {
    pub fn create(prefix: &str) -> Self {
        let name = unique(prefix);
        let path = PathBuf::from("/var/lib/libvirt/images").join(&name);
        std::fs::create_dir_all(&path).unwrap();
        virsh(&[
            "pool-define-as",
            &name,
            "dir",
            "--target",
            path.to_str().unwrap(),
        ]);
        virsh(&["pool-start", &name]);
        Self { name, path }
    }

    /// The files in the pool's directory, hidden partial files and records included, sorted.
    pub fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// The pool's files once they are `expected`, else what is there after 30 s. The agent
    /// removes a finished download's record, and a failed one's data, right after it writes the
    /// status that says so: whoever read that status may still see them for a moment.
    pub async fn files_settled(&self, expected: &[&str]) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let files = self.files();
            if files == expected || std::time::Instant::now() >= deadline {
                return files;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        for args in [
            vec!["pool-destroy", &self.name],
            vec!["pool-undefine", &self.name],
        ] {
            let _ = Command::new("virsh")
                .arg("-c")
                .arg(libvirt_uri())
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Applies a manifest (YAML or JSON) with `kubectl apply -f -` in `namespace`.
pub fn kubectl_apply(namespace: &str, manifest: &str) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(["apply", "-n", namespace, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The condition `type_` of an object's status conditions, as (status, reason, message).
pub fn condition_of(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(String, String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Where the test guest's kernel and initramfs are cached (by `hack/build-test-guest.sh`).
pub fn guest_dir() -> PathBuf {
    let cache = std::env::var("VIRTPLANE_CACHE").unwrap_or_else(|_| "/var/cache/virtplane".into());
    let dir = PathBuf::from(cache).join("guest");
    assert!(
        dir.join("vmlinuz").exists() && dir.join("initrd.img").exists(),
        "the test guest is not built: run hack/build-test-guest.sh (hack/test.sh does)"
    );
    dir
}

/// A small real guest (cloud kernel + busybox, optionally qemu-ga) that answers hot-plug and
/// unplug requests. Destroyed and undefined when dropped.
pub struct TestGuest {
    pub name: String,
    pub serial_log: PathBuf,
}

impl TestGuest {
    /// Defines the guest (with or without the QEMU guest agent channel) without starting it.
    pub fn define(prefix: &str, with_agent: bool) -> Self {
        Self::define_with(prefix, with_agent, true)
    }

    /// Like [`TestGuest::define`]; without `os` the domain has the same hardware but no kernel,
    /// so it never answers an unplug request.
    pub fn define_with(prefix: &str, with_agent: bool, os: bool) -> Self {
        let name = unique(prefix);
        let dir = guest_dir();
        let serial_log = PathBuf::from("/var/log/libvirt/qemu").join(format!("{name}-serial.log"));
        let template =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/test-guest.xml"))
                .unwrap();
        // Drop the template's leading comment: it mentions the elements edited below.
        let template = &template[template.find("<domain").unwrap()..];
        let mut xml = template
            .replace("@NAME@", &name)
            .replace("@KERNEL@", dir.join("vmlinuz").to_str().unwrap())
            .replace("@INITRD@", dir.join("initrd.img").to_str().unwrap())
            .replace("@SERIAL_LOG@", serial_log.to_str().unwrap());
        if !os {
            for tag in ["kernel", "initrd", "cmdline"] {
                let start = xml.find(&format!("<{tag}>")).unwrap();
                let end = xml.find(&format!("</{tag}>")).unwrap() + tag.len() + 3;
                xml.replace_range(start..end, "");
            }
        }
        if !with_agent {
            let start = xml.find("<channel").unwrap();
            let end = xml.find("</channel>").unwrap() + "</channel>".len();
            xml.replace_range(start..end, "");
        }
        let path = log_dir().join(format!("{name}.xml"));
        std::fs::write(&path, xml).unwrap();
        virsh(&["define", path.to_str().unwrap()]);
        Self { name, serial_log }
    }

    /// Starts the guest and waits for its ready marker on the serial console.
    pub async fn start(&self) {
        virsh(&["start", &self.name]);
        eventually(
            &format!("guest {} ready", self.name),
            Duration::from_secs(90),
            || async {
                std::fs::read_to_string(&self.serial_log)
                    .ok()
                    .filter(|s| s.contains("VIRTPLANE-GUEST-READY"))
                    .map(|_| ())
            },
        )
        .await;
    }

    /// Defines and starts the guest.
    pub async fn boot(prefix: &str, with_agent: bool) -> Self {
        let guest = Self::define(prefix, with_agent);
        guest.start().await;
        guest
    }
}

impl Drop for TestGuest {
    fn drop(&mut self) {
        for args in [vec!["destroy", &self.name], vec!["undefine", &self.name]] {
            let _ = Command::new("virsh")
                .arg("-c")
                .arg(libvirt_uri())
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_file(&self.serial_log);
    }
}

/// The domain's live XML.
pub fn live_xml(domain: &str) -> String {
    virsh(&["dumpxml", domain])
}

/// The domain's persistent XML.
pub fn config_xml(domain: &str) -> String {
    virsh(&["dumpxml", "--inactive", domain])
}

/// Reasons of the Kubernetes Events about an object.
pub async fn event_reasons(client: &Client, namespace: &str, name: &str) -> Vec<String> {
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), namespace);
    api.list(&Default::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.involved_object.name.as_deref() == Some(name))
                .filter_map(|e| e.reason)
                .collect()
        })
        .unwrap_or_default()
}

/// An agent and a controller for one test, with the agent allowed `allowed` directories.
pub struct Operator {
    pub agent: Agent,
    pub controller: Process,
}

impl Operator {
    pub fn start(namespace: &str, agent_args: &[&str]) -> Self {
        let node = unique("vp-node");
        let mut args = vec!["--heartbeat-seconds", "2"];
        args.extend_from_slice(agent_args);
        let agent = Agent::start(&node, &args);
        let controller =
            start_controller(&unique("vp-ctl"), namespace, "virtplane-controller", &[]);
        Self { agent, controller }
    }
}

/// Waits until the object `name` of kind `K` in `ns` satisfies `check` and returns it.
pub async fn wait_obj<K>(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&K) -> bool,
) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    eventually(&format!("{name}: {what}"), timeout, || {
        let api = api.clone();
        let check = &check;
        async move { api.get(name).await.ok().filter(|o| check(o)) }
    })
    .await
}

/// Waits until the object is gone.
pub async fn wait_gone<K>(client: &Client, ns: &str, name: &str, timeout: Duration)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    eventually(&format!("{name} deleted"), timeout, || {
        let api = api.clone();
        async move { matches!(api.get_opt(name).await, Ok(None)).then_some(()) }
    })
    .await
}

/// Deletes an object by name in `ns` (not waiting).
pub fn kubectl_delete(ns: &str, kind: &str, name: &str) {
    let status = Command::new("kubectl")
        .args(["delete", "-n", ns, kind, name, "--wait=false"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "kubectl delete {kind} {name} failed");
}

/// The value of a Prometheus sample whose line starts with `prefix` (name and labels).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
