use super::*;

const DISK: &str = "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none' io='native' discard='unmap' detect_zeroes='unmap'/>\
    <source file='/p/a.img'/><target dev='sdb' bus='scsi'/><serial>SN1</serial><shareable/><readonly/><boot order='2'/>\
    <iotune><total_bytes_sec>1000</total_bytes_sec><read_iops_sec>50</read_iops_sec><write_iops_sec_max>90</write_iops_sec_max><group_name>g</group_name></iotune>\
    <alias name='ua-vps-1'/><address type='drive' controller='0' bus='0' target='0' unit='1'/></disk>";

#[test]
fn reads_every_tunable_field() {
    let f = disk_fields(DISK);
    let mut iotune = [0; 12];
    iotune[0] = 1000;
    iotune[4] = 50;
    iotune[11] = 90;
    assert_eq!(
        f,
        DiskFields {
            format: Some("qcow2".into()),
            cache: Some("none".into()),
            io: Some("native".into()),
            discard: Some("unmap".into()),
            detect_zeroes: Some("unmap".into()),
            serial: Some("SN1".into()),
            shareable: true,
            readonly: true,
            boot_order: Some(2),
            iotune,
        }
    );
    // A bare disk has none; an unreadable one too.
    assert_eq!(
        disk_fields("<disk><driver name='qemu' type='raw' cache='default'/></disk>"),
        DiskFields {
            format: Some("raw".into()),
            ..Default::default()
        }
    );
    assert_eq!(disk_fields("<disk"), DiskFields::default());
}

#[test]
fn iotune_values_round_trip() {
    assert_eq!(iotune_values(None), [0; 12]);
    assert_eq!(iotune_of([0; 12]), None);
    let t = IoTune {
        read_bytes_sec: Some(7),
        write_iops_sec_max: Some(9),
        ..Default::default()
    };
    let v = iotune_values(Some(&t));
    assert_eq!((v[1], v[11], v.iter().sum::<u64>()), (7, 9, 16));
    assert_eq!(iotune_of(v), Some(t));
    // Names match libvirt's typed parameters.
    for ((name, _), param) in IOTUNE_FIELDS.iter().zip(IOTUNE_PARAMS) {
        assert_eq!(param.to_str().unwrap(), *name);
    }
}

#[test]
fn extras_are_written_where_libvirt_reads_them() {
    let mut v = [0; 12];
    v[3] = 100;
    let x = with_extras(
        "<disk type='file' device='disk'><target dev='sda' bus='scsi'/></disk>",
        Some("a&b"),
        true,
        &v,
    );
    let f = disk_fields(&x);
    assert_eq!(
        (f.serial.as_deref(), f.shareable, f.iotune),
        (Some("a&b"), true, v)
    );
    // Nothing asked, nothing added.
    let bare = "<disk><target dev='sda'/></disk>";
    assert_eq!(with_extras(bare, None, false, &[0; 12]), bare);
}

#[test]
fn a_disk_is_replaced_in_place_keeping_its_address() {
    let domain = format!(
        "<domain><name>d</name><os><type>hvm</type></os><devices><disk type='file' device='disk'><target dev='sda'/><alias name='other'/></disk>{DISK}<controller type='scsi'/></devices></domain>"
    );
    let new = "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='writeback'/><source file='/p/a.img'/><target dev='sdb' bus='scsi'/><alias name='ua-vps-1'/></disk>";
    let out = replace_device(&domain, "ua-vps-1", new).unwrap();
    let parsed = crate::libvirt::domain::parse_domain(&out).unwrap();
    assert_eq!(parsed.disks.len(), 2);
    assert_eq!(parsed.disks[0].alias.as_deref(), Some("other"));
    let mine = &parsed.disks[1];
    assert_eq!(disk_fields(&mine.xml).cache.as_deref(), Some("writeback"));
    assert!(
        mine.xml
            .contains("<address type='drive' controller='0' bus='0' target='0' unit='1'/>"),
        "{}",
        mine.xml
    );
    assert!(out.contains("<controller type='scsi'/>"));
    assert!(matches!(
        replace_device(&domain, "ua-vps-9", new),
        Err(RewriteError::NoDevice(_))
    ));
    assert!(matches!(
        replace_device("<domain", "a", new),
        Err(RewriteError::Xml(_))
    ));
}

/// A domain libvirt ordered by type whose only bootable device is the one getting an order.
const BY_TYPE: &str = "<domain><name>d</name><os><type>hvm</type><boot dev='hd'/></os><devices>\
    <disk type='file' device='disk'><source file='/p/a.img'/><target dev='vdb' bus='virtio'/><alias name='ua-vps-1'/><address type='pci' slot='0x05'/></disk>\
    </devices></domain>";

#[test]
fn a_boot_order_and_the_conversion_are_written_in_one_rewrite() {
    // Converting alone leaves no boot element at all here (the only disk is the one skipped);
    // libvirt puts <boot dev='hd'/> back into such a definition, so a second define with the
    // disk's order would be refused again, forever. One rewrite carries both.
    let alone = crate::libvirt::boot_order::convert(BY_TYPE, "ua-vps-1", 1)
        .unwrap()
        .unwrap();
    assert!(!alone.xml.contains("<boot"), "{}", alone.xml);
    let disk = "<disk type='file' device='disk'><source file='/p/a.img'/><target dev='vdb' bus='virtio'/><boot order='1'/><alias name='ua-vps-1'/></disk>";
    let (xml, converted) = write_device(BY_TYPE, "ua-vps-1", disk).unwrap();
    assert!(!xml.contains("<boot dev"), "{xml}");
    let parsed = crate::libvirt::domain::parse_domain(&xml).unwrap();
    assert!(parsed.os_boot.is_empty());
    let d = parsed.disk("ua-vps-1").unwrap();
    assert_eq!(disk_fields(&d.xml).boot_order, Some(1));
    assert!(d.xml.contains("slot='0x05'"), "address kept: {}", d.xml);
    assert_eq!(converted.as_deref(), Some("hd -> no device"));
    // Once converted, writing it again changes nothing more.
    let (again, converted) = write_device(&xml, "ua-vps-1", disk).unwrap();
    assert_eq!((again, converted), (xml, None));
}

#[test]
fn a_disk_without_a_boot_order_keeps_the_list_and_a_missing_disk_is_added() {
    let disk = "<disk type='file' device='disk'><source file='/p/b.img'/><target dev='vdc' bus='virtio'/><alias name='ua-vps-2'/></disk>";
    let (xml, converted) = write_device(BY_TYPE, "ua-vps-2", disk).unwrap();
    assert_eq!(converted, None);
    let parsed = crate::libvirt::domain::parse_domain(&xml).unwrap();
    assert_eq!(parsed.os_boot, ["hd"]);
    assert!(parsed.disk("ua-vps-1").is_some() && parsed.disk("ua-vps-2").is_some());
    let (xml, _) = write_device(
        "<domain><os><type>hvm</type></os><devices/></domain>",
        "ua-vps-2",
        disk,
    )
    .unwrap();
    assert!(xml.contains("<devices><disk"), "{xml}");
    assert!(write_device("<domain", "a", disk).is_err());
}
