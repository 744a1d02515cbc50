//! Reading a VM's hardware from `config.hardware.device` and the rest of its properties.

use crate::client::MoRef;
use crate::xml::Node;
use virtrigaud_core::format::{DiskFormat, VmdkSubformat};
use virtrigaud_core::{DiskBus, DiskInfo, Error, NicInfo, PowerState, Result};

/// The VM properties [`describe`](crate::VsphereProvider) reads.
pub const VM_PATHS: &[&str] = &[
    "name",
    "config.instanceUuid",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "config.firmware",
    "config.guestId",
    "config.annotation",
    "config.changeTrackingEnabled",
    "runtime.powerState",
    "guest.toolsRunningStatus",
    "snapshot",
];

/// A controller of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    /// Device key.
    pub key: i32,
    /// vSphere device type (`ParaVirtualSCSIController`, `VirtualAHCIController`, …).
    pub device_type: String,
    /// Bus.
    pub bus: DiskBus,
    /// Bus number.
    pub bus_number: i32,
}

/// Everything vSphere says about one virtual disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsphereDisk {
    /// Device key (the disk id we use).
    pub key: i32,
    /// Label (`Hard disk 1`), when present.
    pub label: Option<String>,
    /// Controller type (`ParaVirtualSCSIController`, …).
    pub controller_type: Option<String>,
    /// Bus.
    pub bus: Option<DiskBus>,
    /// Controller's bus number.
    pub bus_number: Option<i32>,
    /// Unit number on the controller.
    pub unit_number: Option<i32>,
    /// Backing file `[ds] path.vmdk`.
    pub file: String,
    /// Backing type (`VirtualDiskFlatVer2BackingInfo`, …).
    pub backing_type: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Thin provisioned.
    pub thin: Option<bool>,
    /// Datastore of the backing.
    pub datastore: Option<MoRef>,
    /// The backing has a parent: the disk is a delta of a snapshot chain.
    pub has_parent: bool,
    /// `diskMode` (`persistent`, `independent_persistent`, …).
    pub mode: Option<String>,
}

impl VsphereDisk {
    /// The core description.
    pub fn info(&self) -> DiskInfo {
        DiskInfo {
            id: self.key.to_string(),
            capacity: self.capacity,
            allocation: None,
            format: (self.backing_type == "VirtualDiskFlatVer2BackingInfo")
                .then_some(DiskFormat::Vmdk(VmdkSubformat::MonolithicFlat)),
            bus: self.bus,
            location: self.file.clone(),
        }
    }
}

/// One network adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsphereNic {
    /// Device key.
    pub key: i32,
    /// Adapter type (`VirtualVmxnet3`, `VirtualE1000e`, …).
    pub adapter: String,
    /// MAC address.
    pub mac: Option<String>,
    /// Standard network name (`deviceName` of a network backing).
    pub network_name: Option<String>,
    /// Distributed port group key.
    pub portgroup_key: Option<String>,
    /// Opaque network id (NSX).
    pub opaque_id: Option<String>,
}

impl VsphereNic {
    /// The core description (`network` resolved by the caller for port groups).
    pub fn info(&self, network: Option<String>) -> NicInfo {
        NicInfo {
            mac: self.mac.clone(),
            model: Some(nic_model_name(&self.adapter).to_string()),
            network: network.or_else(|| self.network_name.clone()),
        }
    }
}

/// The short model name of an adapter type (`VirtualVmxnet3` → `vmxnet3`).
pub fn nic_model_name(adapter: &str) -> &str {
    match adapter {
        "VirtualVmxnet3" => "vmxnet3",
        "VirtualVmxnet2" => "vmxnet2",
        "VirtualVmxnet" => "vmxnet",
        "VirtualE1000" => "e1000",
        "VirtualE1000e" => "e1000e",
        "VirtualPCNet32" => "pcnet32",
        "VirtualSriovEthernetCard" => "sriov",
        other => other,
    }
}

/// Whether a device type is a network adapter.
fn is_nic(t: &str) -> bool {
    matches!(
        t,
        "VirtualVmxnet3"
            | "VirtualVmxnet3Vrdma"
            | "VirtualVmxnet2"
            | "VirtualVmxnet"
            | "VirtualE1000"
            | "VirtualE1000e"
            | "VirtualPCNet32"
            | "VirtualSriovEthernetCard"
    )
}

/// The bus of a controller type.
pub fn controller_bus(t: &str) -> Option<DiskBus> {
    Some(match t {
        "ParaVirtualSCSIController"
        | "VirtualLsiLogicController"
        | "VirtualLsiLogicSASController"
        | "VirtualBusLogicController" => DiskBus::Scsi,
        "VirtualAHCIController" | "VirtualSATAController" => DiskBus::Sata,
        "VirtualIDEController" => DiskBus::Ide,
        "VirtualNVMEController" => DiskBus::Nvme,
        _ => return None,
    })
}

/// The hardware of a VM.
#[derive(Debug, Clone, Default)]
pub struct Hardware {
    /// Controllers.
    pub controllers: Vec<Controller>,
    /// Disks, in device order.
    pub disks: Vec<VsphereDisk>,
    /// NICs.
    pub nics: Vec<VsphereNic>,
}

/// Parses the `ArrayOfVirtualDevice` value node.
pub fn parse_devices(devices: &Node) -> Hardware {
    let mut hw = Hardware::default();
    let all: Vec<&Node> = devices
        .children
        .iter()
        .filter(|d| d.name == "VirtualDevice" || d.name == "device")
        .collect();
    for d in &all {
        let t = d.xsi_type.as_deref().unwrap_or("");
        let Some(key) = d.parse_at::<i32>(&["key"]) else {
            continue;
        };
        if let Some(bus) = controller_bus(t) {
            hw.controllers.push(Controller {
                key,
                device_type: t.to_string(),
                bus,
                bus_number: d.parse_at(&["busNumber"]).unwrap_or(0),
            });
        }
    }
    for d in &all {
        let t = d.xsi_type.as_deref().unwrap_or("");
        let Some(key) = d.parse_at::<i32>(&["key"]) else {
            continue;
        };
        if t == "VirtualDisk" {
            let backing = d.child("backing");
            let ctrl_key: Option<i32> = d.parse_at(&["controllerKey"]);
            let ctrl = ctrl_key.and_then(|k| hw.controllers.iter().find(|c| c.key == k));
            let capacity = d
                .parse_at::<u64>(&["capacityInBytes"])
                .filter(|c| *c > 0)
                .or_else(|| d.parse_at::<u64>(&["capacityInKB"]).map(|k| k * 1024))
                .unwrap_or(0);
            hw.disks.push(VsphereDisk {
                key,
                label: d.text_at(&["deviceInfo", "label"]).map(str::to_string),
                controller_type: ctrl.map(|c| c.device_type.clone()),
                bus: ctrl.map(|c| c.bus),
                bus_number: ctrl.map(|c| c.bus_number),
                unit_number: d.parse_at(&["unitNumber"]),
                file: backing
                    .and_then(|b| b.text_at(&["fileName"]))
                    .unwrap_or("")
                    .to_string(),
                backing_type: backing.and_then(|b| b.xsi_type.clone()).unwrap_or_default(),
                capacity,
                thin: backing.and_then(|b| b.parse_at(&["thinProvisioned"])),
                datastore: backing
                    .and_then(|b| b.child("datastore"))
                    .and_then(MoRef::from_node),
                has_parent: backing
                    .and_then(|b| b.child("parent"))
                    .is_some_and(|p| !p.children.is_empty()),
                mode: backing
                    .and_then(|b| b.text_at(&["diskMode"]))
                    .map(str::to_string),
            });
        } else if is_nic(t) {
            let backing = d.child("backing");
            hw.nics.push(VsphereNic {
                key,
                adapter: t.to_string(),
                mac: d
                    .text_at(&["macAddress"])
                    .filter(|m| !m.is_empty())
                    .map(str::to_string),
                network_name: backing
                    .filter(|b| {
                        b.xsi_type.as_deref() == Some("VirtualEthernetCardNetworkBackingInfo")
                    })
                    .and_then(|b| b.text_at(&["deviceName"]))
                    .map(str::to_string),
                portgroup_key: backing
                    .and_then(|b| b.text_at(&["port", "portgroupKey"]))
                    .map(str::to_string),
                opaque_id: backing
                    .and_then(|b| b.text_at(&["opaqueNetworkId"]))
                    .map(str::to_string),
            });
        }
    }
    hw
}

/// The power state of `runtime.powerState`.
pub fn power_state(s: Option<&str>) -> PowerState {
    match s {
        Some("poweredOn") => PowerState::Running,
        Some("poweredOff") => PowerState::Stopped,
        Some("suspended") => PowerState::Paused,
        _ => PowerState::Unknown,
    }
}

/// A snapshot in the VM's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotNode {
    /// The snapshot object.
    pub snapshot: MoRef,
    /// Its name.
    pub name: String,
}

/// Flattens the `snapshot.rootSnapshotList` tree.
pub fn snapshots(info: &Node) -> Vec<SnapshotNode> {
    fn walk(n: &Node, out: &mut Vec<SnapshotNode>) {
        for t in n
            .children
            .iter()
            .filter(|c| c.name == "rootSnapshotList" || c.name == "childSnapshotList")
        {
            if let (Some(s), Some(name)) = (
                t.child("snapshot").and_then(MoRef::from_node),
                t.text_at(&["name"]),
            ) {
                out.push(SnapshotNode {
                    snapshot: s,
                    name: name.to_string(),
                });
            }
            walk(t, out);
        }
    }
    let mut out = Vec::new();
    walk(info, &mut out);
    out
}

/// One answer of `QueryChangedDiskAreas` (a `DiskChangeInfo`): the span of the disk it covers
/// and the areas inside that span that hold data (change id `*`) or changed since a change id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskChangeInfo {
    /// First byte of the span covered.
    pub start_offset: u64,
    /// Length of the span covered.
    pub length: u64,
    /// The areas, in bytes, each inside the span.
    pub areas: Vec<std::ops::Range<u64>>,
}

/// Reads a `QueryChangedDiskAreasResponse`; areas outside the span they come with are
/// `Corrupt`.
pub fn parse_disk_change_info(response: &Node) -> Result<DiskChangeInfo> {
    let rv = response
        .child("returnval")
        .ok_or_else(|| Error::corrupt("QueryChangedDiskAreas: no returnval"))?;
    let num = |n: &Node, path: &[&str]| -> Result<u64> {
        n.parse_at::<u64>(path).ok_or_else(|| {
            Error::corrupt(format!(
                "QueryChangedDiskAreas: missing or bad {}",
                path.join(".")
            ))
        })
    };
    let start_offset = num(rv, &["startOffset"])?;
    let length = num(rv, &["length"])?;
    let span_end = start_offset
        .checked_add(length)
        .ok_or_else(|| Error::corrupt("QueryChangedDiskAreas: span overflows"))?;
    let mut areas = Vec::new();
    for a in rv.children_named("changedArea") {
        let s = num(a, &["start"])?;
        let l = num(a, &["length"])?;
        let e = s
            .checked_add(l)
            .filter(|e| s >= start_offset && *e <= span_end)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "QueryChangedDiskAreas: area {s}+{l} outside the span \
                     {start_offset}+{length}"
                ))
            })?;
        if l > 0 {
            areas.push(s..e);
        }
    }
    Ok(DiskChangeInfo {
        start_offset,
        length,
        areas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICES: &str = r#"<val xmlns:i="x" i:type="ArrayOfVirtualDevice">
<VirtualDevice i:type="VirtualIDEController"><key>200</key><busNumber>0</busNumber></VirtualDevice>
<VirtualDevice i:type="ParaVirtualSCSIController"><key>1000</key><busNumber>0</busNumber></VirtualDevice>
<VirtualDevice i:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label></deviceInfo>
<backing i:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] vm/vm.vmdk</fileName>
<datastore type="Datastore">datastore-1</datastore><diskMode>persistent</diskMode>
<thinProvisioned>true</thinProvisioned>
<parent i:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] vm/base.vmdk</fileName></parent></backing>
<controllerKey>1000</controllerKey><unitNumber>0</unitNumber><capacityInKB>1024</capacityInKB>
<capacityInBytes>1048576</capacityInBytes></VirtualDevice>
<VirtualDevice i:type="VirtualVmxnet3"><key>4000</key>
<backing i:type="VirtualEthernetCardNetworkBackingInfo"><deviceName>VM Network</deviceName></backing>
<macAddress>00:50:56:00:00:01</macAddress></VirtualDevice>
<VirtualDevice i:type="VirtualE1000"><key>4001</key>
<backing i:type="VirtualEthernetCardDistributedVirtualPortBackingInfo"><port><switchUuid>u</switchUuid>
<portgroupKey>dvportgroup-13</portgroupKey></port></backing></VirtualDevice>
</val>"#;

    #[test]
    fn devices_are_read() {
        let n = crate::xml::parse(DEVICES.as_bytes()).unwrap();
        let hw = parse_devices(&n);
        assert_eq!(hw.controllers.len(), 2);
        let d = &hw.disks[0];
        assert_eq!(d.key, 2000);
        assert_eq!(d.bus, Some(DiskBus::Scsi));
        assert_eq!(
            d.controller_type.as_deref(),
            Some("ParaVirtualSCSIController")
        );
        assert_eq!(d.unit_number, Some(0));
        assert_eq!(d.file, "[ds1] vm/vm.vmdk");
        assert_eq!(d.capacity, 1 << 20);
        assert_eq!(d.thin, Some(true));
        assert!(d.has_parent);
        assert_eq!(d.datastore, Some(MoRef::new("Datastore", "datastore-1")));
        assert_eq!(hw.nics.len(), 2);
        assert_eq!(hw.nics[0].network_name.as_deref(), Some("VM Network"));
        assert_eq!(hw.nics[0].info(None).model.as_deref(), Some("vmxnet3"));
        assert_eq!(hw.nics[1].portgroup_key.as_deref(), Some("dvportgroup-13"));
    }
}

#[cfg(test)]
mod change_info_tests {
    use super::*;

    /// A `QueryChangedDiskAreasResponse` shaped as the vSphere WSDL has it (vim25
    /// `DiskChangeInfo`: `startOffset`, `length`, `changedArea[]` of `start` + `length`).
    const RESPONSE: &str = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
      xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>
      <QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval>
        <startOffset>0</startOffset><length>1073741824</length>
        <changedArea><start>0</start><length>65536</length></changedArea>
        <changedArea><start>1048576</start><length>2097152</length></changedArea>
      </returnval></QueryChangedDiskAreasResponse></soapenv:Body></soapenv:Envelope>"#;

    fn response(xml: &str) -> Node {
        let env = crate::xml::parse(xml.as_bytes()).unwrap();
        env.path(&["Body"]).unwrap().children[0].clone()
    }

    #[test]
    fn disk_change_info_parses_and_checks_its_span() {
        let info = parse_disk_change_info(&response(RESPONSE)).unwrap();
        assert_eq!(info.start_offset, 0);
        assert_eq!(info.length, 1 << 30);
        assert_eq!(info.areas, vec![0..65536, 1048576..3145728]);

        let outside = RESPONSE.replace("<start>1048576</start>", "<start>1073741000</start>");
        let e = parse_disk_change_info(&response(&outside)).unwrap_err();
        assert_eq!(e.kind(), virtrigaud_core::ErrorKind::Corrupt, "{e}");
        let bad = RESPONSE.replace("<length>65536</length>", "<length>x</length>");
        assert!(parse_disk_change_info(&response(&bad)).is_err());
        let empty = r#"<Envelope><Body><QueryChangedDiskAreasResponse/></Body></Envelope>"#;
        assert!(parse_disk_change_info(&response(empty)).is_err());
    }
}
