//! Building the `VirtualMachineConfigSpec` of `CreateVM_Task` from a [`VmSpec`](virtrigaud_core::VmSpec), and the map
//! of guest OS names to vSphere guest ids.
//!
//! Element order follows the WSDL (`VirtualMachineConfigSpec`: name, guestId, annotation, files,
//! numCPUs, memoryMB, deviceChange…, firmware; `VirtualDevice`: key, backing, connectable,
//! controllerKey, unitNumber; `VirtualDisk` then capacityInKB, capacityInBytes), which real
//! vCenter and ESXi enforce even where the simulator does not.

use crate::config::{NicModel, ScsiModel};
use crate::xml::esc;
use virtrigaud_core::{DiskBus, Error, Firmware, Result};

/// The vSphere guest id for a guest OS name from another hypervisor.
///
/// Understood: vSphere ids themselves (anything ending in `Guest`, kept as is); libosinfo ids
/// and URLs (`http://ubuntu.com/ubuntu/22.04`, `debian12`, `rhel9.2`, `win2k22`, `win11`);
/// Proxmox `ostype` values (`l26`, `l24`, `win11`, `win10`, `win8`, `win7`, `w2k8`, `wxp`,
/// `solaris`, `other`). Unknown Linux → `other4xLinux64Guest`, anything else → `otherGuest64`.
///
/// | source | guest id |
/// |---|---|
/// | ubuntu | `ubuntu64Guest` |
/// | debian 10 / 11 / 12 | `debian10_64Guest` / `debian11_64Guest` / `debian12_64Guest` (older: `debian10_64Guest`) |
/// | rhel, centos, rocky, alma, oracle 7 / 8 / 9 | `rhel7_64Guest` / `rhel8_64Guest` / `rhel9_64Guest` |
/// | sles 12 / 15 | `sles12_64Guest` / `sles15_64Guest` |
/// | win11, win10, win8, win7 | `windows11_64Guest`, `windows9_64Guest`, `windows8_64Guest`, `windows7_64Guest` |
/// | win2k22 / win2k19 / win2k16 / win2k12 | `windows2019srvNext_64Guest` / `windows2019srv_64Guest` / `windows9Server64Guest` / `windows8Server64Guest` |
/// | l26 / linux | `other4xLinux64Guest` |
pub fn guest_id(os: Option<&str>) -> String {
    let Some(os) = os.map(str::trim).filter(|s| !s.is_empty()) else {
        return "otherGuest64".into();
    };
    if os.ends_with("Guest") && !os.contains('/') {
        return os.to_string();
    }
    let s = os.to_ascii_lowercase();
    let ver = |prefix: &str| -> Option<u32> {
        let i = s.rfind(prefix)? + prefix.len();
        let digits: String = s[i..]
            .trim_start_matches(['/', '-', '_'])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    if s.contains("ubuntu") {
        "ubuntu64Guest".to_string()
    } else if s.contains("debian") {
        match ver("debian") {
            Some(v) if v >= 12 => "debian12_64Guest".into(),
            Some(11) => "debian11_64Guest".into(),
            _ => "debian10_64Guest".into(),
        }
    } else if ["rhel", "centos", "rocky", "alma", "oracle", "redhat"]
        .iter()
        .any(|k| s.contains(k))
    {
        let v = [
            "rhel",
            "centos",
            "rocky",
            "almalinux",
            "alma",
            "ol",
            "redhat",
        ]
        .iter()
        .find_map(|p| ver(p));
        match v {
            Some(v) if v >= 9 => "rhel9_64Guest".into(),
            Some(8) => "rhel8_64Guest".into(),
            _ => "rhel7_64Guest".into(),
        }
    } else if s.contains("sles") || s.contains("suse") {
        match ver("sles") {
            Some(v) if v >= 15 => "sles15_64Guest".into(),
            _ => "sles12_64Guest".into(),
        }
    } else if s.contains("win2k22") || s.contains("2022") {
        "windows2019srvNext_64Guest".into()
    } else if s.contains("win2k19") || s.contains("2019") {
        "windows2019srv_64Guest".into()
    } else if s.contains("win2k16") || s.contains("2016") {
        "windows9Server64Guest".into()
    } else if s.contains("win2k12") || s.contains("2012") {
        "windows8Server64Guest".into()
    } else if s.contains("win11") {
        "windows11_64Guest".into()
    } else if s.contains("win10") {
        "windows9_64Guest".into()
    } else if s.contains("win8") {
        "windows8_64Guest".into()
    } else if s.contains("win7") {
        "windows7_64Guest".into()
    } else if s.contains("win") || s == "w2k8" || s == "wxp" || s == "wvista" {
        "windows9_64Guest".into()
    } else if s == "l26" || s == "l24" || s.contains("linux") || s.contains("fedora") {
        "other4xLinux64Guest".into()
    } else if s.contains("freebsd") {
        "freebsd12_64Guest".into()
    } else if s.contains("solaris") {
        "solaris11_64Guest".into()
    } else {
        "otherGuest64".into()
    }
}

/// A disk to attach.
#[derive(Debug, Clone)]
pub struct DiskAttach {
    /// `[ds] path.vmdk`.
    pub file: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Bus.
    pub bus: DiskBus,
}

/// The network backing of a NIC.
#[derive(Debug, Clone)]
pub enum NetBacking {
    /// A standard port group / network by name.
    Network {
        /// Its name.
        name: String,
        /// The `Network` object.
        moref: crate::client::MoRef,
    },
    /// A distributed port group.
    Distributed {
        /// The switch's UUID.
        switch_uuid: String,
        /// The port group key.
        portgroup_key: String,
    },
}

/// A NIC to add.
#[derive(Debug, Clone)]
pub struct NicAttach {
    /// Backing.
    pub backing: NetBacking,
    /// MAC to keep (manual address), when given.
    pub mac: Option<String>,
}

/// What [`config_spec`] needs.
#[derive(Debug, Clone)]
pub struct CreateSpec<'a> {
    /// VM name.
    pub name: &'a str,
    /// Guest id.
    pub guest_id: String,
    /// Annotation.
    pub annotation: Option<&'a str>,
    /// `files.vmPathName` (`[ds] dir/name.vmx`).
    pub vmx_path: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory.
    pub memory_mib: u64,
    /// Firmware.
    pub firmware: Firmware,
    /// Disks.
    pub disks: Vec<DiskAttach>,
    /// NICs.
    pub nics: Vec<NicAttach>,
    /// SCSI model.
    pub scsi: ScsiModel,
    /// NIC model.
    pub nic_model: NicModel,
}

fn device_add(inner: &str) -> String {
    format!("<deviceChange><operation>add</operation>{inner}</deviceChange>")
}

/// The guest id of a new VM: `override_id` (the configured
/// [`VsphereConfig::guest_id_override`](crate::VsphereConfig::guest_id_override)) when set
/// and not empty, else [`guest_id`] of the source's guest OS name.
pub fn resolve_guest_id(override_id: Option<&str>, os: Option<&str>) -> String {
    match override_id.map(str::trim).filter(|s| !s.is_empty()) {
        Some(o) => o.to_string(),
        None => guest_id(os),
    }
}

/// The `VirtualMachineConfigSpec` XML (its children) for `CreateVM_Task`.
///
/// Controllers: one per bus used — SCSI (the configured model, bus 0, unit 7 reserved), SATA
/// (`VirtualAHCIController`), NVMe (`VirtualNVMEController`); IDE disks go on the two IDE
/// controllers every VM has (keys 200 and 201). virtio disks from KVM go on SCSI.
pub fn config_spec(s: &CreateSpec<'_>) -> Result<String> {
    let mut x = String::new();
    x.push_str(&format!("<name>{}</name>", esc(s.name)));
    x.push_str(&format!("<guestId>{}</guestId>", esc(&s.guest_id)));
    if let Some(a) = s.annotation {
        x.push_str(&format!("<annotation>{}</annotation>", esc(a)));
    }
    x.push_str(&format!(
        "<files><vmPathName>{}</vmPathName></files>",
        esc(&s.vmx_path)
    ));
    if s.cpus == 0 || s.memory_mib == 0 {
        return Err(Error::invalid(
            "a VM needs at least one vCPU and some memory",
        ));
    }
    x.push_str(&format!("<numCPUs>{}</numCPUs>", s.cpus));
    x.push_str(&format!("<memoryMB>{}</memoryMB>", s.memory_mib));

    let bus_of = |b: DiskBus| match b {
        DiskBus::Virtio | DiskBus::Scsi => DiskBus::Scsi,
        other => other,
    };
    let used = |b: DiskBus| s.disks.iter().any(|d| bus_of(d.bus) == b);
    const SCSI: i32 = -100;
    const SATA: i32 = -200;
    const NVME: i32 = -300;
    if used(DiskBus::Scsi) {
        x.push_str(&device_add(&format!(
            "<device xsi:type=\"{}\"><key>{SCSI}</key><busNumber>0</busNumber>\
             <sharedBus>noSharing</sharedBus></device>",
            s.scsi.device_type()
        )));
    }
    if used(DiskBus::Sata) {
        x.push_str(&device_add(&format!(
            "<device xsi:type=\"VirtualAHCIController\"><key>{SATA}</key>\
             <busNumber>0</busNumber></device>"
        )));
    }
    if used(DiskBus::Nvme) {
        x.push_str(&device_add(&format!(
            "<device xsi:type=\"VirtualNVMEController\"><key>{NVME}</key>\
             <busNumber>0</busNumber></device>"
        )));
    }
    let (mut scsi_unit, mut sata_unit, mut nvme_unit, mut ide_slot) = (0i32, 0i32, 0i32, 0i32);
    for (i, d) in s.disks.iter().enumerate() {
        let (ctrl, unit) = match bus_of(d.bus) {
            DiskBus::Scsi => {
                if scsi_unit == 7 {
                    scsi_unit += 1;
                }
                let u = scsi_unit;
                scsi_unit += 1;
                (SCSI, u)
            }
            DiskBus::Sata => {
                let u = sata_unit;
                sata_unit += 1;
                (SATA, u)
            }
            DiskBus::Nvme => {
                let u = nvme_unit;
                nvme_unit += 1;
                (NVME, u)
            }
            DiskBus::Ide | DiskBus::Virtio => {
                let slot = ide_slot;
                ide_slot += 1;
                (200 + slot / 2, slot % 2)
            }
        };
        let limit = match bus_of(d.bus) {
            DiskBus::Scsi => 16,
            DiskBus::Sata => 30,
            DiskBus::Nvme => 15,
            _ => 2,
        };
        if (ctrl == 200 + 1 && unit >= 2) || ctrl > 201 || (ctrl < 0 && unit >= limit) {
            return Err(Error::unsupported(format!(
                "too many disks on one {:?} controller (one controller per bus is created)",
                d.bus
            )));
        }
        if d.capacity == 0 || !d.capacity.is_multiple_of(1024) {
            return Err(Error::invalid(format!(
                "disk {} has {} bytes: vSphere disks are whole KiB",
                d.file, d.capacity
            )));
        }
        x.push_str(&device_add(&format!(
            "<device xsi:type=\"VirtualDisk\"><key>{}</key>\
             <backing xsi:type=\"VirtualDiskFlatVer2BackingInfo\"><fileName>{}</fileName>\
             <diskMode>persistent</diskMode><thinProvisioned>true</thinProvisioned></backing>\
             <controllerKey>{ctrl}</controllerKey><unitNumber>{unit}</unitNumber>\
             <capacityInKB>{}</capacityInKB><capacityInBytes>{}</capacityInBytes></device>",
            -1000 - i as i32,
            esc(&d.file),
            d.capacity / 1024,
            d.capacity
        )));
    }
    for (i, n) in s.nics.iter().enumerate() {
        let backing = match &n.backing {
            NetBacking::Network { name, moref } => format!(
                "<backing xsi:type=\"VirtualEthernetCardNetworkBackingInfo\">\
                 <deviceName>{}</deviceName>{}</backing>",
                esc(name),
                moref.xml("network")
            ),
            NetBacking::Distributed {
                switch_uuid,
                portgroup_key,
            } => format!(
                "<backing xsi:type=\"VirtualEthernetCardDistributedVirtualPortBackingInfo\">\
                 <port><switchUuid>{}</switchUuid><portgroupKey>{}</portgroupKey></port></backing>",
                esc(switch_uuid),
                esc(portgroup_key)
            ),
        };
        let addr = match &n.mac {
            Some(m) => format!(
                "<addressType>manual</addressType><macAddress>{}</macAddress>",
                esc(m)
            ),
            None => "<addressType>generated</addressType>".to_string(),
        };
        x.push_str(&device_add(&format!(
            "<device xsi:type=\"{}\"><key>{}</key>{backing}<connectable>\
             <startConnected>true</startConnected><allowGuestControl>true</allowGuestControl>\
             <connected>false</connected></connectable>{addr}</device>",
            s.nic_model.device_type(),
            -2000 - i as i32
        )));
    }
    x.push_str(&format!(
        "<firmware>{}</firmware>",
        match s.firmware {
            Firmware::Bios => "bios",
            Firmware::Uefi => "efi",
        }
    ));
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::MoRef;

    #[test]
    fn guest_ids() {
        assert_eq!(
            guest_id(Some("http://ubuntu.com/ubuntu/22.04")),
            "ubuntu64Guest"
        );
        assert_eq!(
            guest_id(Some("http://debian.org/debian/12")),
            "debian12_64Guest"
        );
        assert_eq!(guest_id(Some("debian11")), "debian11_64Guest");
        assert_eq!(guest_id(Some("rhel9.2")), "rhel9_64Guest");
        assert_eq!(
            guest_id(Some("http://rockylinux.org/rocky/8")),
            "rhel8_64Guest"
        );
        assert_eq!(guest_id(Some("win11")), "windows11_64Guest");
        assert_eq!(guest_id(Some("win2k22")), "windows2019srvNext_64Guest");
        assert_eq!(guest_id(Some("l26")), "other4xLinux64Guest");
        assert_eq!(guest_id(Some("centos7_64Guest")), "centos7_64Guest");
        assert_eq!(guest_id(None), "otherGuest64");
        assert_eq!(guest_id(Some("plan9")), "otherGuest64");
        // The configured override wins over the map; an empty one does not count.
        assert_eq!(
            resolve_guest_id(Some("rhel9_64Guest"), Some("debian12")),
            "rhel9_64Guest"
        );
        assert_eq!(resolve_guest_id(None, Some("debian12")), "debian12_64Guest");
        assert_eq!(
            resolve_guest_id(Some(" "), Some("win11")),
            "windows11_64Guest"
        );
    }

    /// LSI Logic as the SCSI model, NVMe disks on their own controller, IDE disks spread over
    /// the two built-in IDE controllers, an e1000e NIC on a distributed port group.
    #[test]
    fn lsi_logic_nvme_ide_and_e1000e() {
        let bus = [
            DiskBus::Scsi,
            DiskBus::Nvme,
            DiskBus::Nvme,
            DiskBus::Ide,
            DiskBus::Ide,
            DiskBus::Ide,
        ];
        let disks = bus
            .iter()
            .enumerate()
            .map(|(i, b)| DiskAttach {
                file: format!("[ds] v/d{i}.vmdk"),
                capacity: 2 << 20,
                bus: *b,
            })
            .collect();
        let mut s = CreateSpec {
            name: "v",
            guest_id: resolve_guest_id(Some("centos7_64Guest"), Some("debian12")),
            annotation: None,
            vmx_path: "[ds] v/v.vmx".into(),
            cpus: 1,
            memory_mib: 128,
            firmware: Firmware::Bios,
            disks,
            nics: vec![NicAttach {
                backing: NetBacking::Distributed {
                    switch_uuid: "50 1a".into(),
                    portgroup_key: "dvportgroup-9".into(),
                },
                mac: None,
            }],
            scsi: ScsiModel::LsiLogic,
            nic_model: NicModel::E1000e,
        };
        let x = config_spec(&s).unwrap();
        assert!(x.contains("<guestId>centos7_64Guest</guestId>"), "{x}");
        assert!(x.contains(
            "<device xsi:type=\"VirtualLsiLogicController\"><key>-100</key><busNumber>0</busNumber>"
        ));
        assert!(!x.contains("ParaVirtualSCSIController") && !x.contains("LsiLogicSAS"));
        assert!(x.contains("<device xsi:type=\"VirtualNVMEController\"><key>-300</key>"));
        assert!(!x.contains("VirtualAHCIController"));
        let disk = |file: &str, ctrl: i32, unit: i32| {
            format!(
                "<fileName>[ds] v/{file}</fileName><diskMode>persistent</diskMode>\
                 <thinProvisioned>true</thinProvisioned></backing>\
                 <controllerKey>{ctrl}</controllerKey><unitNumber>{unit}</unitNumber>"
            )
        };
        for (file, ctrl, unit) in [
            ("d0.vmdk", -100, 0),
            ("d1.vmdk", -300, 0),
            ("d2.vmdk", -300, 1),
            ("d3.vmdk", 200, 0),
            ("d4.vmdk", 200, 1),
            ("d5.vmdk", 201, 0),
        ] {
            assert!(
                x.contains(&disk(file, ctrl, unit)),
                "{file} not on {ctrl}:{unit}"
            );
        }
        assert!(x.contains("<device xsi:type=\"VirtualE1000e\"><key>-2000</key>"));
        assert!(x.contains(
            "<port><switchUuid>50 1a</switchUuid><portgroupKey>dvportgroup-9</portgroupKey></port>"
        ));
        assert!(x.contains("<addressType>generated</addressType>"));
        assert!(x.contains("<firmware>bios</firmware>"));
        // LSI Logic SAS is its own model; a fifth IDE disk has no slot.
        s.scsi = ScsiModel::LsiLogicSas;
        assert!(
            config_spec(&s)
                .unwrap()
                .contains("VirtualLsiLogicSASController")
        );
        for i in 6..8 {
            s.disks.push(DiskAttach {
                file: format!("[ds] v/d{i}.vmdk"),
                capacity: 2 << 20,
                bus: DiskBus::Ide,
            });
        }
        assert_eq!(
            config_spec(&s).unwrap_err().kind(),
            virtrigaud_core::ErrorKind::Unsupported
        );
    }

    #[test]
    fn controllers_per_bus_and_unit_seven_skipped() {
        let disks = (0..9)
            .map(|i| DiskAttach {
                file: format!("[ds] v/d{i}.vmdk"),
                capacity: 1 << 20,
                bus: if i == 8 {
                    DiskBus::Sata
                } else {
                    DiskBus::Virtio
                },
            })
            .collect();
        let s = CreateSpec {
            name: "v<1>",
            guest_id: "otherGuest64".into(),
            annotation: Some("a & b"),
            vmx_path: "[ds] v/v.vmx".into(),
            cpus: 2,
            memory_mib: 512,
            firmware: Firmware::Uefi,
            disks,
            nics: vec![NicAttach {
                backing: NetBacking::Network {
                    name: "VM Network".into(),
                    moref: MoRef::new("Network", "network-7"),
                },
                mac: Some("52:54:00:12:34:56".into()),
            }],
            scsi: ScsiModel::ParaVirtual,
            nic_model: NicModel::Vmxnet3,
        };
        let x = config_spec(&s).unwrap();
        assert!(x.contains("<name>v&lt;1&gt;</name>"));
        assert!(x.contains("<annotation>a &amp; b</annotation>"));
        assert!(x.contains("ParaVirtualSCSIController"));
        assert!(x.contains("VirtualAHCIController"));
        assert!(!x.contains("<unitNumber>7</unitNumber>"));
        assert!(x.contains("<unitNumber>8</unitNumber>"));
        assert!(x.contains("<firmware>efi</firmware>"));
        assert!(x.contains("<macAddress>52:54:00:12:34:56</macAddress>"));
        // WSDL order: deviceChange before firmware, numCPUs before memoryMB.
        assert!(x.find("<numCPUs>").unwrap() < x.find("<memoryMB>").unwrap());
        assert!(x.rfind("</deviceChange>").unwrap() < x.find("<firmware>").unwrap());
    }
}
