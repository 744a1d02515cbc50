//! The migration runner between two local image directories, through filesystem storage.
//!
//! Crash windows are made by a fault-injecting wrapper around the real provider and the real
//! filesystem backend: the checkpoint write that would record a finished step fails, exactly
//! as if the process had died between the step and its record. A rerun must reach the same
//! result as an uninterrupted run.

use async_trait::async_trait;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use virtrigaud::io::ByteSink;
use virtrigaud::migration::StepStatus;
use virtrigaud::storage::FsBackend;
use virtrigaud::*;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    virtrigaud::testdata::noise(seed, len)
}

fn sparse_file(path: &Path, size: u64, seed: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for i in 0..3u64 {
        f.seek(SeekFrom::Start(i * size / 3 + 4097)).unwrap();
        f.write_all(&pattern(300_000, seed + i)).unwrap();
    }
}

async fn two_disk_vm(root: &Path) -> LocalProvider {
    std::fs::create_dir_all(root.join("web01")).unwrap();
    sparse_file(&root.join("web01/root.raw"), 32 << 20, 1);
    sparse_file(&root.join("web01/data.raw"), 16 << 20, 9);
    let p = LocalProvider::new(root);
    let disk = |id: &str, loc: &str, bus| DiskInfo {
        id: id.into(),
        capacity: 0,
        allocation: None,
        format: None,
        bus: Some(bus),
        location: loc.into(),
    };
    p.write_vm(
        &VmInfo {
            annotation: None,
            id: "web01".into(),
            name: "web01".into(),
            cpus: 4,
            memory_mib: 4096,
            firmware: Firmware::Uefi,
            machine: Some("q35".into()),
            guest_os: Some("debian12".into()),
            state: PowerState::Stopped,
            disks: vec![
                disk("vda", "root.raw", DiskBus::Virtio),
                disk("sda", "data.raw", DiskBus::Sata),
            ],
            nics: vec![
                NicInfo {
                    mac: Some("52:54:00:aa:00:01".into()),
                    model: Some("virtio".into()),
                    network: Some("prod".into()),
                },
                NicInfo {
                    mac: Some("52:54:00:aa:00:02".into()),
                    model: Some("e1000".into()),
                    network: Some("backup".into()),
                },
            ],
        },
        false,
    )
    .await
    .unwrap();
    p
}

/// Faults a [`Faulty`] provider injects.
#[derive(Debug, Default)]
struct Faults {
    /// create_disk fails for disk names starting with this, once.
    fail_create_disk: Mutex<Option<String>>,
    /// create_vm fails.
    fail_create_vm: AtomicBool,
    /// describe_vm reports the VM running.
    report_running: AtomicBool,
    /// open_created_disk reads the source's other disk instead (a target that lies).
    lie_on_reread: AtomicBool,
    /// create_disk's sink flips the first byte of every data write (a target that damages
    /// what it stores).
    damage_writes: AtomicBool,
    create_vm_calls: AtomicUsize,
    delete_disk_calls: AtomicUsize,
}

/// The real local provider with faults injected at chosen points.
#[derive(Debug)]
struct Faulty {
    inner: LocalProvider,
    f: Arc<Faults>,
    liar_source: Option<(LocalProvider, String, String)>,
}

fn injected(what: &str) -> Error {
    Error::new(ErrorKind::Provider, format!("injected fault: {what}"))
}

#[async_trait]
impl Provider for Faulty {
    fn kind(&self) -> &'static str {
        "local"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn validate(&self) -> Result<()> {
        self.inner.validate().await
    }
    async fn list_vms(&self) -> Result<Vec<VmSummary>> {
        self.inner.list_vms().await
    }
    async fn describe_vm(&self, vm: &str) -> Result<VmInfo> {
        let mut i = self.inner.describe_vm(vm).await?;
        if self.f.report_running.load(Ordering::SeqCst) {
            i.state = PowerState::Running;
        }
        Ok(i)
    }
    async fn power(&self, vm: &str, op: PowerOp) -> Result<()> {
        self.inner.power(vm, op).await
    }
    async fn create_snapshot(&self, vm: &str, name: &str) -> Result<SnapshotRef> {
        self.inner.create_snapshot(vm, name).await
    }
    async fn delete_snapshot(&self, vm: &str, s: &SnapshotRef) -> Result<()> {
        self.inner.delete_snapshot(vm, s).await
    }
    async fn open_disk(
        &self,
        vm: &str,
        disk: &str,
        snapshot: Option<&SnapshotRef>,
    ) -> Result<OpenedDisk> {
        self.inner.open_disk(vm, disk, snapshot).await
    }
    async fn create_disk(&self, spec: &DiskCreateSpec) -> Result<CreatedDisk> {
        {
            let mut g = self.f.fail_create_disk.lock().unwrap();
            if g.as_ref()
                .is_some_and(|p| spec.name.starts_with(p.as_str()))
            {
                *g = None;
                return Err(injected("create_disk"));
            }
        }
        let mut created = self.inner.create_disk(spec).await?;
        if self.f.damage_writes.load(Ordering::SeqCst) {
            created.sink = Box::new(DamagingSink(created.sink));
        }
        Ok(created)
    }
    async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        self.f.create_vm_calls.fetch_add(1, Ordering::SeqCst);
        if self.f.fail_create_vm.load(Ordering::SeqCst) {
            return Err(injected("create_vm"));
        }
        self.inner.create_vm(spec).await
    }
    async fn delete_vm(&self, vm: &str) -> Result<()> {
        self.inner.delete_vm(vm).await
    }
    async fn find_disk(&self, spec: &DiskCreateSpec) -> Result<Option<String>> {
        self.inner.find_disk(spec).await
    }
    async fn open_created_disk(&self, vm: &str, location: &str) -> Result<OpenedDisk> {
        if self.f.lie_on_reread.load(Ordering::SeqCst)
            && let Some((p, svm, sdisk)) = &self.liar_source
        {
            return p.open_disk(svm, sdisk, None).await;
        }
        self.inner.open_created_disk(vm, location).await
    }
    async fn delete_disk(&self, vm: &str, location: &str) -> Result<()> {
        self.f.delete_disk_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.delete_disk(vm, location).await
    }
}

/// A sink that flips the first byte of every data write it passes on.
struct DamagingSink(Box<dyn ByteSink>);

#[async_trait]
impl ByteSink for DamagingSink {
    async fn write(&mut self, data: bytes::Bytes) -> Result<()> {
        let mut v = data.to_vec();
        if let Some(b) = v.first_mut() {
            *b ^= 0xff;
        }
        self.0.write(bytes::Bytes::from(v)).await
    }
    async fn write_zeros(&mut self, len: u64) -> Result<()> {
        self.0.write_zeros(len).await
    }
    async fn commit(self: Box<Self>) -> Result<()> {
        self.0.commit().await
    }
    async fn abort(self: Box<Self>) -> Result<()> {
        self.0.abort().await
    }
}

type Crash = Box<dyn Fn(&MigrationState) -> bool + Send + Sync>;

/// The real filesystem backend, whose checkpoint write fails (once) when `crash` says so:
/// the process "dies" after a step and before its record.
struct CrashingStore {
    inner: Arc<FsBackend>,
    crash: Mutex<Option<Crash>>,
    /// Once crashed, the "process" is dead: every later write fails.
    dead: AtomicBool,
}

impl std::fmt::Debug for CrashingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CrashingStore")
    }
}

impl CrashingStore {
    fn new(inner: Arc<FsBackend>, crash: Crash) -> Self {
        CrashingStore {
            inner,
            crash: Mutex::new(Some(crash)),
            dead: AtomicBool::new(false),
        }
    }

    fn should_crash(&self, data: &[u8]) -> bool {
        let Ok(state) = serde_json::from_slice::<MigrationState>(data) else {
            return false;
        };
        let mut g = self.crash.lock().unwrap();
        if g.as_ref().is_some_and(|c| c(&state)) {
            *g = None;
            self.dead.store(true, Ordering::SeqCst);
        }
        self.dead.load(Ordering::SeqCst)
    }
}

/// A store wrapper whose `put` buffers checkpoint writes and decides at commit.
#[derive(Debug)]
struct Store(Arc<CrashingStore>);

struct DecidingSink {
    key: String,
    buf: Vec<u8>,
    store: Arc<CrashingStore>,
}

#[async_trait]
impl ByteSink for DecidingSink {
    async fn write(&mut self, data: bytes::Bytes) -> Result<()> {
        self.buf.extend_from_slice(&data);
        Ok(())
    }
    async fn commit(self: Box<Self>) -> Result<()> {
        if self.store.should_crash(&self.buf) {
            return Err(Error::new(
                ErrorKind::Io,
                "injected crash before the checkpoint",
            ));
        }
        self.store
            .inner
            .put_bytes(&self.key, bytes::Bytes::from(self.buf))
            .await
    }
    async fn abort(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl StorageBackend for Store {
    fn location(&self) -> String {
        format!("crashing+{}", self.0.inner.location())
    }
    fn capabilities(&self) -> StorageCapabilities {
        self.0.inner.capabilities()
    }
    async fn put(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ByteSink>> {
        if key.ends_with("migration.json") {
            return Ok(Box::new(DecidingSink {
                key: key.into(),
                buf: Vec::new(),
                store: self.0.clone(),
            }));
        }
        if self.0.dead.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Io,
                "injected crash: the process is gone",
            ));
        }
        self.0.inner.put(key, opts).await
    }
    async fn get(
        &self,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<virtrigaud::ByteStream> {
        self.0.inner.get(key, range).await
    }
    async fn stat(&self, key: &str) -> Result<ObjectMeta> {
        self.0.inner.stat(key).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.0.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.0.inner.list(prefix).await
    }
}

struct Setup {
    tmp: tempfile::TempDir,
    source: Arc<LocalProvider>,
    target: Arc<Faulty>,
    faults: Arc<Faults>,
    fs: Arc<FsBackend>,
}

impl Setup {
    async fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let source = Arc::new(two_disk_vm(&tmp.path().join("src")).await);
        let faults = Arc::new(Faults::default());
        let target = Arc::new(Faulty {
            inner: LocalProvider::new(tmp.path().join("dst")),
            f: faults.clone(),
            liar_source: Some((
                LocalProvider::new(tmp.path().join("src")),
                "web01".into(),
                "sda".into(),
            )),
        });
        let fs = Arc::new(FsBackend::new(tmp.path().join("store")));
        Setup {
            tmp,
            source,
            target,
            faults,
            fs,
        }
    }

    fn migration(&self, plan: MigrationPlan) -> Migration {
        Migration::new(
            self.source.clone(),
            self.target.clone(),
            self.fs.clone(),
            plan,
        )
    }

    fn crashing(&self, plan: MigrationPlan, crash: Crash) -> Migration {
        let store = Arc::new(Store(Arc::new(CrashingStore::new(self.fs.clone(), crash))));
        Migration::new(self.source.clone(), self.target.clone(), store, plan)
    }

    /// Every file under the target VM's directory, sorted.
    fn target_files(&self, vm: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.tmp.path().join("dst").join(vm))
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Asserts that the target VM holds the source's disks byte for byte, and nothing else.
    async fn assert_migrated(&self, vm: &str) {
        let info = self.target.describe_vm(vm).await.unwrap();
        assert_eq!(info.disks.len(), 2);
        for (src, d) in ["root.raw", "data.raw"].iter().zip(&info.disks) {
            assert_eq!(
                std::fs::read(self.tmp.path().join("src/web01").join(src)).unwrap(),
                std::fs::read(self.tmp.path().join("dst").join(vm).join(&d.location)).unwrap(),
                "{src} → {}",
                d.location
            );
        }
        let files = self.target_files(vm);
        assert_eq!(
            files.len(),
            3,
            "two disks and vm.json, no leftovers: {files:?}"
        );
    }
}

fn plan() -> MigrationPlan {
    MigrationPlan::new("web01", "migrations/web01")
        .with_target_name("web01-new")
        .with_network("prod", "vmbr0")
        .with_nic_model("e1000", "e1000e")
        .with_bus(DiskBus::Scsi)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_a_two_disk_vm_with_mapped_hardware_and_typed_events() {
    let s = Setup::new().await;
    let mut m = s.migration(plan());
    let mut rx = m.events();
    // Migration owns its providers: it can be spawned.
    let report = tokio::spawn(async move { m.run().await })
        .await
        .unwrap()
        .unwrap();
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    assert_eq!((report.exported_now, report.imported_now), (2, 2));
    assert!(report.state.disks.iter().all(|d| d.verified));
    assert!(report.state.finished);

    let vm = s.target.describe_vm("web01-new").await.unwrap();
    assert_eq!(
        (vm.cpus, vm.memory_mib, vm.firmware),
        (4, 4096, Firmware::Uefi)
    );
    assert!(vm.disks.iter().all(|d| d.bus == Some(DiskBus::Scsi)));
    assert_eq!(vm.nics[0].network.as_deref(), Some("vmbr0"), "mapped");
    assert_eq!(
        vm.nics[1].network.as_deref(),
        Some("backup"),
        "unmapped keeps its name"
    );
    assert_eq!(vm.nics[1].model.as_deref(), Some("e1000e"), "model mapped");
    assert_eq!(vm.nics[0].model.as_deref(), Some("virtio"));
    assert_eq!(vm.nics[0].mac.as_deref(), Some("52:54:00:aa:00:01"));
    assert!(vm.has_marker(&report.state.marker()), "{:?}", vm.annotation);
    s.assert_migrated("web01-new").await;

    // Events: serialisable, progress with real totals, the VM created only after every verify.
    let json: Vec<String> = events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    assert!(json.iter().any(|j| j.contains("\"event\":\"finished\"")));
    let pos = |pred: &dyn Fn(&MigrationEvent) -> bool| events.iter().position(pred);
    let create = pos(&|e| {
        matches!(
            e,
            MigrationEvent::PhaseStarted {
                phase: Phase::CreateVm,
                ..
            }
        )
    })
    .expect("create phase");
    let verifies: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            matches!(
                e,
                MigrationEvent::PhaseFinished {
                    phase: Phase::Verify,
                    skipped: false,
                    ..
                }
            )
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(verifies.len(), 2);
    assert!(verifies.iter().all(|&v| v < create), "verify before create");
    let progress: Vec<&Progress> = events
        .iter()
        .filter_map(|e| match e {
            MigrationEvent::Progress { progress, .. } => Some(progress),
            _ => None,
        })
        .collect();
    assert!(!progress.is_empty());
    assert!(progress.iter().all(|p| p.virtual_size > 0), "real totals");

    // A third run is a no-op.
    let again = s.migration(plan()).run().await.unwrap();
    assert_eq!((again.exported_now, again.imported_now), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_import_resumes_and_moves_only_what_is_missing() {
    let s = Setup::new().await;
    let slug = virtrigaud::migration::disk_slug("sda");
    *s.faults.fail_create_disk.lock().unwrap() = Some(slug);
    let e = s
        .migration(plan().with_disk_parallelism(1))
        .run()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("injected fault"), "{e}");
    let st = s.migration(plan()).load_state().await.unwrap().unwrap();
    assert_eq!(st.disks[0].import, StepStatus::Done);
    assert_eq!(st.disks[1].import, StepStatus::Started);
    assert_eq!(
        st.vm_step,
        StepStatus::Pending,
        "no VM before every disk is in"
    );
    assert!(s.target.describe_vm("web01-new").await.is_err());

    let r = s.migration(plan()).run().await.unwrap();
    assert_eq!((r.exported_now, r.imported_now), (0, 1));
    s.assert_migrated("web01-new").await;
}

/// Runs with a crash at `when`, then reruns to the end; returns the rerun's report and events.
async fn crash_then_resume(s: &Setup, when: Crash) -> (MigrationReport, Vec<MigrationEvent>) {
    let e = s.crashing(plan(), when).run().await.unwrap_err();
    assert!(e.to_string().contains("injected crash"), "{e}");
    let mut m = s.migration(plan());
    let mut rx = m.events();
    let r = m.run().await.unwrap();
    s.assert_migrated("web01-new").await;
    let mut ev = Vec::new();
    while let Ok(e) = rx.try_recv() {
        ev.push(e);
    }
    (r, ev)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_an_export_before_its_record_adopts_the_export() {
    let s = Setup::new().await;
    let (r, ev) = crash_then_resume(
        &s,
        Box::new(|st| {
            st.disks
                .iter()
                .any(|d| d.exports.iter().any(|x| x.status == StepStatus::Done))
        }),
    )
    .await;
    // The crashed export's manifest is adopted (not exported again).
    let adopted = ev
        .iter()
        .filter(|e| {
            matches!(
                e,
                MigrationEvent::PhaseFinished {
                    phase: Phase::Export,
                    skipped: true,
                    ..
                }
            )
        })
        .count();
    // The other disk, exported concurrently, may have completed too before the "process died".
    assert!(adopted >= 1, "{ev:?}");
    assert_eq!(adopted + r.exported_now, 2, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_an_import_commits_before_its_record_replaces_the_disk() {
    let s = Setup::new().await;
    let (r, ev) = crash_then_resume(
        &s,
        Box::new(|st| st.disks.iter().any(|d| d.import == StepStatus::Done)),
    )
    .await;
    assert!(r.imported_now >= 1);
    assert!(
        ev.iter().any(|e| matches!(e, MigrationEvent::Warning { message, .. } if message.contains("replacing disk"))),
        "{ev:?}"
    );
    assert!(
        s.faults.delete_disk_calls.load(Ordering::SeqCst) >= 1,
        "replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_create_vm_before_its_record_adopts_the_vm() {
    let s = Setup::new().await;
    let (r, _) = crash_then_resume(&s, Box::new(|st| st.vm_step == StepStatus::Done)).await;
    assert_eq!((r.exported_now, r.imported_now), (0, 0));
    // The VM the crashed run made carries this migration's marker and all its disks: adopted.
    assert_eq!(s.faults.create_vm_calls.load(Ordering::SeqCst), 1);
    let vm = s.target.describe_vm("web01-new").await.unwrap();
    assert!(vm.has_marker(&r.state.marker()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_vm_under_a_used_prefix_is_a_conflict() {
    let s = Setup::new().await;
    s.migration(plan()).run().await.unwrap();
    let mut other = MigrationPlan::new("web02", "migrations/web01");
    other.target_name = Some("web02".into());
    let e = s.migration(other).run().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    // The same VM with another target name is another plan too.
    let e = s
        .migration(plan().with_target_name("elsewhere"))
        .run()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
}

#[tokio::test]
async fn a_checkpoint_of_a_newer_schema_is_refused() {
    let s = Setup::new().await;
    let st = MigrationState {
        schema_version: virtrigaud::migration::CHECKPOINT_SCHEMA + 1,
        ..Default::default()
    };
    s.fs.put_bytes(
        "migrations/web01/migration.json",
        bytes::Bytes::from(serde_json::to_vec(&st).unwrap()),
    )
    .await
    .unwrap();
    let e = s.migration(plan()).run().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("newer"), "{e}");
}

#[tokio::test]
async fn a_running_source_is_refused_unless_the_plan_says_how() {
    let s = Setup::new().await;
    let faults = Arc::new(Faults::default());
    faults.report_running.store(true, Ordering::SeqCst);
    let running = Arc::new(Faulty {
        inner: LocalProvider::new(s.tmp.path().join("src")),
        f: faults,
        liar_source: None,
    });
    let e = Migration::new(running.clone(), s.target.clone(), s.fs.clone(), plan())
        .run()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    for choice in ["snapshot", "shutdown", "as_is"] {
        assert!(e.to_string().contains(choice), "{e}");
    }
    assert!(
        s.fs.list("migrations/web01/").await.unwrap().len() <= 1,
        "nothing exported"
    );

    // As is: it goes, with a warning.
    let mut m = Migration::new(
        running,
        s.target.clone(),
        s.fs.clone(),
        plan().with_prepare(PrepareSource::AsIs),
    );
    let mut rx = m.events();
    m.run().await.unwrap();
    let mut warned = false;
    while let Ok(e) = rx.try_recv() {
        warned |=
            matches!(&e, MigrationEvent::Warning { message, .. } if message.contains("as is"));
    }
    assert!(warned);
}

#[tokio::test]
async fn a_foreign_vm_with_the_target_name_is_never_touched() {
    let s = Setup::new().await;
    std::fs::create_dir_all(s.tmp.path().join("dst/web01-new")).unwrap();
    s.target
        .inner
        .write_vm(
            &VmInfo {
                annotation: Some("someone else's".into()),
                id: "web01-new".into(),
                name: "web01-new".into(),
                cpus: 1,
                memory_mib: 512,
                firmware: Firmware::Bios,
                machine: None,
                guest_os: None,
                state: PowerState::Stopped,
                disks: vec![],
                nics: vec![],
            },
            false,
        )
        .await
        .unwrap();
    let e = s.migration(plan()).run().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    let vm = s.target.describe_vm("web01-new").await.unwrap();
    assert_eq!(vm.annotation.as_deref(), Some("someone else's"));
    assert_eq!(s.target_files("web01-new"), vec!["vm.json".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_removes_what_the_migration_created_and_a_rerun_finishes() {
    let s = Setup::new().await;
    s.faults.fail_create_vm.store(true, Ordering::SeqCst);
    let p = plan().with_on_failure(OnFailure::Rollback);
    let mut m = s.migration(p.clone());
    let mut rx = m.events();
    let e = m.run().await.unwrap_err();
    assert!(e.to_string().contains("injected fault"), "{e}");
    assert!(
        s.target_files("web01-new").is_empty(),
        "{:?}",
        s.target_files("web01-new")
    );
    let st = s.migration(p.clone()).load_state().await.unwrap().unwrap();
    assert!(st.rolled_back);
    let mut failed_rolled_back = false;
    while let Ok(e) = rx.try_recv() {
        if let MigrationEvent::Failed { rolled_back, .. } = e {
            failed_rolled_back = rolled_back;
        }
    }
    assert!(failed_rolled_back);

    s.faults.fail_create_vm.store(false, Ordering::SeqCst);
    let r = s.migration(p).run().await.unwrap();
    assert_eq!(
        (r.exported_now, r.imported_now),
        (0, 2),
        "staged objects kept"
    );
    s.assert_migrated("web01-new").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_disk_that_differs_on_reread_leaves_no_vm() {
    let s = Setup::new().await;
    s.faults.lie_on_reread.store(true, Ordering::SeqCst);
    let e = s.migration(plan()).run().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
    assert_eq!(s.faults.create_vm_calls.load(Ordering::SeqCst), 0);
    assert!(s.target.describe_vm("web01-new").await.is_err());
    s.faults.lie_on_reread.store(false, Ordering::SeqCst);
    s.migration(plan()).run().await.unwrap();
    s.assert_migrated("web01-new").await;
}

/// The import leaves its SHA-256 proofs to the verify step (`ImportOptions::verified_later`):
/// a target that damages what it writes is caught by the re-read, before any VM exists, and
/// the damaged disk is removed so a rerun imports it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_damages_its_writes_is_caught_by_the_reread() {
    let s = Setup::new().await;
    s.faults.damage_writes.store(true, Ordering::SeqCst);
    let e = s.migration(plan()).run().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
    assert!(
        e.to_string().contains("target disk"),
        "caught by the re-read: {e}"
    );
    assert_eq!(s.faults.create_vm_calls.load(Ordering::SeqCst), 0);
    assert!(s.target.describe_vm("web01-new").await.is_err());

    s.faults.damage_writes.store(false, Ordering::SeqCst);
    let r = s.migration(plan()).run().await.unwrap();
    assert!(r.imported_now >= 1, "the damaged disk is imported again");
    s.assert_migrated("web01-new").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_migration_resumes() {
    let s = Setup::new().await;
    let m = s.migration(plan().with_disk_parallelism(1));
    let token = m.cancel_token();
    let m = m.on_event(move |e| {
        if matches!(
            e,
            MigrationEvent::PhaseFinished {
                phase: Phase::Export,
                ..
            }
        ) {
            token.cancel();
        }
    });
    let e = m.run().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    let st = s.migration(plan()).load_state().await.unwrap().unwrap();
    assert!(!st.finished);
    let r = s.migration(plan()).run().await.unwrap();
    assert!(r.exported_now <= 1, "{r:?}");
    s.assert_migrated("web01-new").await;
}

#[tokio::test]
async fn unsupported_preparation_is_reported_not_faked() {
    let s = Setup::new().await;
    let e = s
        .migration(plan().with_prepare(PrepareSource::Snapshot))
        .run()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(!s.tmp.path().join("dst/web01-new").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_of_the_same_migration_is_refused_while_one_holds_the_lease() {
    let s = Setup::new().await;
    // A live holder on this host (our own parent process stands in for another process).
    let holder = virtrigaud::migration::lease::LeaseRecord {
        host: virtrigaud::migration::lease::host_name(),
        pid: std::os::unix::process::parent_id(),
        acquired: 1,
        expires: u64::MAX / 2,
    };
    s.fs.put_bytes(
        "migrations/web01/migration.lease",
        bytes::Bytes::from(serde_json::to_vec(&holder).unwrap()),
    )
    .await
    .unwrap();
    let e = s.migration(plan()).run().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(
        e.to_string().contains(&format!("process {}", holder.pid)),
        "{e}"
    );
    assert!(
        s.fs.stat("migrations/web01/migration.json").await.is_err(),
        "nothing done"
    );

    // A holder that died (no such process on this host) is taken over.
    let dead = virtrigaud::migration::lease::LeaseRecord {
        pid: 0x7fff_fff0,
        ..holder
    };
    s.fs.put_bytes(
        "migrations/web01/migration.lease",
        bytes::Bytes::from(serde_json::to_vec(&dead).unwrap()),
    )
    .await
    .unwrap();
    s.migration(plan()).run().await.unwrap();
    s.assert_migrated("web01-new").await;
    assert!(
        s.fs.stat("migrations/web01/migration.lease").await.is_err(),
        "released"
    );
}
