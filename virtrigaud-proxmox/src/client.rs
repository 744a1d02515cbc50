//! Our own client for the subset of the PVE REST API the provider needs: one method per API
//! call, over reqwest (rustls).
//!
//! Why not a crate: the PVE client crates on crates.io are either generated for the whole
//! API (hundreds of types, a large build for the ~20 calls we make) or unmaintained, and none
//! offers a streamed multipart upload with an exact `Content-Length`, fingerprint pinning or
//! `Secret`-typed credentials. The subset is small and PVE's wire format is simple (form
//! parameters in, `{"data": …}` out), so owning it costs less than adapting one.
//!
//! * Authentication: an API token header, or a ticket from `POST /access/ticket` sent as the
//!   `PVEAuthCookie` cookie plus `CSRFPreventionToken` on writes. A ticket is renewed after
//!   [`ProxmoxConfig::ticket_renew_after`] (default [`TICKET_RENEW_AFTER`]; PVE's tickets live
//!   2 hours), and once more on a 401 (an upload: its ticket is proven first, and it is retried
//!   only while none of its file was sent).
//! * Every answer is unwrapped from `{"data": …}`; errors are mapped to
//!   [`virtrigaud_core::ErrorKind`]s (module `error`, table there).
//! * Tasks: every UPID is awaited ([`PveClient::wait_task`]) with a deadline; `OK` and
//!   `WARNINGS: n` succeed (warnings logged), anything else fails with the task log's last
//!   lines in the message.
//! * `/version` is read once; [`PveClient::require_version`] fails an operation before it
//!   starts when the server is too old for it.

use crate::config::{Auth, ProxmoxConfig};
use crate::error::{from_status, kind_of_message, transport};
use crate::upload::MultipartLayout;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, OnceCell};
use tracing::{debug, warn};
use virtrigaud_core::{Error, ErrorKind, Result, Secret};

/// A ticket is renewed when it is older than this (PVE's live 2 hours).
pub const TICKET_RENEW_AFTER: Duration = Duration::from_secs(90 * 60);

/// Lines of a failed task's log quoted in its error.
const TASK_LOG_LINES: usize = 10;

/// A PVE version (`9.0.10` → 9, 0, 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PveVersion(pub u32, pub u32, pub u32);

impl PveVersion {
    /// Parses `major.minor[.patch][-…]`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split(['.', '-', '~']).map(|p| p.parse::<u32>().ok());
        let major = it.next()??;
        let minor = it.next().flatten().unwrap_or(0);
        let patch = it.next().flatten().unwrap_or(0);
        Some(PveVersion(major, minor, patch))
    }
}

impl std::fmt::Display for PveVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// PVE ≥ 8.4 takes qcow2/raw/vmdk images as storage content `import` (upload, download-url).
pub const IMPORT_CONTENT_SINCE: PveVersion = PveVersion(8, 4, 0);
/// PVE ≥ 7.2 attaches disks with `import-from` on VM create.
pub const IMPORT_FROM_SINCE: PveVersion = PveVersion(7, 2, 0);

struct Session {
    ticket: Secret,
    csrf: Secret,
    obtained: Instant,
}

/// A VM as `/cluster/resources?type=vm` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct Resource {
    /// VM id.
    pub vmid: u32,
    /// Node.
    pub node: String,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// `running`, `stopped`, …
    #[serde(default)]
    pub status: Option<String>,
    /// `qemu` or `lxc`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Template flag.
    #[serde(default)]
    pub template: Option<Value>,
    /// HA state, when the VM is HA-managed.
    #[serde(default)]
    pub hastate: Option<String>,
    /// The config lock, when held.
    #[serde(default)]
    pub lock: Option<String>,
}

/// A volume on a storage (`GET /nodes/{node}/storage/{storage}/content`).
#[derive(Debug, Clone, Deserialize)]
pub struct Volume {
    /// `STORAGE:VOLNAME`.
    pub volid: String,
    /// Size in bytes.
    #[serde(default)]
    pub size: Option<u64>,
    /// Content type.
    #[serde(default)]
    pub content: Option<String>,
    /// Format.
    #[serde(default)]
    pub format: Option<String>,
}

/// The API client.
pub struct PveClient {
    cfg: Arc<ProxmoxConfig>,
    base: String,
    http: reqwest::Client,
    session: Mutex<Option<Session>>,
    version: OnceCell<PveVersion>,
}

impl std::fmt::Debug for PveClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PveClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl PveClient {
    /// A client for `cfg` (nothing is sent yet).
    pub fn new(cfg: Arc<ProxmoxConfig>) -> Result<Self> {
        if cfg.url.scheme() == "http" && !cfg.allow_http {
            return Err(Error::invalid(format!(
                "{} is plain http: the API token or password would travel in clear; use \
                 https:// with a pinned fingerprint (ProxmoxConfig::allow_http opts in)",
                cfg.url
            )));
        }
        let builder = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("virtrigaud/", env!("CARGO_PKG_VERSION")));
        let builder = crate::tls::apply(builder, &cfg.tls)?;
        let http = builder
            .build()
            .map_err(|e| Error::invalid(format!("cannot build the HTTP client: {e}")))?;
        Ok(PveClient {
            base: cfg.api_base(),
            cfg,
            http,
            session: Mutex::new(None),
            version: OnceCell::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ProxmoxConfig {
        &self.cfg
    }

    // --- transport ---------------------------------------------------------------------------

    async fn login(&self) -> Result<Session> {
        let Auth::Password { user, password } = &self.cfg.auth else {
            return Err(Error::invalid("login needs password authentication"));
        };
        let form = [
            ("username", user.clone()),
            ("password", password.expose().to_string()),
        ];
        let resp = self
            .http
            .post(format!("{}/access/ticket", self.base))
            .timeout(self.cfg.request_timeout)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(encode_form(&form))
            .send()
            .await
            .map_err(|e| transport(e, "login"))?;
        let data = unwrap_data(resp, "login").await?;
        if data.get("NeedTFA").is_some() {
            return Err(Error::new(
                ErrorKind::Auth,
                format!("user {user} needs a second factor: use an API token"),
            ));
        }
        let get = |k: &str| {
            data.get(k)
                .and_then(Value::as_str)
                .map(|s| Secret::new(s.to_string()))
                .ok_or_else(|| Error::corrupt(format!("login answer has no {k}")))
        };
        debug!(user = %user, "logged in to the Proxmox API");
        Ok(Session {
            ticket: get("ticket")?,
            csrf: get("CSRFPreventionToken")?,
            obtained: Instant::now(),
        })
    }

    /// The auth headers for a request; logs in or renews the ticket when needed.
    async fn auth_headers(
        &self,
        write: bool,
        force_login: bool,
    ) -> Result<Vec<(&'static str, String)>> {
        match &self.cfg.auth {
            Auth::Token { id, secret } => Ok(vec![(
                "Authorization",
                format!("PVEAPIToken={id}={}", secret.expose()),
            )]),
            Auth::Password { .. } => {
                let mut s = self.session.lock().await;
                let stale = s
                    .as_ref()
                    .is_none_or(|s| s.obtained.elapsed() >= self.cfg.ticket_renew_after);
                if stale || force_login {
                    *s = Some(self.login().await?);
                }
                let Some(s) = s.as_ref() else {
                    return Err(Error::new(ErrorKind::Auth, "no session"));
                };
                let mut h = vec![("Cookie", format!("PVEAuthCookie={}", s.ticket.expose()))];
                if write {
                    h.push(("CSRFPreventionToken", s.csrf.expose().to_string()));
                }
                Ok(h)
            }
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        form: &[(&str, String)],
        op: &str,
    ) -> Result<Value> {
        let write = method != reqwest::Method::GET;
        let mut retried_login = false;
        let mut attempt = 0u32;
        loop {
            let headers = self.auth_headers(write, retried_login).await?;
            let is_query = method == reqwest::Method::GET || method == reqwest::Method::DELETE;
            let mut req = if is_query {
                let q = encode_form(form);
                let url = if q.is_empty() {
                    format!("{}{path}", self.base)
                } else {
                    format!("{}{path}?{q}", self.base)
                };
                self.http.request(method.clone(), url)
            } else {
                self.http
                    .request(method.clone(), format!("{}{path}", self.base))
                    .header("Content-Type", "application/x-www-form-urlencoded")
                    .body(encode_form(form))
            };
            req = req.timeout(self.cfg.request_timeout);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let result = match req.send().await {
                Ok(resp) => unwrap_data(resp, op).await,
                Err(e) => Err(transport(e, op)),
            };
            match result {
                Err(e)
                    if e.kind() == ErrorKind::Auth
                        && !retried_login
                        && matches!(self.cfg.auth, Auth::Password { .. })
                        && e.message().starts_with("HTTP 401") =>
                {
                    // An expired or revoked ticket: log in once more.
                    retried_login = true;
                }
                // Reads are idempotent: retry transport failures a few times.
                Err(e) if !write && e.is_retryable() && attempt < 3 => {
                    attempt += 1;
                    warn!(op, error = %e, "Proxmox API request failed, retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                other => return other.map_err(|e| e.with_target(path.to_string())),
            }
        }
    }

    async fn get(&self, path: &str, q: &[(&str, String)], op: &str) -> Result<Value> {
        self.call(reqwest::Method::GET, path, q, op).await
    }

    async fn post(&self, path: &str, form: &[(&str, String)], op: &str) -> Result<Value> {
        self.call(reqwest::Method::POST, path, form, op).await
    }

    async fn delete(&self, path: &str, q: &[(&str, String)], op: &str) -> Result<Value> {
        self.call(reqwest::Method::DELETE, path, q, op).await
    }

    // --- version -----------------------------------------------------------------------------

    /// `GET /version`, read once.
    pub async fn version(&self) -> Result<PveVersion> {
        self.version
            .get_or_try_init(|| async {
                let v = self.get("/version", &[], "version").await?;
                let s = v
                    .get("version")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Error::corrupt("/version has no version"))?;
                PveVersion::parse(s)
                    .ok_or_else(|| Error::corrupt(format!("unreadable PVE version {s:?}")))
            })
            .await
            .copied()
    }

    /// Fails with `Unsupported` when the server is older than `min`, naming `what` needs it.
    pub async fn require_version(&self, min: PveVersion, what: &str) -> Result<()> {
        let v = self.version().await?;
        if v < min {
            return Err(Error::unsupported(format!(
                "{what} needs Proxmox VE {min} or newer; this server runs {v}"
            )));
        }
        Ok(())
    }

    // --- cluster and nodes -------------------------------------------------------------------

    /// `GET /cluster/resources?type=vm`: every guest on every node (QEMU VMs only).
    pub async fn cluster_vms(&self) -> Result<Vec<Resource>> {
        let v = self
            .get(
                "/cluster/resources",
                &[("type", "vm".into())],
                "cluster_resources",
            )
            .await?;
        let all: Vec<Resource> = serde_json::from_value(v)?;
        Ok(all
            .into_iter()
            .filter(|r| r.kind.as_deref().is_none_or(|k| k == "qemu"))
            .collect())
    }

    /// `GET /nodes`: the online nodes' names.
    pub async fn online_nodes(&self) -> Result<Vec<String>> {
        let v = self.get("/nodes", &[], "nodes").await?;
        let nodes = v.as_array().cloned().unwrap_or_default();
        Ok(nodes
            .iter()
            .filter(|n| {
                n.get("status")
                    .and_then(Value::as_str)
                    .is_none_or(|s| s == "online")
            })
            .filter_map(|n| n.get("node").and_then(Value::as_str).map(str::to_string))
            .collect())
    }

    /// `GET /cluster/nextid`.
    pub async fn next_id(&self) -> Result<u32> {
        let v = self.get("/cluster/nextid", &[], "nextid").await?;
        match &v {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            _ => None,
        }
        .ok_or_else(|| Error::corrupt(format!("unreadable next VM id {v}")))
    }

    // --- VMs ---------------------------------------------------------------------------------

    /// `GET /nodes/{node}/qemu/{vmid}/config` (the current config, pending changes excluded).
    pub async fn vm_config(&self, node: &str, vmid: u32) -> Result<serde_json::Map<String, Value>> {
        let v = self
            .get(
                &format!("/nodes/{node}/qemu/{vmid}/config"),
                &[("current", "1".into())],
                "vm_config",
            )
            .await?;
        match v {
            Value::Object(m) => Ok(m),
            other => Err(Error::corrupt(format!(
                "VM config is not an object: {other}"
            ))),
        }
    }

    /// `GET /nodes/{node}/qemu/{vmid}/status/current`.
    pub async fn vm_status(&self, node: &str, vmid: u32) -> Result<Value> {
        self.get(
            &format!("/nodes/{node}/qemu/{vmid}/status/current"),
            &[],
            "vm_status",
        )
        .await
    }

    /// `POST /nodes/{node}/qemu/{vmid}/status/{action}` → UPID.
    pub async fn vm_power(
        &self,
        node: &str,
        vmid: u32,
        action: &str,
        form: &[(&str, String)],
    ) -> Result<String> {
        let v = self
            .post(
                &format!("/nodes/{node}/qemu/{vmid}/status/{action}"),
                form,
                action,
            )
            .await?;
        upid(v)
    }

    /// `POST /nodes/{node}/qemu/{vmid}/snapshot` (`vmstate` 0) → UPID.
    pub async fn snapshot_create(
        &self,
        node: &str,
        vmid: u32,
        name: &str,
        description: &str,
    ) -> Result<String> {
        let form = [
            ("snapname", name.to_string()),
            ("vmstate", "0".into()),
            ("description", description.to_string()),
        ];
        upid(
            self.post(
                &format!("/nodes/{node}/qemu/{vmid}/snapshot"),
                &form,
                "snapshot_create",
            )
            .await?,
        )
    }

    /// `DELETE /nodes/{node}/qemu/{vmid}/snapshot/{name}` → UPID.
    pub async fn snapshot_delete(&self, node: &str, vmid: u32, name: &str) -> Result<String> {
        upid(
            self.delete(
                &format!("/nodes/{node}/qemu/{vmid}/snapshot/{name}"),
                &[],
                "snapshot_delete",
            )
            .await?,
        )
    }

    /// `GET /nodes/{node}/qemu/{vmid}/snapshot`: the snapshot names (without `current`).
    pub async fn snapshot_list(&self, node: &str, vmid: u32) -> Result<Vec<String>> {
        let v = self
            .get(
                &format!("/nodes/{node}/qemu/{vmid}/snapshot"),
                &[],
                "snapshot_list",
            )
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.get("name").and_then(Value::as_str))
            .filter(|n| *n != "current")
            .map(str::to_string)
            .collect())
    }

    /// `POST /nodes/{node}/qemu` → UPID.
    pub async fn vm_create(&self, node: &str, form: &[(&str, String)]) -> Result<String> {
        upid(
            self.post(&format!("/nodes/{node}/qemu"), form, "vm_create")
                .await?,
        )
    }

    /// `DELETE /nodes/{node}/qemu/{vmid}?purge=1&destroy-unreferenced-disks=1` → UPID.
    pub async fn vm_destroy(&self, node: &str, vmid: u32) -> Result<String> {
        let q = [
            ("purge", "1".to_string()),
            ("destroy-unreferenced-disks", "1".to_string()),
        ];
        upid(
            self.delete(&format!("/nodes/{node}/qemu/{vmid}"), &q, "vm_destroy")
                .await?,
        )
    }

    // --- storage -----------------------------------------------------------------------------

    /// `GET /storage/{storage}`: the storage's configuration (`type`, `content`, `path`, …).
    pub async fn storage_config(&self, storage: &str) -> Result<serde_json::Map<String, Value>> {
        match self
            .get(&format!("/storage/{storage}"), &[], "storage_config")
            .await?
        {
            Value::Object(m) => Ok(m),
            other => Err(Error::corrupt(format!(
                "storage config is not an object: {other}"
            ))),
        }
    }

    /// `GET /nodes/{node}/storage`: the storages the node sees (`storage`, `type`, `content`,
    /// `enabled`, `active`, `avail`, …).
    pub async fn node_storages(&self, node: &str) -> Result<Vec<Value>> {
        match self
            .get(&format!("/nodes/{node}/storage"), &[], "node_storages")
            .await?
        {
            Value::Array(v) => Ok(v),
            other => Err(Error::corrupt(format!(
                "node storage list is not an array: {other}"
            ))),
        }
    }

    /// `GET /nodes/{node}/network`: the node's interfaces (`iface`, `type`, …).
    pub async fn node_networks(&self, node: &str) -> Result<Vec<Value>> {
        match self
            .get(&format!("/nodes/{node}/network"), &[], "node_networks")
            .await?
        {
            Value::Array(v) => Ok(v),
            other => Err(Error::corrupt(format!(
                "node network list is not an array: {other}"
            ))),
        }
    }

    /// `GET /nodes/{node}/storage/{storage}/content?content=…`.
    pub async fn storage_content(
        &self,
        node: &str,
        storage: &str,
        content: &str,
    ) -> Result<Vec<Volume>> {
        let v = self
            .get(
                &format!("/nodes/{node}/storage/{storage}/content"),
                &[("content", content.to_string())],
                "storage_content",
            )
            .await?;
        Ok(serde_json::from_value(v)?)
    }

    /// `DELETE /nodes/{node}/storage/{storage}/content/{volid}` → UPID, when PVE runs it as a
    /// task.
    pub async fn volume_delete(
        &self,
        node: &str,
        storage: &str,
        volid: &str,
    ) -> Result<Option<String>> {
        let v = self
            .delete(
                &format!(
                    "/nodes/{node}/storage/{storage}/content/{}",
                    encode_path(volid)
                ),
                &[],
                "volume_delete",
            )
            .await?;
        Ok(v.as_str()
            .filter(|s| s.starts_with("UPID:"))
            .map(str::to_string))
    }

    /// `POST /nodes/{node}/storage/{storage}/download-url` (`content=import`) → UPID.
    pub async fn download_url(
        &self,
        node: &str,
        storage: &str,
        url: &str,
        filename: &str,
        sha256: Option<&str>,
    ) -> Result<String> {
        let mut form = vec![
            ("content", "import".to_string()),
            ("filename", filename.to_string()),
            ("url", url.to_string()),
            (
                "verify-certificates",
                if self.cfg.pull_verify_certificates {
                    "1"
                } else {
                    "0"
                }
                .to_string(),
            ),
        ];
        if let Some(sum) = sha256 {
            form.push(("checksum", sum.to_string()));
            form.push(("checksum-algorithm", "sha256".to_string()));
        }
        upid(
            self.post(
                &format!("/nodes/{node}/storage/{storage}/download-url"),
                &form,
                "download_url",
            )
            .await?,
        )
    }

    /// `POST /nodes/{node}/storage/{storage}/upload` (`content=import`) with the file streamed
    /// from `file` (exactly `len` bytes) → UPID. `sha256` goes before the file so PVE verifies
    /// what it stored.
    pub async fn upload(
        &self,
        node: &str,
        storage: &str,
        filename: &str,
        len: u64,
        sha256: Option<&str>,
        file: BoxStream<'static, Result<Bytes>>,
    ) -> Result<String> {
        let mut fields: Vec<(&str, &str)> = vec![("content", "import")];
        if let Some(sum) = sha256 {
            fields.push(("checksum-algorithm", "sha256"));
            fields.push(("checksum", sum));
        }
        let layout = MultipartLayout::new(&fields, "filename", filename, len);
        let op = "upload";
        let path = format!("/nodes/{node}/storage/{storage}/upload");
        // The body is a stream that cannot be sent twice. So with a password login the ticket
        // is proven good first (a cheap authenticated read, which logs in again on a 401), and
        // a 401 to the upload itself is retried once with a fresh login only when not one byte
        // of the file was taken yet.
        if matches!(self.cfg.auth, Auth::Password { .. }) {
            self.get(&format!("/nodes/{node}/storage/{storage}/status"), &[], op)
                .await?;
        }
        let shared = Arc::new(SharedBody {
            stream: Mutex::new(Some(file)),
            taken: std::sync::atomic::AtomicBool::new(false),
        });
        let mut retried_login = false;
        loop {
            let headers = self.auth_headers(true, retried_login).await?;
            let mut req = self
                .http
                .post(format!("{}{path}", self.base))
                .header("Content-Type", layout.content_type())
                .header("Content-Length", layout.content_length().to_string())
                .body(reqwest::Body::wrap_stream(
                    layout.body(SharedBody::lend(shared.clone())),
                ));
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let resp = req.send().await.map_err(|e| transport(e, op))?;
            match unwrap_data(resp, op).await {
                Err(e)
                    if e.kind() == ErrorKind::Auth
                        && e.message().starts_with("HTTP 401")
                        && !retried_login
                        && matches!(self.cfg.auth, Auth::Password { .. })
                        && !shared.taken.load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    warn!(
                        op,
                        "upload refused with 401 before its body was sent: logging in again"
                    );
                    retried_login = true;
                }
                Err(e) => return Err(e.with_target(path)),
                Ok(v) => return upid(v),
            }
        }
    }

    // --- tasks -------------------------------------------------------------------------------

    /// `GET /nodes/{node}/tasks/{upid}/status`.
    pub async fn task_status(&self, upid: &str) -> Result<Value> {
        let node = upid_node(upid)?;
        self.get(
            &format!("/nodes/{node}/tasks/{}/status", encode_path(upid)),
            &[],
            "task_status",
        )
        .await
    }

    /// The last `lines` lines of a task's log.
    pub async fn task_log_tail(&self, upid: &str, lines: usize) -> Result<Vec<String>> {
        let node = upid_node(upid)?;
        let v = self
            .get(
                &format!("/nodes/{node}/tasks/{}/log", encode_path(upid)),
                &[("start", "0".into()), ("limit", "100000".into())],
                "task_log",
            )
            .await?;
        let all: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.get("t").and_then(Value::as_str).map(str::to_string))
            .collect();
        Ok(all[all.len().saturating_sub(lines)..].to_vec())
    }

    /// Waits for a task to stop, up to the configured task timeout.
    pub async fn wait_task(&self, upid: &str) -> Result<()> {
        self.wait_task_for(upid, self.cfg.task_timeout).await
    }

    /// Waits for a task to stop, up to `deadline`; `OK` and `WARNINGS: n` are success.
    pub async fn wait_task_for(&self, upid: &str, deadline: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let st = self.task_status(upid).await?;
            if st.get("status").and_then(Value::as_str) == Some("stopped") {
                let exit = st.get("exitstatus").and_then(Value::as_str).unwrap_or("");
                if exit == "OK" {
                    return Ok(());
                }
                if exit.starts_with("WARNINGS") {
                    // A download task's log names the presigned URL it fetched: redacted.
                    let log: Vec<String> = self
                        .task_log_tail(upid, TASK_LOG_LINES)
                        .await
                        .unwrap_or_default()
                        .iter()
                        .map(|l| redact_urls(l))
                        .collect();
                    warn!(
                        upid,
                        exit = %redact_urls(exit),
                        log = %log.join(" | "),
                        "Proxmox task finished with warnings"
                    );
                    return Ok(());
                }
                let log: Vec<String> = self
                    .task_log_tail(upid, TASK_LOG_LINES)
                    .await
                    .unwrap_or_else(|e| vec![format!("(task log unreadable: {e})")])
                    .iter()
                    .map(|l| redact_urls(l))
                    .collect();
                let kind = kind_of_message(exit).unwrap_or(ErrorKind::Provider);
                return Err(Error::new(
                    kind,
                    format!(
                        "task {upid} failed: {}; log: {}",
                        redact_urls(exit),
                        log.join(" | ")
                    ),
                )
                .with_operation("task"));
            }
            if start.elapsed() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("task {upid} still running after {deadline:?}"),
                )
                .with_operation("task"));
            }
            tokio::time::sleep(
                self.cfg
                    .task_poll
                    .min(deadline.saturating_sub(start.elapsed())),
            )
            .await;
        }
    }
}

/// `text` with the query string of every `http(s)://` URL replaced by `?***` and its user
/// information (`user:password@`) by `***@`: a download task's log names the presigned URL it
/// fetched, and its signature is a credential.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("http") {
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        if !(tail.starts_with("http://") || tail.starts_with("https://")) {
            out.push_str("http");
            rest = &tail[4..];
            continue;
        }
        let end = tail
            .find(|c: char| c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(tail.len());
        let mut url = &tail[..end];
        // user:password@ between the scheme and the host.
        let after_scheme = url.find("://").map_or(0, |i| i + 3);
        let authority_end = url[after_scheme..]
            .find(['/', '?', '#'])
            .map_or(url.len(), |i| after_scheme + i);
        if let Some(at) = url[after_scheme..authority_end].rfind('@') {
            out.push_str(&url[..after_scheme]);
            out.push_str("***");
            url = &url[after_scheme + at..];
        }
        match url.find('?') {
            Some(q) => {
                out.push_str(&url[..q]);
                out.push_str("?***");
            }
            None => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// An upload's file stream, lent to one request body after another until a byte is taken.
struct SharedBody {
    stream: Mutex<Option<BoxStream<'static, Result<Bytes>>>>,
    taken: std::sync::atomic::AtomicBool,
}

impl SharedBody {
    fn lend(this: Arc<SharedBody>) -> BoxStream<'static, Result<Bytes>> {
        use futures::StreamExt;
        futures::stream::unfold(this, |sh| async move {
            let item = {
                let mut g = sh.stream.lock().await;
                let s = g.as_mut()?;
                s.next().await
            };
            match item {
                Some(item) => {
                    sh.taken.store(true, std::sync::atomic::Ordering::SeqCst);
                    Some((item, sh))
                }
                None => None,
            }
        })
        .boxed()
    }
}

/// The node a UPID ran on (`UPID:node:…`).
pub fn upid_node(upid: &str) -> Result<&str> {
    let mut it = upid.split(':');
    match (it.next(), it.next()) {
        (Some("UPID"), Some(node)) if !node.is_empty() => Ok(node),
        _ => Err(Error::corrupt(format!("{upid:?} is not a UPID"))),
    }
}

fn upid(v: Value) -> Result<String> {
    match v {
        Value::String(s) if s.starts_with("UPID:") => Ok(s),
        other => Err(Error::corrupt(format!("expected a task id, got {other}"))),
    }
}

async fn unwrap_data(resp: reqwest::Response, op: &str) -> Result<Value> {
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| transport(e, op))?;
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    if !status.is_success() {
        let msg = parsed
            .as_ref()
            .and_then(|v| v.get("message"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string());
        let errors = parsed.as_ref().and_then(|v| v.get("errors"));
        return Err(from_status(status.as_u16(), &msg, errors, op));
    }
    match parsed {
        Some(Value::Object(mut m)) => Ok(m.remove("data").unwrap_or(Value::Null)),
        _ => Err(Error::corrupt(format!(
            "answer to {op} is not a JSON object with data ({} bytes)",
            body.len()
        ))),
    }
}

/// `application/x-www-form-urlencoded`.
fn encode_form(f: &[(&str, String)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in f {
        s.append_pair(k, v);
    }
    s.finish()
}

/// Percent-encodes one path segment (a UPID or volume id holds `:` and `/`).
fn encode_path(seg: &str) -> String {
    url::form_urlencoded::byte_serialize(seg.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_upids() {
        assert_eq!(PveVersion::parse("9.0.10"), Some(PveVersion(9, 0, 10)));
        assert_eq!(PveVersion::parse("8.4"), Some(PveVersion(8, 4, 0)));
        assert_eq!(PveVersion::parse("8.3-2"), Some(PveVersion(8, 3, 2)));
        assert!(PveVersion::parse("x").is_none());
        assert!(PveVersion(8, 3, 2) < IMPORT_CONTENT_SINCE);
        assert!(PveVersion(9, 0, 0) > IMPORT_CONTENT_SINCE);
        assert_eq!(
            upid_node("UPID:pve1:000003E8:00001B58:6B112093:qmstart:101:root@pam:").unwrap(),
            "pve1"
        );
        assert!(upid_node("nope").is_err());
        assert_eq!(
            encode_path("local:import/a b.raw"),
            "local%3Aimport%2Fa%20b.raw"
        );
    }

    #[test]
    fn urls_lose_their_query_and_credentials() {
        let r = |t: &str| redact_urls(t);
        assert_eq!(
            r(
                "downloading https://s3.example:8333/b/k.qcow2?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc to local"
            ),
            "downloading https://s3.example:8333/b/k.qcow2?*** to local"
        );
        assert_eq!(
            r("from 'http://u:pw@h/p?t=1' and \"https://tok@h2/x\""),
            "from 'http://***@h/p?***' and \"https://***@h2/x\""
        );
        // Nothing to hide, or no URL at all: unchanged.
        for same in [
            "https://h/path/file.raw",
            "TASK OK",
            "an httpd said hello; http is fine",
            "mail@example.org http://h/a@b",
            "",
        ] {
            assert_eq!(r(same), same);
        }
        // Two URLs on one line; a URL at the very end.
        assert_eq!(
            r("a http://h/?s=1 b https://x:y@h2:1?q"),
            "a http://h/?*** b https://***@h2:1?***"
        );
        assert!(!r("WARN: https://h/k?X-Amz-Signature=deadbeef").contains("deadbeef"));
    }
}
