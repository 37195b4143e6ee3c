//! The `virtplane` binary: parses arguments and starts the chosen part.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use virtplane::tenancy::Mode;

/// virtplane: libvirt virtual machine devices, clones and installation media from Kubernetes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain, env = "VIRTPLANE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print every CustomResourceDefinition as multi-document YAML.
    Crds,
    /// Run the node agent: keep this node's Hypervisor inventory and reconcile the objects bound
    /// to this node against the local libvirt.
    Agent {
        /// Name of this node (the Kubernetes node name); default: the host name.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// libvirt connection URI.
        #[arg(long, env = "LIBVIRT_DEFAULT_URI", default_value = "qemu:///system")]
        libvirt_uri: String,
        /// Seconds one libvirt call may take (a hung storage pool or QEMU monitor); the object
        /// that made it then gets Ready=False with reason LibvirtTimeout and is retried.
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
        libvirt_call_timeout: u64,
        /// Address of the /healthz and /readyz endpoint.
        #[arg(long, default_value = "0.0.0.0:8081")]
        http_addr: SocketAddr,
        /// Seconds between renewals of this node's Lease (the heartbeat the controller judges
        /// the node by) and between inventory re-reads (libvirt events refresh sooner; the
        /// Hypervisor is written only when the inventory changed).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        heartbeat_seconds: u64,
        /// Namespace of this node's Lease (`virtplane-node-<node>`), like the kubelets' Leases;
        /// must match the controller's --node-lease-namespace.
        #[arg(long, default_value = "kube-node-lease")]
        lease_namespace: String,
        /// A directory whose files may back disks and CD-ROMs (repeatable), with `--tenancy open`
        /// only. The target paths of active storage pools are always allowed; nothing else is.
        /// In namespaced mode a source must lie inside a pool granted to the object's namespace:
        /// define a libvirt dir pool for a directory and grant it.
        #[arg(long = "allowed-path", value_name = "DIR")]
        allowed_paths: Vec<std::path::PathBuf>,
        /// namespaced: a namespace reaches only the domains, pools and NIC sources its
        /// annotations grant (virtplane.io/domains, pools, networks). open: every namespace
        /// reaches everything (single-tenant labs).
        #[arg(long, value_enum, env = "VIRTPLANE_TENANCY", default_value_t = Mode::Namespaced)]
        tenancy: Mode,
        /// IsoDownloads that may transfer at once on this node; the others wait in Pending.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
        max_downloads: u64,
        /// A network (CIDR) IsoDownloads may never connect to (repeatable), in addition to the
        /// default deny list (loopback, 0.0.0.0/8, RFC 1918, CGNAT, link-local, IPv6
        /// unique-local, multicast, their IPv4-mapped/NAT64/6to4 forms, and `localhost`).
        /// Wins over --download-allow-cidr. The cluster's pod ranges are refused without it
        /// (learned from the Nodes); its service range is given with --service-cidr.
        #[arg(long = "download-deny-cidr", value_name = "CIDR")]
        download_deny_cidrs: Vec<String>,
        /// A network (CIDR) of the default deny list that IsoDownloads may connect to
        /// (repeatable): a private mirror.
        #[arg(long = "download-allow-cidr", value_name = "CIDR")]
        download_allow_cidrs: Vec<String>,
        /// The cluster's service range (repeatable, one per IP family), refused to IsoDownloads
        /// like --download-deny-cidr. The pod ranges are learned from the Nodes' spec.podCIDRs;
        /// the service range is not published by the API, so it is given here.
        #[arg(long = "service-cidr", value_name = "CIDR")]
        service_cidrs: Vec<String>,
        /// The largest file an IsoDownload may fetch, in bytes (an object may set less).
        #[arg(long, default_value_t = 64 << 30)]
        download_max_bytes: u64,
        /// Bytes a pool keeps free: a download that would leave less is refused
        /// (InsufficientSpace), counting the space reserved by downloads in flight.
        #[arg(long, default_value_t = 1 << 30)]
        download_min_free_bytes: u64,
        /// The slowest transfer, in bytes per second averaged over --download-rate-window-seconds,
        /// that keeps its download slot; slower ones give it up (Timeout) and retry later. 0: no
        /// minimum.
        #[arg(long, default_value_t = 1024)]
        download_min_rate_bytes: u64,
        /// The window the minimum rate is averaged over, in seconds.
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86400))]
        download_rate_window_seconds: u64,
        /// The longest one download attempt may transfer before it gives up its slot (Timeout)
        /// and resumes later, in seconds. 0: no deadline.
        #[arg(long, default_value_t = 86400)]
        download_deadline_seconds: u64,
        /// VMClone jobs that may copy at once on this node; the others wait.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
        max_clones: u64,
        /// Directory of the agent's node-side records (the files each VMClone task created,
        /// the only list its cleanup removes files from).
        #[arg(long, default_value = "/var/lib/virtplane")]
        state_dir: std::path::PathBuf,
    },
    /// Run the cluster-wide controller: bind objects to nodes, watch node health.
    Controller {
        /// Address of the /healthz and /readyz endpoint.
        #[arg(long, default_value = "0.0.0.0:8080")]
        http_addr: SocketAddr,
        /// Namespace of the leader-election Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// Name of the leader-election Lease.
        #[arg(long, default_value = "virtplane-controller")]
        lease_name: String,
        /// This replica's identity in the Lease; default: host name and process id.
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Seconds a leader's Lease stays valid without renewal (a standby takes over after this
        /// when the leader dies without releasing it).
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=600))]
        lease_seconds: u64,
        /// Namespace of the agents' node Leases (must match the agents' --lease-namespace).
        #[arg(long, default_value = "kube-node-lease")]
        node_lease_namespace: String,
        /// Seconds without a renewal of a node's Lease after which the node counts as
        /// unreachable. It counts as reachable again after two renewals at most this far apart.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..=3600))]
        node_grace_seconds: u64,
        /// namespaced: an object is bound only to a domain or pool its namespace's annotations
        /// grant (virtplane.io/domains, pools). open: every namespace reaches everything.
        #[arg(long, value_enum, env = "VIRTPLANE_TENANCY", default_value_t = Mode::Namespaced)]
        tenancy: Mode,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Crds => {
            print!(
                "{}",
                virtplane::crdgen::render().context("failed to render the CRDs")?
            );
            Ok(())
        }
        Command::Agent {
            node_name,
            libvirt_uri,
            libvirt_call_timeout,
            http_addr,
            heartbeat_seconds,
            lease_namespace,
            allowed_paths,
            max_downloads,
            download_deny_cidrs,
            download_allow_cidrs,
            service_cidrs,
            download_max_bytes,
            download_min_free_bytes,
            download_min_rate_bytes,
            download_rate_window_seconds,
            download_deadline_seconds,
            max_clones,
            state_dir,
            tenancy,
        } => {
            if tenancy == Mode::Namespaced && !allowed_paths.is_empty() {
                anyhow::bail!(
                    "--allowed-path applies only with --tenancy open: in namespaced mode a source \
                     must lie inside a storage pool granted to the object's namespace (define a \
                     libvirt dir pool for the directory and grant it with virtplane.io/pools)"
                );
            }
            let downloads = virtplane::agent::DownloadSettings {
                max_downloads: usize::try_from(max_downloads).unwrap_or(2),
                deny: [
                    virtplane::agent::parse_cidrs(&download_deny_cidrs)
                        .map_err(anyhow::Error::msg)
                        .context("invalid --download-deny-cidr")?,
                    virtplane::agent::parse_cidrs(&service_cidrs)
                        .map_err(anyhow::Error::msg)
                        .context("invalid --service-cidr")?,
                ]
                .concat(),
                cluster: Default::default(),
                allow: virtplane::agent::parse_cidrs(&download_allow_cidrs)
                    .map_err(anyhow::Error::msg)
                    .context("invalid --download-allow-cidr")?,
                max_bytes: download_max_bytes,
                min_free_bytes: download_min_free_bytes,
                min_rate: (download_min_rate_bytes > 0).then(|| virtplane::download::MinRate {
                    bytes_per_second: download_min_rate_bytes,
                    window: Duration::from_secs(download_rate_window_seconds),
                }),
                deadline: (download_deadline_seconds > 0)
                    .then(|| Duration::from_secs(download_deadline_seconds)),
            };
            let node_name = match node_name {
                Some(n) if !n.is_empty() => n,
                _ => hostname().context("no --node-name given and the host name is unreadable")?,
            };
            let shutdown =
                virtplane::shutdown::on_signals().context("failed to install signal handlers")?;
            let client = kube::Client::try_default()
                .await
                .context("failed to load the kubeconfig")?;
            let config = virtplane::agent::AgentConfig {
                node_name,
                libvirt_uri,
                libvirt_call_timeout: Duration::from_secs(libvirt_call_timeout),
                http_addr,
                heartbeat_interval: Duration::from_secs(heartbeat_seconds),
                lease_namespace,
                allowed_paths,
                downloads,
                max_clones: usize::try_from(max_clones).unwrap_or(2),
                state_dir,
                tenancy,
            };
            virtplane::agent::run(client, config, shutdown).await?;
            Ok(())
        }
        Command::Controller {
            http_addr,
            lease_namespace,
            lease_name,
            identity,
            lease_seconds,
            node_grace_seconds,
            node_lease_namespace,
            tenancy,
        } => {
            let identity = match identity {
                Some(i) if !i.is_empty() => i,
                _ => format!(
                    "{}-{}",
                    hostname().unwrap_or_else(|_| "virtplane".into()),
                    std::process::id()
                ),
            };
            let shutdown =
                virtplane::shutdown::on_signals().context("failed to install signal handlers")?;
            let client = kube::Client::try_default()
                .await
                .context("failed to load the kubeconfig")?;
            let config = virtplane::controller::ControllerConfig {
                http_addr,
                lease_namespace,
                lease_name,
                identity,
                lease_duration: Duration::from_secs(lease_seconds),
                node_grace: Duration::from_secs(node_grace_seconds),
                node_lease_namespace,
                tenancy,
            };
            virtplane::controller::run(client, config, shutdown).await?;
            Ok(())
        }
    }
}

fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().to_lowercase())
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
