//! Parsers and formatters for PVE's property strings in a VM config: drives
//! (`scsi0: local-lvm:vm-100-disk-0,iothread=1,size=32G`) and NICs
//! (`net0: virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=42`).
//!
//! A property string is a comma-separated list of `key=value` pairs where the first item may
//! omit its key (the drive's `file`, or the NIC's model, which is written `MODEL=MAC`). Values
//! are taken as they are: PVE quotes nothing in the fields we read. Every input is remote data,
//! so parsing never panics and unknown keys are kept in `options`.

use virtrigaud_core::{Error, Result};

/// The NIC models PVE knows (the `model` enum of `netN`).
pub const NIC_MODELS: &[&str] = &[
    "e1000",
    "e1000-82540em",
    "e1000-82544gc",
    "e1000-82545em",
    "e1000e",
    "i82551",
    "i82557b",
    "i82559er",
    "ne2k_isa",
    "ne2k_pci",
    "pcnet",
    "rtl8139",
    "virtio",
    "vmxnet3",
];

/// One drive (`scsiN`, `virtioN`, `sataN`, `ideN`, `efidisk0`, …) of a VM config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Drive {
    /// The volume: `STORAGE:VOLNAME`, `none`, `cdrom`, or an absolute path.
    pub volume: String,
    /// `media=cdrom`.
    pub cdrom: bool,
    /// `size=`, in bytes.
    pub size: Option<u64>,
    /// `format=` (`raw`, `qcow2`, `vmdk`).
    pub format: Option<String>,
    /// Every other `key=value`, in order.
    pub options: Vec<(String, String)>,
}

impl Drive {
    /// The storage id of the volume (`local-lvm` of `local-lvm:vm-100-disk-0`), if it has one.
    pub fn storage(&self) -> Option<&str> {
        let (s, rest) = self.volume.split_once(':')?;
        (!s.is_empty() && !rest.is_empty() && !s.contains('/')).then_some(s)
    }

    /// Whether this is a cloud-init drive (`STORAGE:vm-N-cloudinit` or `STORAGE:cloudinit`).
    pub fn is_cloudinit(&self) -> bool {
        let name = self
            .volume
            .split_once(':')
            .map(|(_, n)| n)
            .unwrap_or(&self.volume);
        name == "cloudinit" || name.ends_with("-cloudinit") || name.contains("-cloudinit.")
    }

    /// The image format from `format=`, else from the volume name's extension.
    pub fn image_format(&self) -> Option<&str> {
        if let Some(f) = &self.format {
            return Some(f);
        }
        let ext = self.volume.rsplit_once('.')?.1;
        matches!(ext, "raw" | "qcow2" | "vmdk").then_some(ext)
    }

    /// Formats the drive back into a property string.
    pub fn to_property_string(&self) -> String {
        let mut s = self.volume.clone();
        if self.cdrom {
            s.push_str(",media=cdrom");
        }
        if let Some(f) = &self.format {
            s.push_str(&format!(",format={f}"));
        }
        for (k, v) in &self.options {
            s.push_str(&format!(",{k}={v}"));
        }
        if let Some(z) = self.size {
            s.push_str(&format!(",size={}", format_size(z)));
        }
        s
    }
}

/// Parses a drive property string.
pub fn parse_drive(s: &str) -> Result<Drive> {
    let mut d = Drive::default();
    for (i, item) in s.split(',').enumerate() {
        if item.is_empty() {
            continue;
        }
        match item.split_once('=') {
            Some(("file", v)) => d.volume = v.to_string(),
            Some(("media", v)) => d.cdrom = v == "cdrom",
            Some(("size", v)) => {
                d.size = Some(
                    parse_size(v)
                        .ok_or_else(|| Error::corrupt(format!("drive size {v:?} is not a size")))?,
                )
            }
            Some(("format", v)) => d.format = Some(v.to_string()),
            // `import-from=STORAGE:import/x` holds a ':' and '=' only after the key.
            Some((k, v)) if !(i == 0 && k.contains(':')) => {
                d.options.push((k.to_string(), v.to_string()))
            }
            _ if i == 0 => d.volume = item.to_string(),
            _ => {
                return Err(Error::corrupt(format!(
                    "drive property {item:?} has no key"
                )));
            }
        }
    }
    if d.volume.is_empty() {
        return Err(Error::corrupt(format!("drive {s:?} names no volume")));
    }
    Ok(d)
}

/// Parses a PVE disk size: a number of bytes, or a number with `K`, `M`, `G` or `T` (binary
/// units, PVE's notation), possibly fractional (`1.5G`).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        b'T' | b't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    match num.split_once('.') {
        None => num.parse::<u64>().ok()?.checked_mul(mult),
        Some((int, frac)) => {
            if frac.contains('.') || frac.is_empty() || frac.len() > 12 {
                return None;
            }
            let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
            let f: u64 = frac.parse().ok()?;
            let scale = 10u64.pow(frac.len() as u32);
            let whole = int.checked_mul(mult)?;
            let part = (u128::from(f) * u128::from(mult) / u128::from(scale)) as u64;
            whole.checked_add(part)
        }
    }
}

/// Formats a size as PVE does: the largest binary unit that divides it, else bytes.
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// One NIC (`netN`) of a VM config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Net {
    /// Device model (`virtio`, `e1000`, …).
    pub model: String,
    /// MAC address, when set.
    pub mac: Option<String>,
    /// Bridge.
    pub bridge: Option<String>,
    /// VLAN tag.
    pub tag: Option<u16>,
    /// Every other `key=value`, in order.
    pub options: Vec<(String, String)>,
}

impl Net {
    /// Formats the NIC back into a property string (`MODEL=MAC,bridge=…,tag=…`).
    pub fn to_property_string(&self) -> String {
        let mut s = match &self.mac {
            Some(m) => format!("{}={m}", self.model),
            None => self.model.clone(),
        };
        if let Some(b) = &self.bridge {
            s.push_str(&format!(",bridge={b}"));
        }
        if let Some(t) = self.tag {
            s.push_str(&format!(",tag={t}"));
        }
        for (k, v) in &self.options {
            s.push_str(&format!(",{k}={v}"));
        }
        s
    }
}

/// Parses a NIC property string.
pub fn parse_net(s: &str) -> Result<Net> {
    let mut n = Net::default();
    for item in s.split(',') {
        if item.is_empty() {
            continue;
        }
        let (k, v) = match item.split_once('=') {
            Some(kv) => kv,
            None if NIC_MODELS.contains(&item) => (item, ""),
            None => return Err(Error::corrupt(format!("net property {item:?} has no key"))),
        };
        match k {
            "model" => n.model = v.to_string(),
            "macaddr" => n.mac = Some(v.to_string()),
            "bridge" => n.bridge = Some(v.to_string()),
            "tag" => {
                n.tag = Some(
                    v.parse()
                        .map_err(|_| Error::corrupt(format!("VLAN tag {v:?} is not a number")))?,
                )
            }
            m if NIC_MODELS.contains(&m) => {
                n.model = m.to_string();
                if !v.is_empty() {
                    n.mac = Some(v.to_string());
                }
            }
            _ => n.options.push((k.to_string(), v.to_string())),
        }
    }
    if n.model.is_empty() {
        return Err(Error::corrupt(format!("net {s:?} names no model")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn drives_as_pve_writes_them() {
        let d = parse_drive("local-lvm:vm-100-disk-0,iothread=1,size=32G").unwrap();
        assert_eq!(d.volume, "local-lvm:vm-100-disk-0");
        assert_eq!(d.storage(), Some("local-lvm"));
        assert_eq!(d.size, Some(32 << 30));
        assert_eq!(d.options, vec![("iothread".into(), "1".into())]);
        assert!(!d.cdrom && !d.is_cloudinit());
        let d = parse_drive("local:100/vm-100-disk-1.qcow2,size=10G").unwrap();
        assert_eq!(d.image_format(), Some("qcow2"));
        let d = parse_drive("local-lvm:vm-100-cloudinit,media=cdrom").unwrap();
        assert!(d.cdrom && d.is_cloudinit());
        let d = parse_drive("file=local:iso/debian.iso,media=cdrom,size=600M").unwrap();
        assert_eq!(d.volume, "local:iso/debian.iso");
        assert!(d.cdrom);
        let d = parse_drive("none,media=cdrom").unwrap();
        assert_eq!(d.storage(), None);
        let d = parse_drive("local-lvm:0,import-from=local:import/a.qcow2").unwrap();
        assert_eq!(d.options[0].1, "local:import/a.qcow2");
        assert!(parse_drive(",size=1G").is_err());
        assert!(parse_drive("x,size=lots").is_err());
    }

    #[test]
    fn nics_as_pve_writes_them() {
        let n = parse_net("virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=42,firewall=1").unwrap();
        assert_eq!(n.model, "virtio");
        assert_eq!(n.mac.as_deref(), Some("BC:24:11:00:00:01"));
        assert_eq!(n.bridge.as_deref(), Some("vmbr0"));
        assert_eq!(n.tag, Some(42));
        assert_eq!(n.options, vec![("firewall".into(), "1".into())]);
        let n = parse_net("model=e1000,macaddr=aa:bb:cc:dd:ee:ff,bridge=vmbr1").unwrap();
        assert_eq!(
            (n.model.as_str(), n.mac.as_deref()),
            ("e1000", Some("aa:bb:cc:dd:ee:ff"))
        );
        assert!(parse_net("bridge=vmbr0").is_err());
        assert!(parse_net("virtio,tag=x").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M"), Some(4 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(format_size(32 << 30), "32G");
        assert_eq!(format_size(1536 << 20), "1536M");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9-]{0,12}"
    }

    proptest! {
        #[test]
        fn drive_round_trips(store in name(), vol in "[a-z0-9][a-z0-9/._-]{0,20}",
                             cdrom: bool, size in proptest::option::of(0u64..(1 << 50)),
                             format in proptest::option::of(prop_oneof!["raw", "qcow2", "vmdk"]),
                             opts in proptest::collection::vec((name(), "[a-z0-9.:/]{1,10}"), 0..4)) {
            let opts: Vec<_> = opts.into_iter()
                .filter(|(k, _)| !["file", "media", "size", "format"].contains(&k.as_str()))
                .collect();
            let d = Drive { volume: format!("{store}:{vol}"), cdrom, size, format, options: opts };
            prop_assert_eq!(parse_drive(&d.to_property_string()).unwrap(), d);
        }

        #[test]
        fn net_round_trips(model in proptest::sample::select(NIC_MODELS),
                           mac in proptest::option::of("[0-9A-F]{2}(:[0-9A-F]{2}){5}"),
                           bridge in proptest::option::of("vmbr[0-9]{1,3}"),
                           tag in proptest::option::of(1u16..4095),
                           opts in proptest::collection::vec((name(), "[a-z0-9]{1,6}"), 0..3)) {
            let opts: Vec<_> = opts.into_iter()
                .filter(|(k, _)| !["model", "macaddr", "bridge", "tag"].contains(&k.as_str())
                    && !NIC_MODELS.contains(&k.as_str()))
                .collect();
            let n = Net { model: model.to_string(), mac, bridge, tag, options: opts };
            prop_assert_eq!(parse_net(&n.to_property_string()).unwrap(), n);
        }

        #[test]
        fn parsers_never_panic(s in ".{0,64}") {
            let _ = parse_drive(&s);
            let _ = parse_net(&s);
            let _ = parse_size(&s);
        }

        #[test]
        fn size_round_trips(n in 0u64..(1 << 60)) {
            prop_assert_eq!(parse_size(&format_size(n)), Some(n));
        }
    }
}
