//! The SOAP client: one method per remote call we use, over reqwest (rustls) and quick-xml.
//!
//! Why our own: the vSphere API has thousands of types; generated Rust bindings of the WSDL run
//! to hundreds of thousands of lines and pull an XML-schema runtime, for the ~25 calls a
//! migration needs. The subset here writes each request body by hand from the WSDL shapes
//! (`vim.wsdl`/`vim-messages.xsd` of API 6.5+, element order as the schema requires) and reads
//! answers into a small bounded tree ([`crate::xml`]), taking only the fields we use.
//!
//! Session: `SessionManager.Login` returns the `vmware_soap_session` cookie, sent on every SOAP
//! call and on the datastore data path. When a call fails with `NotAuthenticated` (a SOAP
//! fault on vCenter/ESXi; a `missingSet` fault in a property answer on the simulator) the
//! client logs in again once — one login for all callers that saw the same expired session —
//! and repeats the call; a second failure is returned. The password is a
//! [`Secret`](virtrigaud_core::Secret) exposed only while the Login body is written, and no
//! request body is ever logged or quoted in an error.
//!
//! Limits: an answer larger than [`VsphereConfig::max_response_bytes`] fails with `Corrupt`
//! ("answer too large") before it is parsed, and the parser bounds elements and depth.

use crate::config::VsphereConfig;
use crate::error::{from_soap_fault, from_status, from_task_error, from_transport};
use crate::xml::{self, Node, esc};
use futures::StreamExt;
use reqwest::header::{self, HeaderValue};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tracing::{debug, warn};
use virtrigaud_core::{Error, ErrorKind, Result};

/// A managed object reference (`<x type="VirtualMachine">vm-42</x>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MoRef {
    /// Managed object type.
    pub ty: String,
    /// Its id.
    pub value: String,
}

impl MoRef {
    /// A reference of type `ty` to `value`.
    pub fn new(ty: impl Into<String>, value: impl Into<String>) -> Self {
        MoRef {
            ty: ty.into(),
            value: value.into(),
        }
    }
    /// Reads a reference from a node carrying a `type` attribute.
    pub fn from_node(n: &Node) -> Option<MoRef> {
        Some(MoRef::new(n.type_attr.clone()?, n.text().to_string()))
    }
    /// The element `<tag type="ty">value</tag>`.
    pub fn xml(&self, tag: &str) -> String {
        format!(
            "<{tag} type=\"{}\">{}</{tag}>",
            esc(&self.ty),
            esc(&self.value)
        )
    }
    /// The `_this` element of a call on this object.
    pub fn this(&self) -> String {
        self.xml("_this")
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.ty, self.value)
    }
}

/// The managed objects of `ServiceContent` we use.
#[derive(Debug, Clone)]
pub struct ServiceContent {
    /// Root folder.
    pub root_folder: MoRef,
    /// Property collector.
    pub property_collector: MoRef,
    /// View manager.
    pub view_manager: MoRef,
    /// Session manager.
    pub session_manager: MoRef,
    /// Search index.
    pub search_index: MoRef,
    /// File manager.
    pub file_manager: MoRef,
    /// `about.apiType`: `VirtualCenter` or `HostAgent`.
    pub api_type: String,
    /// `about.apiVersion`.
    pub api_version: String,
}

/// One object of a property answer.
#[derive(Debug, Clone)]
pub struct ObjectContent {
    /// The object.
    pub obj: MoRef,
    /// Property path → value node (`<val>`).
    pub props: BTreeMap<String, Node>,
}

impl ObjectContent {
    /// The text of property `path`.
    pub fn text(&self, path: &str) -> Option<&str> {
        self.props.get(path).map(Node::text)
    }
    /// A reference-valued property.
    pub fn moref(&self, path: &str) -> Option<MoRef> {
        self.props.get(path).and_then(MoRef::from_node)
    }
}

#[derive(Debug, Default)]
struct SessionState {
    /// The `Cookie` header value (`vmware_soap_session="…"`).
    cookie: Option<HeaderValue>,
    /// The session key (`UserSession.key`).
    key: Option<String>,
    /// Bumped on every login.
    generation: u64,
}

/// The SOAP and data-path client of one vCenter or ESXi endpoint.
pub struct Client {
    cfg: Arc<VsphereConfig>,
    sdk: url::Url,
    http: reqwest::Client,
    data: reqwest::Client,
    session: std::sync::Mutex<SessionState>,
    login_lock: Mutex<()>,
    content: tokio::sync::OnceCell<ServiceContent>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("sdk", &self.sdk.as_str())
            .field("user", &self.cfg.user)
            .finish_non_exhaustive()
    }
}

const SOAP_ACTION: &str = "urn:vim25/6.5";

/// How a result of [`Client::call`] is to be checked for an expired session.
fn session_expired(e: &Error) -> bool {
    e.kind() == ErrorKind::Auth && e.message().contains("NotAuthenticated")
}

/// Whether a property answer says the session is gone (the simulator answers
/// `RetrieveProperties` without a session with a `NotAuthenticated` fault per property).
fn has_not_authenticated(n: &Node) -> bool {
    if n.name == "missingSet" {
        return n
            .path(&["fault", "fault"])
            .and_then(|f| f.xsi_type.as_deref())
            == Some("NotAuthenticated");
    }
    n.children.iter().any(has_not_authenticated)
}

impl Client {
    /// Builds the client (no network yet).
    pub fn new(cfg: VsphereConfig) -> Result<Client> {
        let sdk = cfg.sdk_url()?;
        let pinned = cfg.thumbprint_bytes()?;
        let build = |read_timeout: Option<Duration>| -> Result<reqwest::Client> {
            let mut b = reqwest::Client::builder()
                .connect_timeout(cfg.connect_timeout)
                .pool_idle_timeout(Duration::from_secs(30))
                .redirect(reqwest::redirect::Policy::none());
            if let Some(t) = read_timeout {
                b = b.read_timeout(t);
            }
            if let Some(t) = pinned {
                b = b.tls_backend_preconfigured(crate::tls::pinned_config(t)?);
            }
            b.build()
                .map_err(|e| Error::invalid(format!("cannot build the HTTP client: {e}")))
        };
        let http = build(Some(cfg.request_timeout))?;
        let data = build(None)?;
        Ok(Client {
            cfg: Arc::new(cfg),
            sdk,
            http,
            data,
            session: std::sync::Mutex::new(SessionState::default()),
            login_lock: Mutex::new(()),
            content: tokio::sync::OnceCell::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VsphereConfig {
        &self.cfg
    }

    /// The SDK URL.
    pub fn sdk_url(&self) -> &url::Url {
        &self.sdk
    }

    /// The client for data transfers (no read timeout: the caller bounds its waits).
    pub fn data_client(&self) -> &reqwest::Client {
        &self.data
    }

    fn session_state(&self) -> (Option<HeaderValue>, u64) {
        match self.session.lock() {
            Ok(s) => (s.cookie.clone(), s.generation),
            Err(p) => {
                let s = p.into_inner();
                (s.cookie.clone(), s.generation)
            }
        }
    }

    /// The session cookie header, logging in first when there is no session.
    pub async fn cookie(&self) -> Result<HeaderValue> {
        if let (Some(c), _) = self.session_state() {
            return Ok(c);
        }
        self.login().await?;
        self.session_state()
            .0
            .ok_or_else(|| Error::new(ErrorKind::Auth, "login returned no session cookie"))
    }

    /// The session's key, when logged in.
    pub fn session_key(&self) -> Option<String> {
        self.session.lock().ok().and_then(|s| s.key.clone())
    }

    /// Sends one SOAP request and returns the parsed response element
    /// (`<MethodResponse>`), without any session handling.
    async fn send(
        &self,
        method: &str,
        inner: &str,
        cookie: Option<&HeaderValue>,
    ) -> Result<(Node, Option<HeaderValue>)> {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
             <soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" \
             xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><soapenv:Body>\
             <{method} xmlns=\"urn:vim25\">{inner}</{method}></soapenv:Body></soapenv:Envelope>"
        );
        let target = self.sdk.as_str();
        let mut req = self
            .http
            .post(self.sdk.clone())
            .header(header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .header("SOAPAction", SOAP_ACTION)
            .body(body);
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c.clone());
        }
        debug!(method, "SOAP call");
        let resp = req
            .send()
            .await
            .map_err(|e| from_transport(method, target, e))?;
        let status = resp.status();
        let set_cookie = resp
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .find_map(session_cookie);
        let limit = self.cfg.max_response_bytes;
        if let Some(len) = resp.content_length()
            && len > limit as u64
        {
            return Err(too_large(method, limit));
        }
        let mut buf = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| from_transport(method, target, e))?;
            if buf.len() + chunk.len() > limit {
                return Err(too_large(method, limit));
            }
            buf.extend_from_slice(&chunk);
        }
        let root = match xml::parse(&buf) {
            Ok(r) => r,
            Err(e) if !status.is_success() => {
                return Err(from_status(method, target, status).with_source(e));
            }
            Err(e) => return Err(e.with_operation(method.to_string())),
        };
        let body = root
            .child("Body")
            .ok_or_else(|| Error::corrupt(format!("{method}: SOAP answer without a Body")))?;
        if let Some(f) = body.child("Fault") {
            return Err(from_soap_fault(method, f));
        }
        if !status.is_success() {
            return Err(from_status(method, target, status));
        }
        let resp = body
            .children
            .first()
            .cloned()
            .ok_or_else(|| Error::corrupt(format!("{method}: empty SOAP Body")))?;
        Ok((resp, set_cookie))
    }

    /// Calls `method` with the session, logging in again once if the session expired.
    pub async fn call(&self, method: &str, inner: &str) -> Result<Node> {
        let cookie = self.cookie().await?;
        let (_, generation) = self.session_state();
        let first = self.send(method, inner, Some(&cookie)).await;
        let expired = match &first {
            Ok((n, _)) => has_not_authenticated(n),
            Err(e) => session_expired(e),
        };
        if !expired {
            return first.map(|(n, _)| n);
        }
        warn!(method, "vSphere session expired; logging in again");
        self.relogin(generation).await?;
        let cookie = self.cookie().await?;
        let (n, _) = self.send(method, inner, Some(&cookie)).await?;
        if has_not_authenticated(&n) {
            return Err(Error::new(
                ErrorKind::Auth,
                format!("{method}: not authenticated after logging in again"),
            ));
        }
        Ok(n)
    }

    /// Logs in again unless another caller did since `seen_generation`.
    pub async fn relogin(&self, seen_generation: u64) -> Result<()> {
        let _g = self.login_lock.lock().await;
        if self.session_state().1 != seen_generation {
            return Ok(());
        }
        self.login_locked().await
    }

    /// The current session generation (bumped by every login).
    pub fn generation(&self) -> u64 {
        self.session_state().1
    }

    /// `ServiceInstance.RetrieveServiceContent` (cached; needs no session).
    pub async fn content(&self) -> Result<&ServiceContent> {
        self.content
            .get_or_try_init(|| async {
                let this = MoRef::new("ServiceInstance", "ServiceInstance");
                let (n, _) = self
                    .send("RetrieveServiceContent", &this.this(), None)
                    .await?;
                let rv = n
                    .child("returnval")
                    .ok_or_else(|| Error::corrupt("RetrieveServiceContent: no returnval"))?;
                let get = |name: &str| {
                    rv.child(name)
                        .and_then(MoRef::from_node)
                        .ok_or_else(|| Error::corrupt(format!("RetrieveServiceContent: no {name}")))
                };
                Ok(ServiceContent {
                    root_folder: get("rootFolder")?,
                    property_collector: get("propertyCollector")?,
                    view_manager: get("viewManager")?,
                    session_manager: get("sessionManager")?,
                    search_index: get("searchIndex")?,
                    file_manager: get("fileManager")?,
                    api_type: rv.text_at(&["about", "apiType"]).unwrap_or("").to_string(),
                    api_version: rv
                        .text_at(&["about", "apiVersion"])
                        .unwrap_or("")
                        .to_string(),
                })
            })
            .await
    }

    /// `SessionManager.Login`.
    pub async fn login(&self) -> Result<()> {
        let _g = self.login_lock.lock().await;
        if self.session_state().0.is_some() {
            return Ok(());
        }
        self.login_locked().await
    }

    async fn login_locked(&self) -> Result<()> {
        let sm = self.content().await?.session_manager.clone();
        let inner = format!(
            "{}<userName>{}</userName><password>{}</password>",
            sm.this(),
            esc(&self.cfg.user),
            esc(self.cfg.password.expose())
        );
        let (n, cookie) = self.send("Login", &inner, None).await?;
        let cookie = cookie.ok_or_else(|| {
            Error::new(ErrorKind::Auth, "Login answered without a session cookie")
        })?;
        let key = n.text_at(&["returnval", "key"]).map(str::to_string);
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        s.cookie = Some(cookie);
        s.key = key;
        s.generation += 1;
        debug!(user = %self.cfg.user, "logged in to vSphere");
        Ok(())
    }

    /// `SessionManager.Logout` (a missing session is not an error).
    pub async fn logout(&self) -> Result<()> {
        let cookie = {
            let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
            s.key = None;
            s.cookie.take()
        };
        let Some(cookie) = cookie else {
            return Ok(());
        };
        let sm = self.content().await?.session_manager.clone();
        match self.send("Logout", &sm.this(), Some(&cookie)).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::Auth => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `SessionManager.SessionIsActive` for our own session.
    pub async fn session_is_active(&self) -> Result<bool> {
        let sm = self.content().await?.session_manager.clone();
        let Some(key) = self.session_key() else {
            return Ok(false);
        };
        let inner = format!(
            "{}<sessionID>{}</sessionID><userName>{}</userName>",
            sm.this(),
            esc(&key),
            esc(&self.cfg.user)
        );
        let n = self.call("SessionIsActive", &inner).await?;
        Ok(n.text_at(&["returnval"]) == Some("true"))
    }

    /// `SessionManager.TerminateSession` (an administrator ends other sessions).
    pub async fn terminate_sessions(&self, keys: &[String]) -> Result<()> {
        let sm = self.content().await?.session_manager.clone();
        let mut inner = sm.this();
        for k in keys {
            inner.push_str(&format!("<sessionId>{}</sessionId>", esc(k)));
        }
        self.call("TerminateSession", &inner).await?;
        Ok(())
    }

    // --- properties --------------------------------------------------------------------------

    /// `RetrievePropertiesEx` + `ContinueRetrievePropertiesEx` of `paths` of objects selected by
    /// `object_set` (an `<objectSet>` element) of type `ty`.
    pub async fn retrieve(
        &self,
        ty: &str,
        paths: &[&str],
        object_set: &str,
    ) -> Result<Vec<ObjectContent>> {
        let pc = self.content().await?.property_collector.clone();
        let mut prop = format!("<propSet><type>{}</type>", esc(ty));
        for p in paths {
            prop.push_str(&format!("<pathSet>{}</pathSet>", esc(p)));
        }
        prop.push_str("</propSet>");
        let inner = format!(
            "{}<specSet>{prop}{object_set}</specSet><options><maxObjects>500</maxObjects></options>",
            pc.this()
        );
        let n = self.call("RetrievePropertiesEx", &inner).await?;
        let mut out = Vec::new();
        let mut token = read_result(n.child("returnval"), &mut out)?;
        let mut pages = 0;
        while let Some(t) = token {
            pages += 1;
            if out.len() > 1_000_000 || pages > 10_000 {
                return Err(Error::corrupt("property answer too large"));
            }
            let inner = format!("{}<token>{}</token>", pc.this(), esc(&t));
            let n = self.call("ContinueRetrievePropertiesEx", &inner).await?;
            token = read_result(n.child("returnval"), &mut out)?;
        }
        Ok(out)
    }

    /// Properties of one object; `NotFound` when it does not exist.
    pub async fn properties(&self, obj: &MoRef, paths: &[&str]) -> Result<ObjectContent> {
        let set = format!(
            "<objectSet>{}<skip>false</skip></objectSet>",
            obj.xml("obj")
        );
        let mut v = self.retrieve(&obj.ty, paths, &set).await?;
        v.pop()
            .ok_or_else(|| Error::not_found(format!("{obj} does not exist")))
    }

    /// Every object of `ty` under the root folder, with `paths`, through a `ContainerView`
    /// (created and destroyed here).
    pub async fn list(&self, ty: &str, paths: &[&str]) -> Result<Vec<ObjectContent>> {
        // The view belongs to the session: if the session is replaced in between, the view
        // is gone; build it again once.
        match self.list_once(ty, paths).await {
            Err(e) if e.kind() == ErrorKind::NotFound => self.list_once(ty, paths).await,
            r => r,
        }
    }

    async fn list_once(&self, ty: &str, paths: &[&str]) -> Result<Vec<ObjectContent>> {
        let c = self.content().await?.clone();
        let inner = format!(
            "{}{}<type>{}</type><recursive>true</recursive>",
            c.view_manager.this(),
            c.root_folder.xml("container"),
            esc(ty)
        );
        let n = self.call("CreateContainerView", &inner).await?;
        let view = n
            .child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| Error::corrupt("CreateContainerView: no view"))?;
        let set = format!(
            "<objectSet>{}<skip>true</skip><selectSet xsi:type=\"TraversalSpec\">\
             <name>view</name><type>ContainerView</type><path>view</path><skip>false</skip>\
             </selectSet></objectSet>",
            view.xml("obj")
        );
        let r = self.retrieve(ty, paths, &set).await;
        if let Err(e) = self.call("DestroyView", &view.this()).await {
            debug!(error = %e, "DestroyView failed");
        }
        r
    }

    // --- tasks -------------------------------------------------------------------------------

    /// Waits for `task` to finish: polls `info` from 100 ms, doubling up to
    /// [`VsphereConfig::task_poll_max`], until [`VsphereConfig::task_timeout`]; then cancels
    /// it and fails with `Timeout`. Returns `info.result`.
    pub async fn wait_task(&self, task: &MoRef, op: &str) -> Result<Option<Node>> {
        self.wait_task_for(task, op, self.cfg.task_timeout).await
    }

    /// [`Client::wait_task`] with an explicit deadline.
    pub async fn wait_task_for(
        &self,
        task: &MoRef,
        op: &str,
        timeout: Duration,
    ) -> Result<Option<Node>> {
        let start = Instant::now();
        let mut interval = Duration::from_millis(100);
        loop {
            let o = self.properties(task, &["info"]).await?;
            let info = o
                .props
                .get("info")
                .ok_or_else(|| Error::corrupt(format!("{op}: task without info")))?;
            match info.text_at(&["state"]) {
                Some("success") => return Ok(info.child("result").cloned()),
                Some("error") => {
                    return Err(match info.child("error") {
                        Some(err) => from_task_error(op, err),
                        None => Error::new(ErrorKind::Provider, format!("task {op} failed")),
                    });
                }
                _ => {}
            }
            if start.elapsed() >= timeout {
                let cancel = match self.call("CancelTask", &task.this()).await {
                    Ok(_) => "cancelled".to_string(),
                    Err(e) => {
                        debug!(error = %e, "CancelTask failed");
                        format!("CancelTask failed: {e}")
                    }
                };
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("task {op} did not finish within {timeout:?}; {cancel}"),
                )
                .with_operation(op.to_string()));
            }
            let left = timeout.saturating_sub(start.elapsed());
            tokio::time::sleep(interval.min(left)).await;
            interval = (interval * 2).min(self.cfg.task_poll_max);
        }
    }

    /// Calls a `…_Task` method and waits for its task.
    pub async fn run_task(&self, method: &str, inner: &str) -> Result<Option<Node>> {
        let n = self.call(method, inner).await?;
        let task = n
            .child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| Error::corrupt(format!("{method}: no task returned")))?;
        self.wait_task(&task, method).await
    }

    // --- data path ---------------------------------------------------------------------------

    /// A request on the data client with the session cookie.
    pub async fn data_request(
        &self,
        method: reqwest::Method,
        url: &str,
    ) -> Result<reqwest::RequestBuilder> {
        let cookie = self.cookie().await?;
        Ok(self
            .data
            .request(method, url)
            .header(header::COOKIE, cookie))
    }
}

fn too_large(method: &str, limit: usize) -> Error {
    Error::corrupt(format!(
        "{method}: answer larger than {limit} bytes (max_response_bytes); refusing to buffer it"
    ))
    .with_operation(method.to_string())
}

/// The `vmware_soap_session` cookie of a `Set-Cookie` header, as a `Cookie` header value.
fn session_cookie(v: &HeaderValue) -> Option<HeaderValue> {
    let s = v.to_str().ok()?;
    let first = s.split(';').next()?.trim();
    let (name, _) = first.split_once('=')?;
    if name.trim() != "vmware_soap_session" {
        return None;
    }
    let mut h = HeaderValue::from_str(first).ok()?;
    h.set_sensitive(true);
    Some(h)
}

/// Appends the objects of a `RetrieveResult` and returns its continuation token.
fn read_result(rv: Option<&Node>, out: &mut Vec<ObjectContent>) -> Result<Option<String>> {
    let Some(rv) = rv else {
        return Ok(None);
    };
    for o in rv.children_named("objects") {
        let obj = o
            .child("obj")
            .and_then(MoRef::from_node)
            .ok_or_else(|| Error::corrupt("property answer without obj"))?;
        let mut props = BTreeMap::new();
        for p in o.children_named("propSet") {
            if let (Some(name), Some(val)) = (p.text_at(&["name"]), p.child("val")) {
                props.insert(name.to_string(), val.clone());
            }
        }
        out.push(ObjectContent { obj, props });
    }
    Ok(rv
        .text_at(&["token"])
        .filter(|t| !t.is_empty())
        .map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_cookie_is_extracted() {
        let v = HeaderValue::from_static("vmware_soap_session=\"abc\"; Path=/; HttpOnly; Secure;");
        assert_eq!(
            session_cookie(&v).unwrap().to_str().unwrap(),
            "vmware_soap_session=\"abc\""
        );
        assert!(session_cookie(&HeaderValue::from_static("other=1")).is_none());
    }

    #[test]
    fn paged_results_are_read_with_their_token() {
        let x = br#"<r><returnval><token>t1</token><objects><obj type="VirtualMachine">vm-1</obj>
            <propSet><name>name</name><val>a</val></propSet></objects></returnval></r>"#;
        let n = crate::xml::parse(x).unwrap();
        let mut out = Vec::new();
        let t = read_result(n.child("returnval"), &mut out).unwrap();
        assert_eq!(t.as_deref(), Some("t1"));
        assert_eq!(out[0].obj, MoRef::new("VirtualMachine", "vm-1"));
        assert_eq!(out[0].text("name"), Some("a"));
    }

    #[test]
    fn missing_set_not_authenticated_is_detected() {
        let x = br#"<r><returnval><objects><obj type="VirtualMachine">vm-1</obj><missingSet>
            <path>name</path><fault><fault xmlns:i="x" i:type="NotAuthenticated"></fault></fault>
            </missingSet></objects></returnval></r>"#;
        assert!(has_not_authenticated(&crate::xml::parse(x).unwrap()));
    }
}
