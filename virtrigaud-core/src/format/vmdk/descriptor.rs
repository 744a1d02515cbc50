//! The VMDK text descriptor: `createType`, extent lines and the disk database (`ddb.*`).
//!
//! Parsing is bounded ([`MAX_DESCRIPTOR`] bytes, [`MAX_EXTENTS`] extent lines) and checks extent
//! sizes for overflow; extent file names are checked by [`check_extent_name`] before anything
//! opens them.

use super::header::{MAX_CAPACITY_SECTORS, SECTOR};
use crate::{Error, Result};
use std::fmt::Write as _;

/// Largest descriptor we read, in bytes.
pub const MAX_DESCRIPTOR: usize = 64 << 10;
/// Largest number of extent lines accepted.
pub const MAX_EXTENTS: usize = 4096;

/// Access mode of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `RW`.
    ReadWrite,
    /// `RDONLY`.
    ReadOnly,
    /// `NOACCESS`.
    NoAccess,
}

/// Type of an extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// `FLAT` (hosted) or `VMFS` (ESXi): raw bytes at an offset in a file.
    Flat,
    /// `SPARSE` (hosted sparse extent) and the other sparse kinds.
    Sparse,
    /// `ZERO`: reads as zeros, no file.
    Zero,
    /// Anything else (`VMFSRDM`, `VMFSRAW`, `SESPARSE`, …).
    Other,
}

/// One extent line: `RW 2048 FLAT "disk-flat.vmdk" 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Size in sectors.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentKind,
    /// The type as written.
    pub kind_name: String,
    /// File name (absent for `ZERO`).
    pub file: Option<String>,
    /// Offset in the file, in sectors (flat extents).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// `createType` (e.g. `monolithicFlat`, `streamOptimized`).
    pub create_type: String,
    /// The extents, in guest order.
    pub extents: Vec<ExtentLine>,
    /// Every other `key = value` pair (header keys and `ddb.*`), in order.
    pub entries: Vec<(String, String)>,
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s)
}

impl Descriptor {
    /// Parses descriptor text (NUL padding and anything after it is ignored).
    pub fn parse(raw: &[u8]) -> Result<Descriptor> {
        let raw = &raw[..raw.len().min(MAX_DESCRIPTOR)];
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        let text = String::from_utf8_lossy(&raw[..end]);
        let mut d = Descriptor::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or("");
            let access = match first {
                "RW" => Some(Access::ReadWrite),
                "RDONLY" => Some(Access::ReadOnly),
                "NOACCESS" => Some(Access::NoAccess),
                _ => None,
            };
            if let Some(access) = access {
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(Error::corrupt("VMDK descriptor has too many extents"));
                }
                d.extents.push(parse_extent(access, line)?);
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                let k = k.trim().to_string();
                let v = unquote(v).to_string();
                if k == "createType" {
                    d.create_type = v.clone();
                }
                d.entries.push((k, v));
            }
            // Other lines are ignored, as VMware does.
        }
        let total = d
            .extents
            .iter()
            .try_fold(0u64, |a, e| a.checked_add(e.sectors));
        match total {
            Some(t) if t <= MAX_CAPACITY_SECTORS => Ok(d),
            _ => Err(Error::corrupt("VMDK descriptor extents too large")),
        }
    }

    /// Value of `key` (e.g. `ddb.adapterType`).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sum of the extent sizes, in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.extents.iter().map(|e| e.sectors).sum::<u64>() * SECTOR
    }

    /// The descriptor text of a single-extent sparse image (embedded in the sparse file).
    /// Deterministic: the CID is derived from the capacity.
    pub fn embedded_text(create_type: &str, capacity_sectors: u64, extent_name: &str) -> String {
        let heads = 255u64;
        let secs = 63u64;
        let cyl = (capacity_sectors / (heads * secs)).clamp(1, 65535);
        let cid = (capacity_sectors as u32) ^ ((capacity_sectors >> 32) as u32) ^ 0x7669_7274;
        let mut s = String::new();
        let _ = write!(
            s,
            "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\n\
             createType=\"{create_type}\"\n\n# Extent description\n\
             RW {capacity_sectors} SPARSE \"{extent_name}\"\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cyl}\"\n\
             ddb.geometry.heads = \"{heads}\"\nddb.geometry.sectors = \"{secs}\"\n\
             ddb.adapterType = \"lsilogic\"\n"
        );
        s
    }
}

fn parse_extent(access: Access, line: &str) -> Result<ExtentLine> {
    let bad = || Error::corrupt(format!("bad VMDK extent line '{}'", line.escape_debug()));
    // RW <sectors> <TYPE> ["file" [offset]]
    let mut rest = line
        .split_once(char::is_whitespace)
        .ok_or_else(bad)?
        .1
        .trim_start();
    let (num, r) = rest.split_once(char::is_whitespace).ok_or_else(bad)?;
    let sectors: u64 = num.parse().map_err(|_| bad())?;
    rest = r.trim_start();
    let (kind_name, r) = match rest.split_once(char::is_whitespace) {
        Some((k, r)) => (k, r.trim_start()),
        None => (rest, ""),
    };
    let kind = match kind_name {
        "FLAT" | "VMFS" => ExtentKind::Flat,
        "SPARSE" | "VMFSSPARSE" => ExtentKind::Sparse,
        "ZERO" => ExtentKind::Zero,
        _ => ExtentKind::Other,
    };
    let mut file = None;
    let mut offset = 0;
    if let Some(r) = r.strip_prefix('"') {
        let (name, after) = r.split_once('"').ok_or_else(bad)?;
        file = Some(name.to_string());
        let after = after.trim();
        if !after.is_empty() {
            let o = after.split_whitespace().next().unwrap_or("");
            offset = o.parse().map_err(|_| bad())?;
        }
    } else if !r.is_empty() {
        return Err(bad());
    }
    if kind != ExtentKind::Zero && file.is_none() {
        return Err(bad());
    }
    if sectors > MAX_CAPACITY_SECTORS || offset > MAX_CAPACITY_SECTORS {
        return Err(bad());
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        kind_name: kind_name.to_string(),
        file,
        offset,
    })
}

/// Refuses extent names that could leave the descriptor's directory: empty, absolute, with a
/// path separator, `..`, or a NUL.
pub fn check_extent_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.contains('/')
        || name.contains('\\')
        || name.contains("..")
        || name.contains('\0')
        || name.starts_with('~')
    {
        return Err(Error::corrupt(format!(
            "extent outside its directory: '{}'",
            name.escape_debug()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flat_descriptor() {
        let text = b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
createType=\"monolithicFlat\"\n\n# Extent description\nRW 2048 FLAT \"disk-flat.vmdk\" 0\n\
RDONLY 10 ZERO\nRW 4 VMFS \"b-flat.vmdk\" 7\n\n#DDB\nddb.adapterType = \"lsilogic\"\n\0\0junk";
        let d = Descriptor::parse(text).unwrap();
        assert_eq!(d.create_type, "monolithicFlat");
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].kind, ExtentKind::Flat);
        assert_eq!(d.extents[0].file.as_deref(), Some("disk-flat.vmdk"));
        assert_eq!(d.extents[1].kind, ExtentKind::Zero);
        assert_eq!(d.extents[1].access, Access::ReadOnly);
        assert_eq!(d.extents[2].offset, 7);
        assert_eq!(d.get("ddb.adapterType"), Some("lsilogic"));
        assert_eq!(d.virtual_size(), (2048 + 10 + 4) * 512);
    }

    #[test]
    fn write_parse_round_trip() {
        let t = Descriptor::embedded_text("streamOptimized", 4096, "disk.vmdk");
        let d = Descriptor::parse(t.as_bytes()).unwrap();
        assert_eq!(d.create_type, "streamOptimized");
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].sectors, 4096);
        assert_eq!(d.extents[0].kind, ExtentKind::Sparse);
        assert_eq!(d.get("ddb.adapterType"), Some("lsilogic"));
        assert_eq!(d.get("ddb.virtualHWVersion"), Some("4"));
        assert_eq!(
            t,
            Descriptor::embedded_text("streamOptimized", 4096, "disk.vmdk")
        );
    }

    #[test]
    fn rejects_bad_lines_and_names() {
        assert!(Descriptor::parse(b"RW x FLAT \"a\" 0").is_err());
        assert!(Descriptor::parse(b"RW 10 FLAT \"a").is_err());
        assert!(Descriptor::parse(b"RW 10 FLAT").is_err());
        let huge = format!("RW {} FLAT \"a\"\nRW {} FLAT \"a\"", 1u64 << 40, 1u64 << 40);
        assert!(Descriptor::parse(huge.as_bytes()).is_err());
        for n in ["../x-flat.vmdk", "/etc/passwd", "a/b", "", "..", "a\\b"] {
            assert_eq!(
                check_extent_name(n).unwrap_err().kind(),
                crate::ErrorKind::Corrupt
            );
        }
        check_extent_name("disk-flat.vmdk").unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..Default::default()
        })]
        #[test]
        fn parse_never_panics(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = Descriptor::parse(&raw);
        }

        #[test]
        fn extent_lines_never_panic(
            access in "(RW|RDONLY|NOACCESS)",
            n in "[0-9]{0,25}",
            kind in "(FLAT|VMFS|SPARSE|ZERO|XYZ)?",
            name in "\\PC{0,12}",
            off in "[0-9 x-]{0,25}",
        ) {
            let line = format!("{access} {n} {kind} \"{name}\" {off}\n");
            if let Ok(d) = Descriptor::parse(line.as_bytes()) {
                let _ = d.virtual_size();
            }
        }
    }
}
