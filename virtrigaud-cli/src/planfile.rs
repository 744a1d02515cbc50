//! Plan files: many VMs, each its own resumable migration (`plan run PLAN.toml`).
//!
//! ```toml
//! from = "libvirt+qemu:///system"      # defaults for every VM
//! to = "local:///srv/vms"
//! via = "s3://bucket/stage"
//! prepare = "snapshot"                 # require_stopped (default) | snapshot | shutdown | as_is
//! jobs = 2                             # VMs at once (--jobs wins)
//! per_source = 4                       # VMs at once per source provider URL
//! network_map = { default = "br0" }
//! storage_map = {}
//! nic_model_map = { vmxnet3 = "virtio" }
//!
//! [[vm]]
//! name = "web01"
//! target_name = "web01-kvm"            # optional; from/to/via/placement may be set per VM too
//!
//! [[vm]]
//! name = "db01"
//! ```
//!
//! Each VM's migration lives under `migrations/<name>` in its store, with its own checkpoint
//! and lease: a rerun resumes every unfinished VM, and `--index N` (or `JOB_COMPLETION_INDEX`)
//! runs only the N-th VM, which is how a Kubernetes Indexed Job spreads a plan over a cluster.

use serde::Deserialize;
use std::collections::BTreeMap;

/// A plan file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    /// Default source provider URL.
    pub from: Option<String>,
    /// Default target provider URL.
    pub to: Option<String>,
    /// Default staging store URL.
    pub via: Option<String>,
    /// Default preparation.
    #[serde(default)]
    pub prepare: Option<String>,
    /// Shutdown timeout (seconds) when `prepare = "shutdown"`.
    #[serde(default)]
    pub shutdown_timeout: Option<u64>,
    /// VMs at once.
    pub jobs: Option<usize>,
    /// VMs at once per source provider URL.
    pub per_source: Option<usize>,
    /// Default target placement.
    pub placement: Option<String>,
    /// Network map.
    #[serde(default)]
    pub network_map: BTreeMap<String, String>,
    /// Storage map.
    #[serde(default)]
    pub storage_map: BTreeMap<String, String>,
    /// NIC model map.
    #[serde(default)]
    pub nic_model_map: BTreeMap<String, String>,
    /// Start the VMs at the end.
    #[serde(default)]
    pub start: bool,
    /// The VMs.
    #[serde(rename = "vm", default)]
    pub vms: Vec<PlanVm>,
}

/// One VM of a plan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanVm {
    /// Source VM.
    pub name: String,
    /// Name on the target.
    pub target_name: Option<String>,
    /// Source provider URL (else the plan's).
    pub from: Option<String>,
    /// Target provider URL (else the plan's).
    pub to: Option<String>,
    /// Store URL (else the plan's).
    pub via: Option<String>,
    /// Placement (else the plan's).
    pub placement: Option<String>,
}

/// A VM's resolved settings.
#[derive(Debug, Clone)]
pub struct Job {
    /// The VM.
    pub vm: PlanVm,
    /// Source URL.
    pub from: String,
    /// Target URL.
    pub to: String,
    /// Store URL.
    pub via: String,
}

impl PlanFile {
    /// Parses a plan file.
    pub fn parse(text: &str) -> virtrigaud::Result<PlanFile> {
        let p: PlanFile = toml::from_str(text)
            .map_err(|e| virtrigaud::Error::invalid(format!("invalid plan file: {e}")))?;
        if p.vms.is_empty() {
            return Err(virtrigaud::Error::invalid("the plan has no [[vm]]"));
        }
        Ok(p)
    }

    /// Every VM with its URLs resolved.
    pub fn jobs(&self) -> virtrigaud::Result<Vec<Job>> {
        self.vms
            .iter()
            .map(|vm| {
                let pick = |own: &Option<String>, def: &Option<String>, what: &str| {
                    own.clone().or_else(|| def.clone()).ok_or_else(|| {
                        virtrigaud::Error::invalid(format!(
                            "VM {:?} has no {what} (set it in the plan or the [[vm]])",
                            vm.name
                        ))
                    })
                };
                Ok(Job {
                    from: pick(&vm.from, &self.from, "from")?,
                    to: pick(&vm.to, &self.to, "to")?,
                    via: pick(&vm.via, &self.via, "via")?,
                    vm: vm.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_defaults_and_overrides() {
        let p = PlanFile::parse(
            r#"
from = "local:///a"
to = "local:///b"
via = "file:///s"
network_map = { default = "br0" }
[[vm]]
name = "web01"
[[vm]]
name = "db01"
to = "local:///c"
"#,
        )
        .unwrap();
        let j = p.jobs().unwrap();
        assert_eq!(j[0].to, "local:///b");
        assert_eq!(j[1].to, "local:///c");
        assert_eq!(p.network_map["default"], "br0");
        assert!(PlanFile::parse("from = 1").is_err());
        assert!(PlanFile::parse("[[vm]]\nname = \"x\"\nbogus = 1").is_err());
    }
}
