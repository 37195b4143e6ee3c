//! Installing from an ISO, as a new user would: an IsoDownload fetches the installer from a real
//! HTTP server into a pool, and a CD-ROM VirtualMachineStorage fed by that IsoDownload, with
//! `bootOrder: 1`, goes on a shut-off domain that libvirt orders by type (`<os><boot dev='hd'/>`)
//! and that has no kernel of its own. The ISO is bootable (isolinux with the test guest's kernel
//! and initramfs), so the guest can only reach its ready marker by booting from the CD; libvirt's
//! block statistics show the medium read.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kube::ResourceExt;
use virtplane::api::{DownloadPhase, IsoDownload, VirtualMachineStorage};
use virtplane::libvirt::domain::parse_domain;
use virtplane::libvirt::tuning::disk_fields;

use common::*;

type Vms = VirtualMachineStorage;
const T: Duration = Duration::from_secs(90);

const ISOLINUX: &str = "/usr/lib/ISOLINUX/isolinux.bin";
const LDLINUX: &str = "/usr/lib/syslinux/modules/bios/ldlinux.c32";

/// Writes a bootable ISO at `iso`: isolinux starting the test guest's kernel and initramfs.
fn make_iso(iso: &Path) {
    for f in [ISOLINUX, LDLINUX] {
        assert!(
            Path::new(f).exists(),
            "{f} is missing: run hack/install-deps.sh (isolinux, syslinux-common, xorriso)"
        );
    }
    let stage = log_dir().join(unique("vp-iso-stage"));
    std::fs::create_dir_all(&stage).unwrap();
    let guest = guest_dir();
    for (from, to) in [
        (Path::new(ISOLINUX).to_path_buf(), "isolinux.bin"),
        (Path::new(LDLINUX).to_path_buf(), "ldlinux.c32"),
        (guest.join("vmlinuz"), "vmlinuz"),
        (guest.join("initrd.img"), "initrd.img"),
    ] {
        std::fs::copy(&from, stage.join(to)).unwrap();
    }
    std::fs::write(
        stage.join("isolinux.cfg"),
        "default vp\nprompt 0\ntimeout 1\nlabel vp\n  kernel /vmlinuz\n  append initrd=/initrd.img console=ttyS0 panic=-1 quiet\n",
    )
    .unwrap();
    let out = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-o"])
        .arg(iso)
        .args([
            "-b",
            "isolinux.bin",
            "-c",
            "boot.cat",
            "-no-emul-boot",
            "-boot-load-size",
            "4",
            "-boot-info-table",
            "-R",
        ])
        .arg(&stage)
        .output()
        .expect("xorriso is missing: run hack/install-deps.sh");
    assert!(
        out.status.success(),
        "xorriso: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&stage);
}

fn ready(o: &Vms) -> Option<(String, String, String)> {
    condition_of(&o.status.as_ref()?.conditions, "Ready")
}

#[tokio::test]
async fn a_cdrom_with_boot_order_1_boots_the_guest_from_the_iso() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-iso");
    let server = FixtureServer::start(0);
    make_iso(&server.path("installer.iso"));
    kubectl_apply(
        &ns.name,
        &format!(
            "apiVersion: virtplane.io/v1alpha1\nkind: IsoDownload\nmetadata:\n  name: installer\nspec:\n  url: {}\n  pool: {}\n",
            server.url("installer.iso"),
            pool.name
        ),
    );
    let dl = wait_obj::<IsoDownload>(&client, &ns.name, "installer", "Completed", T, |o| {
        o.status.as_ref().and_then(|s| s.phase) == Some(DownloadPhase::Completed)
    })
    .await;
    let dl = dl.status.unwrap();
    assert_eq!(dl.format.as_deref(), Some("iso9660"), "{dl:?}");
    assert!(pool.path.join("installer.iso").exists());
    // No kernel: nothing else to boot. libvirt orders it by type, as `virsh define` leaves it.
    let guest = TestGuest::define_with("vp-iso", false, false);
    assert!(config_xml(&guest.name).contains("<boot dev='hd'/>"));

    kubectl_apply(
        &ns.name,
        &format!(
            "apiVersion: virtplane.io/v1alpha1\nkind: VirtualMachineStorage\nmetadata:\n  name: installer\nspec:\n  vm: {}\n  type: cdrom\n  bus: sata\n  bootOrder: 1\n  source:\n    isoDownload: installer\n",
            guest.name,
        ),
    );
    // Shut off: the definition is the whole change.
    let o = wait_obj::<Vms>(&client, &ns.name, "installer", "Ready=True", T, |o| {
        ready(o).is_some_and(|(s, _, _)| s == "True")
    })
    .await;
    let alias = format!("ua-vps-{}", o.uid().unwrap());
    let target = o.status.as_ref().unwrap().target.clone().unwrap();
    let config = config_xml(&guest.name);
    assert!(!config.contains("<boot dev="), "{config}");
    let cd = parse_domain(&config)
        .unwrap()
        .disk(&alias)
        .unwrap()
        .xml
        .clone();
    assert_eq!(disk_fields(&cd).boot_order, Some(1), "{cd}");
    let reasons = event_reasons(&client, &ns.name, "installer").await;
    assert!(
        reasons.iter().any(|r| r == "BootOrderConverted"),
        "{reasons:?}"
    );

    // Started, the guest reaches its ready marker: it booted from the CD.
    guest.start().await;
    let stats = virsh(&["domblkstat", &guest.name, &target]);
    let read: u64 = stats
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{target} rd_req")))
        .or_else(|| stats.lines().find_map(|l| l.trim().strip_prefix("rd_req")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rd_req in {stats}"));
    assert!(read > 0, "the medium was read: {stats}");
    let live = live_xml(&guest.name);
    let cd = parse_domain(&live)
        .unwrap()
        .disk(&alias)
        .unwrap()
        .xml
        .clone();
    assert_eq!(disk_fields(&cd).boot_order, Some(1), "{cd}");
}
