//! [`VsphereConfig`]: where the vCenter or ESXi host is, how to trust it, how to log in, and
//! the defaults of placement and hardware mapping.

use std::collections::BTreeMap;
use std::time::Duration;
use virtrigaud_core::{Error, Result, Secret};

/// SCSI controller model for disks on the SCSI bus of a VM we create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScsiModel {
    /// VMware Paravirtual (`ParaVirtualSCSIController`): the fastest; Linux has the driver
    /// in-tree, Windows needs VMware Tools. Default.
    #[default]
    ParaVirtual,
    /// LSI Logic SAS (`VirtualLsiLogicSASController`): drivers in every OS.
    LsiLogicSas,
    /// LSI Logic parallel (`VirtualLsiLogicController`): old guests.
    LsiLogic,
}

impl ScsiModel {
    /// The vSphere device type.
    pub fn device_type(self) -> &'static str {
        match self {
            ScsiModel::ParaVirtual => "ParaVirtualSCSIController",
            ScsiModel::LsiLogicSas => "VirtualLsiLogicSASController",
            ScsiModel::LsiLogic => "VirtualLsiLogicController",
        }
    }
}

/// NIC model of a VM we create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NicModel {
    /// `VirtualVmxnet3`: paravirtual, the fastest. Default.
    #[default]
    Vmxnet3,
    /// `VirtualE1000e`: emulated Intel, drivers everywhere.
    E1000e,
}

impl NicModel {
    /// The vSphere device type.
    pub fn device_type(self) -> &'static str {
        match self {
            NicModel::Vmxnet3 => "VirtualVmxnet3",
            NicModel::E1000e => "VirtualE1000e",
        }
    }
}

/// How [`create_disk`](virtrigaud_core::Provider::create_disk) writes a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImportMode {
    /// A monolithicFlat descriptor plus its `-flat.vmdk` uploaded with a streamed `/folder`
    /// PUT. Default: no lease, no encoding, and the file can be read back at once for
    /// verification.
    #[default]
    DatastoreFlat,
    /// A streamOptimized VMDK encoded on the fly and POSTed through an `ImportVApp` lease
    /// (see [`crate::nfc`]): ESXi writes a native VMFS disk.
    NfcStreamOptimized,
}

/// How [`open_disk`](virtrigaud_core::Provider::open_disk) reads a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportMode {
    /// Ranged GETs on the datastore's `/folder` (random access, several in flight). Default.
    #[default]
    Datastore,
    /// An `ExportVm` / `ExportSnapshot` NFC lease: one sequential streamOptimized VMDK per
    /// disk (see [`crate::nfc`]).
    Nfc,
}

/// Configuration of a [`VsphereProvider`](crate::VsphereProvider).
#[derive(Clone)]
pub struct VsphereConfig {
    /// SDK URL, `https://host/sdk` (a bare `https://host` gets `/sdk`).
    pub url: String,
    /// User name.
    pub user: String,
    /// Password.
    pub password: Secret,
    /// SHA-256 thumbprint of the server certificate (hex, colons optional): when set, the
    /// server is trusted if and only if its certificate has this thumbprint (for self-signed
    /// hosts). When unset, the certificate must chain to a system root and name the host.
    pub thumbprint: Option<String>,
    /// Accept a plain `http://` URL (the password then travels in clear). Default false.
    pub allow_http: bool,
    /// Datacenter name; default: the only one (an error when there are several).
    pub datacenter: Option<String>,
    /// Default datastore for new disks and VMs; default: the first of the datacenter.
    pub datastore: Option<String>,
    /// Resource pool (name) for new VMs; default: the first compute resource's root pool.
    pub resource_pool: Option<String>,
    /// Network for a NIC whose spec names none, and the fallback of [`network_map`](Self::network_map).
    pub default_network: Option<String>,
    /// Source network name → vSphere network or port group name.
    pub network_map: BTreeMap<String, String>,
    /// SCSI controller model.
    pub scsi_model: ScsiModel,
    /// NIC model.
    pub nic_model: NicModel,
    /// Guest id for every VM created (overrides the map of [`crate::spec::guest_id`]).
    pub guest_id_override: Option<String>,
    /// How disks are written.
    pub import_mode: ImportMode,
    /// How disks are read.
    pub export_mode: ExportMode,
    /// Ranged `/folder` reads in flight per disk (ESXi throttles above ~4 per host).
    pub folder_concurrency: usize,
    /// On a VM with changed-block tracking on, ask `QueryChangedDiskAreas` (change id `*`)
    /// which areas of a disk hold data, so the unallocated space of a thin disk is neither read
    /// nor sent. Default on; when the call fails, zero detection does the work (a warning says
    /// so).
    pub changed_block_map: bool,
    /// Size of one ranged `/folder` read.
    pub read_size: usize,
    /// Longest wait for one task.
    pub task_timeout: Duration,
    /// Interval of `HttpNfcLeaseProgress` calls while an NFC transfer runs (the lease times
    /// out after 5 minutes without one).
    pub lease_progress_interval: Duration,
    /// Longest interval between two polls of a task (polls start at 100 ms and double).
    pub task_poll_max: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Longest silence on a SOAP request.
    pub request_timeout: Duration,
    /// Largest SOAP answer accepted, in bytes.
    pub max_response_bytes: usize,
}

impl std::fmt::Debug for VsphereConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsphereConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("thumbprint", &self.thumbprint)
            .field("allow_http", &self.allow_http)
            .field("datacenter", &self.datacenter)
            .field("datastore", &self.datastore)
            .finish_non_exhaustive()
    }
}

impl VsphereConfig {
    /// A configuration for `url` with `user` and `password`, everything else default.
    pub fn new(
        url: impl Into<String>,
        user: impl Into<String>,
        password: impl Into<Secret>,
    ) -> Self {
        VsphereConfig {
            url: url.into(),
            user: user.into(),
            password: password.into(),
            thumbprint: None,
            allow_http: false,
            datacenter: None,
            datastore: None,
            resource_pool: None,
            default_network: None,
            network_map: BTreeMap::new(),
            scsi_model: ScsiModel::default(),
            nic_model: NicModel::default(),
            guest_id_override: None,
            import_mode: ImportMode::default(),
            export_mode: ExportMode::default(),
            folder_concurrency: 4,
            changed_block_map: true,
            read_size: 4 << 20,
            task_timeout: Duration::from_secs(3600),
            lease_progress_interval: Duration::from_secs(30),
            task_poll_max: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(300),
            max_response_bytes: 64 << 20,
        }
    }

    /// Pins the server certificate by its SHA-256 thumbprint.
    pub fn with_thumbprint(mut self, thumbprint: impl Into<String>) -> Self {
        self.thumbprint = Some(thumbprint.into());
        self
    }

    /// Sets the datacenter.
    pub fn with_datacenter(mut self, dc: impl Into<String>) -> Self {
        self.datacenter = Some(dc.into());
        self
    }

    /// Sets the default datastore.
    pub fn with_datastore(mut self, ds: impl Into<String>) -> Self {
        self.datastore = Some(ds.into());
        self
    }

    /// The SDK URL, checked: `https` (or `http` when allowed), a host, no credentials.
    pub fn sdk_url(&self) -> Result<url::Url> {
        let mut u = url::Url::parse(&self.url)
            .map_err(|e| Error::invalid(format!("invalid vSphere URL: {e}")))?;
        match u.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(Error::invalid(
                    "refusing a plain http:// vSphere URL: the password would travel in clear \
                     (set allow_http to accept it)",
                ));
            }
            s => {
                return Err(Error::invalid(format!(
                    "unsupported vSphere URL scheme '{s}'"
                )));
            }
        }
        if u.host_str().is_none_or(str::is_empty) {
            return Err(Error::invalid("the vSphere URL has no host"));
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err(Error::invalid(
                "put credentials in the configuration, not in the vSphere URL",
            ));
        }
        if u.path() == "/" || u.path().is_empty() {
            u.set_path("/sdk");
        }
        u.set_query(None);
        u.set_fragment(None);
        Ok(u)
    }

    /// The pinned thumbprint as 32 bytes, when set.
    pub fn thumbprint_bytes(&self) -> Result<Option<[u8; 32]>> {
        let Some(t) = &self.thumbprint else {
            return Ok(None);
        };
        parse_thumbprint(t).map(Some)
    }
}

/// Parses a SHA-256 thumbprint: 64 hex digits, with or without `:` separators.
pub fn parse_thumbprint(t: &str) -> Result<[u8; 32]> {
    let hex: String = t
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let bad = || {
        Error::invalid("a certificate thumbprint must be a SHA-256: 64 hex digits (colons allowed)")
    };
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_refused_unless_allowed_and_sdk_path_is_added() {
        let c = VsphereConfig::new("http://h", "u", "p");
        assert_eq!(
            c.sdk_url().unwrap_err().kind(),
            virtrigaud_core::ErrorKind::InvalidInput
        );
        let mut c = c;
        c.allow_http = true;
        assert_eq!(c.sdk_url().unwrap().as_str(), "http://h/sdk");
        let c = VsphereConfig::new("https://u:p@h/sdk", "u", "p");
        assert!(c.sdk_url().is_err());
    }

    #[test]
    fn thumbprints_parse_with_or_without_colons() {
        let t = "7A:AE:BD:6B:B6:A8:9F:57:7E:CF:0D:D2:C0:AD:40:17:52:26:7B:C8:14:39:2E:BD:A7:20:D8:DF:F9:43:21:06";
        let a = parse_thumbprint(t).unwrap();
        assert_eq!(a[0], 0x7a);
        assert_eq!(parse_thumbprint(&t.replace(':', "")).unwrap(), a);
        assert!(parse_thumbprint("AB:CD").is_err());
        // SHA-1 thumbprints (what older tools print) are refused, not truncated.
        assert!(parse_thumbprint(&"ab".repeat(20)).is_err());
    }

    #[test]
    fn debug_hides_the_password() {
        let c = VsphereConfig::new("https://h", "u", "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
