//! Domain XML: parsing libvirt's description into [`VmInfo`] and generating a domain from a
//! [`VmSpec`].
//!
//! Parsing builds a small element tree with `quick-xml` and reads what virtrigaud models:
//! vCPUs, memory, firmware (`<os firmware='efi'>` or a `<loader>` of type `pflash`), machine
//! type, every `<disk device='disk'>` (target dev as id, bus, driver type as format, source
//! file, block device or pool/volume, first backing file) and every `<interface>` (MAC, model,
//! network or bridge — bridges are reported as `bridge:NAME`).

use quick_xml::escape::escape;
use quick_xml::events::{BytesStart, Event};
use virtrigaud_core::{
    DiskBus, DiskFormat, Error, Firmware, NicInfo, PowerState, Result, VmInfo, VmSpec,
};

/// An XML element with its attributes, children and text.
#[derive(Debug, Default, Clone)]
pub struct Element {
    /// Tag name.
    pub name: String,
    /// Attributes in document order.
    pub attrs: Vec<(String, String)>,
    /// Child elements.
    pub children: Vec<Element>,
    /// Concatenated text content.
    pub text: String,
}

impl Element {
    /// The value of attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }
    /// All children named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }
    /// Follows a path of child names.
    pub fn path(&self, path: &[&str]) -> Option<&Element> {
        let mut e = self;
        for p in path {
            e = e.child(p)?;
        }
        Some(e)
    }
}

fn start_element(e: &BytesStart<'_>) -> Result<Element> {
    let mut el = Element {
        name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
        ..Element::default()
    };
    for a in e.attributes() {
        let a = a.map_err(|e| Error::corrupt(format!("bad XML attribute: {e}")))?;
        let v = a
            .unescape_value()
            .map_err(|e| Error::corrupt(format!("bad XML attribute value: {e}")))?;
        el.attrs.push((
            String::from_utf8_lossy(a.key.as_ref()).into_owned(),
            v.into_owned(),
        ));
    }
    Ok(el)
}

/// Parses an XML document into its root element.
pub fn parse(xml: &str) -> Result<Element> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<Element> = Vec::new();
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| Error::corrupt(format!("bad XML from libvirt: {e}")))?;
        match ev {
            Event::Start(e) => stack.push(start_element(&e)?),
            Event::Empty(e) => {
                let el = start_element(&e)?;
                match stack.last_mut() {
                    Some(p) => p.children.push(el),
                    None => return Ok(el),
                }
            }
            Event::End(_) => {
                let el = stack
                    .pop()
                    .ok_or_else(|| Error::corrupt("unbalanced XML from libvirt"))?;
                match stack.last_mut() {
                    Some(p) => p.children.push(el),
                    None => return Ok(el),
                }
            }
            Event::Text(t) => {
                if let Some(p) = stack.last_mut() {
                    let s = t
                        .unescape()
                        .map_err(|e| Error::corrupt(format!("bad XML text: {e}")))?;
                    p.text.push_str(&s);
                }
            }
            Event::CData(t) => {
                if let Some(p) = stack.last_mut() {
                    p.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::Eof => return Err(Error::corrupt("XML from libvirt ended early")),
            _ => {}
        }
    }
}

/// Where a disk's bytes live, as the domain XML says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A file (or block device) path on the libvirt host.
    Path(String),
    /// A volume in a storage pool.
    Volume {
        /// Pool name.
        pool: String,
        /// Volume name.
        volume: String,
    },
    /// Something virtrigaud cannot read (network disk, empty drive).
    Other(String),
}

impl DiskSource {
    /// The location string: the path, or `pool/volume`.
    pub fn location(&self) -> String {
        match self {
            DiskSource::Path(p) => p.clone(),
            DiskSource::Volume { pool, volume } => format!("{pool}/{volume}"),
            DiskSource::Other(s) => s.clone(),
        }
    }
}

/// A disk of a domain as its XML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlDisk {
    /// Target dev (`vda`): the disk id.
    pub target: String,
    /// Bus.
    pub bus: Option<DiskBus>,
    /// Format from the driver type.
    pub format: Option<DiskFormat>,
    /// Source.
    pub source: DiskSource,
    /// The first backing file (after an external snapshot: the frozen base).
    pub backing: Option<DiskSource>,
    /// Format of the first backing file.
    pub backing_format: Option<DiskFormat>,
}

/// What the domain XML says (sizes of disks are filled in from the volumes).
#[derive(Debug, Clone)]
pub struct ParsedDomain {
    /// The description, with disk capacities 0.
    pub info: VmInfo,
    /// The disks with their sources.
    pub disks: Vec<XmlDisk>,
}

fn bus_of(s: &str) -> Option<DiskBus> {
    Some(match s {
        "virtio" => DiskBus::Virtio,
        "scsi" => DiskBus::Scsi,
        "sata" => DiskBus::Sata,
        "ide" => DiskBus::Ide,
        "nvme" => DiskBus::Nvme,
        _ => return None,
    })
}

fn format_of(s: &str) -> Option<DiskFormat> {
    match s {
        "raw" => Some(DiskFormat::Raw),
        "qcow2" => Some(DiskFormat::Qcow2),
        _ => DiskFormat::parse(s).ok(),
    }
}

fn source_of(disk_type: &str, src: Option<&Element>) -> DiskSource {
    let Some(src) = src else {
        return DiskSource::Other("no source".into());
    };
    match disk_type {
        "file" => src
            .attr("file")
            .map(|p| DiskSource::Path(p.into()))
            .unwrap_or(DiskSource::Other("file without path".into())),
        "block" => src
            .attr("dev")
            .map(|p| DiskSource::Path(p.into()))
            .unwrap_or(DiskSource::Other("block without dev".into())),
        "volume" => match (src.attr("pool"), src.attr("volume")) {
            (Some(p), Some(v)) => DiskSource::Volume {
                pool: p.into(),
                volume: v.into(),
            },
            _ => DiskSource::Other("volume without pool/volume".into()),
        },
        other => DiskSource::Other(format!(
            "{other} disk {}",
            src.attr("name").or(src.attr("protocol")).unwrap_or("")
        )),
    }
}

fn memory_mib(e: Option<&Element>) -> u64 {
    let Some(e) = e else { return 0 };
    let v: u64 = e.text.trim().parse().unwrap_or(0);
    let unit = e.attr("unit").unwrap_or("KiB");
    let bytes = match unit {
        "b" | "bytes" => v,
        "k" | "KiB" => v.saturating_mul(1 << 10),
        "KB" => v.saturating_mul(1000),
        "M" | "MiB" => v.saturating_mul(1 << 20),
        "MB" => v.saturating_mul(1_000_000),
        "G" | "GiB" => v.saturating_mul(1 << 30),
        "GB" => v.saturating_mul(1_000_000_000),
        "T" | "TiB" => v.saturating_mul(1 << 40),
        _ => v.saturating_mul(1 << 10),
    };
    bytes >> 20
}

/// Parses a domain XML (`virDomainGetXMLDesc`).
pub fn parse_domain(xml: &str, state: PowerState) -> Result<ParsedDomain> {
    let root = parse(xml)?;
    if root.name != "domain" {
        return Err(Error::corrupt(format!(
            "expected <domain>, libvirt returned <{}>",
            root.name
        )));
    }
    let name = root.child("name").map(|e| e.text.trim().to_string());
    let name = name.ok_or_else(|| Error::corrupt("domain XML has no <name>"))?;
    let id = root
        .child("uuid")
        .map(|e| e.text.trim().to_string())
        .unwrap_or_else(|| name.clone());
    let cpus = root
        .child("vcpu")
        .and_then(|e| e.text.trim().parse().ok())
        .unwrap_or(1);
    let os = root.child("os");
    let efi = os.is_some_and(|os| {
        os.attr("firmware") == Some("efi")
            || os.child("loader").is_some_and(|l| {
                l.attr("type") == Some("pflash")
                    || l.text.to_ascii_lowercase().contains("ovmf")
                    || l.text.to_ascii_lowercase().contains("edk2")
            })
    });
    let machine = os
        .and_then(|os| os.child("type"))
        .and_then(|t| t.attr("machine"))
        .map(str::to_string);
    let guest_os = root
        .path(&["metadata", "libosinfo:libosinfo", "libosinfo:os"])
        .and_then(|e| e.attr("id"))
        .map(str::to_string);
    let mut disks = Vec::new();
    let mut nics = Vec::new();
    if let Some(devs) = root.child("devices") {
        for d in devs.children_named("disk") {
            if d.attr("device").unwrap_or("disk") != "disk" {
                continue;
            }
            let Some(target) = d.child("target").and_then(|t| t.attr("dev")) else {
                continue;
            };
            let dtype = d.attr("type").unwrap_or("file");
            let backing = d.child("backingStore").and_then(|b| {
                let bt = b.attr("type")?;
                b.child("source")?;
                Some(source_of(bt, b.child("source")))
            });
            disks.push(XmlDisk {
                target: target.to_string(),
                bus: d
                    .child("target")
                    .and_then(|t| t.attr("bus"))
                    .and_then(bus_of),
                format: d
                    .child("driver")
                    .and_then(|t| t.attr("type"))
                    .and_then(format_of),
                source: source_of(dtype, d.child("source")),
                backing,
                backing_format: d
                    .path(&["backingStore", "format"])
                    .and_then(|f| f.attr("type"))
                    .and_then(format_of),
            });
        }
        for i in devs.children_named("interface") {
            let src = i.child("source");
            let network = match i.attr("type") {
                Some("network") => src.and_then(|s| s.attr("network")).map(str::to_string),
                Some("bridge") => src
                    .and_then(|s| s.attr("bridge"))
                    .map(|b| format!("bridge:{b}")),
                Some(other) => Some(other.to_string()),
                None => None,
            };
            nics.push(NicInfo {
                mac: i
                    .child("mac")
                    .and_then(|m| m.attr("address"))
                    .map(str::to_string),
                model: i
                    .child("model")
                    .and_then(|m| m.attr("type"))
                    .map(str::to_string),
                network,
            });
        }
    }
    let info = VmInfo {
        annotation: root
            .child("description")
            .map(|d| d.text.clone())
            .filter(|t| !t.trim().is_empty()),
        id,
        name,
        cpus,
        memory_mib: memory_mib(root.child("memory")),
        firmware: if efi { Firmware::Uefi } else { Firmware::Bios },
        machine,
        guest_os,
        state,
        disks: disks
            .iter()
            .map(|d| virtrigaud_core::DiskInfo {
                id: d.target.clone(),
                capacity: 0,
                allocation: None,
                format: d.format,
                bus: d.bus,
                location: d.source.location(),
            })
            .collect(),
        nics,
    };
    Ok(ParsedDomain { info, disks })
}

/// Extra settings of a generated domain that [`VmSpec`] does not carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainOptions {
    /// Domain type: `kvm` or `qemu` (TCG). `None`: `kvm` when the host offers it.
    pub domain_type: Option<String>,
    /// Write the first serial port to this file on the libvirt host.
    pub serial_file: Option<String>,
    /// Architecture (default `x86_64`).
    pub arch: Option<String>,
}

fn target_prefix(bus: DiskBus) -> Result<&'static str> {
    Ok(match bus {
        DiskBus::Virtio => "vd",
        DiskBus::Scsi | DiskBus::Sata => "sd",
        DiskBus::Ide => "hd",
        DiskBus::Nvme => {
            return Err(Error::unsupported(
                "libvirt 9 has no NVMe disk bus; choose virtio, scsi or sata",
            ));
        }
    })
}

fn bus_name(bus: DiskBus) -> &'static str {
    match bus {
        DiskBus::Virtio => "virtio",
        DiskBus::Scsi => "scsi",
        DiskBus::Sata => "sata",
        DiskBus::Ide => "ide",
        DiskBus::Nvme => "nvme",
    }
}

/// The target dev name of the `n`-th disk on a bus with `prefix` (`vda`, …, `vdz`, `vdaa`).
pub fn dev_name(prefix: &str, mut n: usize) -> String {
    let mut letters = Vec::new();
    loop {
        letters.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("{prefix}{}", String::from_utf8_lossy(&letters))
}

fn e(s: &str) -> std::borrow::Cow<'_, str> {
    escape(s)
}

/// Generates a domain XML from `spec`. Disk locations are `pool/volume` or absolute paths;
/// NIC networks are libvirt network names, `bridge:NAME` for a host bridge, or none (user-mode
/// networking).
pub fn generate_domain(spec: &VmSpec, opts: &DomainOptions) -> Result<String> {
    use std::fmt::Write;
    if spec.name.is_empty() {
        return Err(Error::invalid("VM name is empty"));
    }
    let dtype = opts.domain_type.as_deref().unwrap_or("kvm");
    let arch = opts.arch.as_deref().unwrap_or("x86_64");
    let mut x = String::new();
    let _ = writeln!(x, "<domain type='{}'>", e(dtype));
    let _ = writeln!(x, "  <name>{}</name>", e(&spec.name));
    if let Some(d) = &spec.annotation {
        let _ = writeln!(x, "  <description>{}</description>", e(d));
    }
    let _ = writeln!(
        x,
        "  <memory unit='MiB'>{}</memory>",
        spec.memory_mib.max(1)
    );
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", spec.cpus.max(1));
    let fw = match spec.firmware {
        Firmware::Uefi => " firmware='efi'",
        Firmware::Bios => "",
    };
    let _ = writeln!(x, "  <os{fw}>");
    match &spec.machine {
        Some(m) => {
            let _ = writeln!(
                x,
                "    <type arch='{}' machine='{}'>hvm</type>",
                e(arch),
                e(m)
            );
        }
        None => {
            let _ = writeln!(x, "    <type arch='{}'>hvm</type>", e(arch));
        }
    }
    let _ = writeln!(x, "  </os>");
    let _ = writeln!(x, "  <features><acpi/><apic/></features>");
    let _ = writeln!(x, "  <on_poweroff>destroy</on_poweroff>");
    let _ = writeln!(x, "  <devices>");
    let mut counters: Vec<(&'static str, usize)> = Vec::new();
    let mut scsi = false;
    for (i, d) in spec.disks.iter().enumerate() {
        let prefix = target_prefix(d.bus)?;
        let n = match counters.iter_mut().find(|(p, _)| *p == prefix) {
            Some((_, n)) => {
                *n += 1;
                *n - 1
            }
            None => {
                counters.push((prefix, 1));
                0
            }
        };
        scsi |= d.bus == DiskBus::Scsi;
        let driver = match d.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vmdk(_) => "vmdk",
        };
        let source = if d.location.starts_with('/') {
            format!("<source file='{}'/>", e(&d.location))
        } else if let Some((pool, vol)) = d.location.split_once('/') {
            format!("<source pool='{}' volume='{}'/>", e(pool), e(vol))
        } else {
            return Err(Error::invalid(format!(
                "disk location {:?} is neither pool/volume nor an absolute path",
                d.location
            )));
        };
        let dtype = if d.location.starts_with('/') {
            "file"
        } else {
            "volume"
        };
        let _ = writeln!(x, "    <disk type='{dtype}' device='disk'>");
        let _ = writeln!(x, "      <driver name='qemu' type='{driver}'/>");
        let _ = writeln!(x, "      {source}");
        let _ = writeln!(
            x,
            "      <target dev='{}' bus='{}'/>",
            dev_name(prefix, n),
            bus_name(d.bus)
        );
        if i == 0 {
            let _ = writeln!(x, "      <boot order='1'/>");
        }
        let _ = writeln!(x, "    </disk>");
    }
    if scsi {
        let _ = writeln!(x, "    <controller type='scsi' model='virtio-scsi'/>");
    }
    for nic in &spec.nics {
        let (itype, src) = match nic.network.as_deref() {
            Some(n) if n.starts_with("bridge:") => (
                "bridge",
                format!("<source bridge='{}'/>", e(&n["bridge:".len()..])),
            ),
            Some(n) => ("network", format!("<source network='{}'/>", e(n))),
            None => ("user", String::new()),
        };
        let _ = writeln!(x, "    <interface type='{itype}'>");
        if !src.is_empty() {
            let _ = writeln!(x, "      {src}");
        }
        if let Some(mac) = &nic.mac {
            let _ = writeln!(x, "      <mac address='{}'/>", e(mac));
        }
        let model = nic.model.as_deref().unwrap_or("virtio");
        let _ = writeln!(x, "      <model type='{}'/>", e(model));
        let _ = writeln!(x, "    </interface>");
    }
    match &opts.serial_file {
        Some(f) => {
            let _ = writeln!(
                x,
                "    <serial type='file'><source path='{}'/><target port='0'/></serial>",
                e(f)
            );
        }
        None => {
            let _ = writeln!(x, "    <serial type='pty'><target port='0'/></serial>");
        }
    }
    let _ = writeln!(x, "    <memballoon model='none'/>");
    let _ = writeln!(x, "  </devices>\n</domain>");
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtrigaud_core::VmDiskSpec;

    const XML: &str = r#"<domain type='kvm' id='3'>
  <name>web&amp;1</name>
  <uuid>0b3a7f3e-1111-2222-3333-444455556666</uuid>
  <memory unit='KiB'>2097152</memory>
  <vcpu placement='static'>4</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web.ovl'/>
      <backingStore type='file'><format type='qcow2'/><source file='/var/lib/libvirt/images/web.qcow2'/><backingStore/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='raw'/>
      <source pool='data' volume='web-data.raw'/>
      <target dev='sdb' bus='scsi'/>
    </disk>
    <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/><model type='virtio'/></interface>
    <interface type='bridge'><mac address='52:54:00:aa:bb:cd'/><source bridge='br0'/><model type='e1000'/></interface>
  </devices>
</domain>"#;

    #[test]
    fn parses_a_domain() {
        let p = parse_domain(XML, PowerState::Running).unwrap();
        let i = &p.info;
        assert_eq!(i.name, "web&1");
        assert_eq!(i.id, "0b3a7f3e-1111-2222-3333-444455556666");
        assert_eq!((i.cpus, i.memory_mib), (4, 2048));
        assert_eq!(i.firmware, Firmware::Uefi);
        assert_eq!(i.machine.as_deref(), Some("pc-q35-7.2"));
        assert_eq!(i.disks.len(), 2);
        assert_eq!(i.disks[0].id, "vda");
        assert_eq!(i.disks[0].format, Some(DiskFormat::Qcow2));
        assert_eq!(
            p.disks[0].backing,
            Some(DiskSource::Path("/var/lib/libvirt/images/web.qcow2".into()))
        );
        assert_eq!(i.disks[1].location, "data/web-data.raw");
        assert_eq!(i.disks[1].bus, Some(DiskBus::Scsi));
        assert_eq!(i.nics[1].network.as_deref(), Some("bridge:br0"));
        assert_eq!(i.nics[0].mac.as_deref(), Some("52:54:00:aa:bb:cc"));
    }

    #[test]
    fn generates_what_it_parses() {
        let spec = VmSpec {
            annotation: None,
            name: "a'b".into(),
            cpus: 2,
            memory_mib: 512,
            firmware: Firmware::Bios,
            machine: Some("pc".into()),
            guest_os: None,
            disks: vec![
                VmDiskSpec {
                    location: "pool/a.qcow2".into(),
                    bus: DiskBus::Virtio,
                    format: DiskFormat::Qcow2,
                },
                VmDiskSpec {
                    location: "/x/b.raw".into(),
                    bus: DiskBus::Sata,
                    format: DiskFormat::Raw,
                },
            ],
            nics: vec![NicInfo {
                mac: None,
                model: None,
                network: Some("default".into()),
            }],
            overwrite: false,
        };
        let xml = generate_domain(&spec, &DomainOptions::default()).unwrap();
        let p = parse_domain(&xml, PowerState::Stopped).unwrap();
        assert_eq!(p.info.name, "a'b");
        assert_eq!(p.info.memory_mib, 512);
        assert_eq!(p.info.disks[0].location, "pool/a.qcow2");
        assert_eq!(p.info.disks[1].id, "sda");
        assert_eq!(p.info.nics[0].network.as_deref(), Some("default"));
        assert_eq!(dev_name("vd", 27), "vdab");
    }
}
