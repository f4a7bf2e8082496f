//! One conformance suite for the image store (`pinkeeper::store::ImageStore`): every test body
//! is generic over a [`World`] and runs, unchanged, against the in-memory store and against a
//! private containerd 1.6, 1.7 and 2.x, so the fake cannot drift from the truth.
//!
//! A world is the store pinkeeper calls plus what happens around it: K3s creating records,
//! sweeping their labels (whole-map updates) and deleting them, containerd restarting, and
//! what CRI does on its own. For containerd the testkit's client makes exactly K3s's calls;
//! for the in-memory store its own methods do the same.
//!
//! The tests run in a namespace CRI does not watch (`conform`), so that every event on the
//! stream is one the test made; `cri_adds_its_own_events` runs in `k8s.io`, with real content.
//! "Nothing else was published" is decided by a marker record created afterwards: its create
//! must be the next event.
//!
//! What the real daemons showed that the in-memory store did not do (fixed there): a label
//! whose value is empty is never stored, nor carried by the event, at a create or a
//! whole-map update; and importing an image that exists keeps its labels (an update of the
//! target). CRI 1.6 adopts images like 1.7 and 2.x (the config-digest record, the `managed`
//! label, put back after a sweep) and also re-writes the config record whenever the named
//! one changes. The in-memory world plays CRI as 1.7 and 2.x do, in the adapter below, not
//! in the store.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use containerd_client::types::Descriptor;
use pinkeeper::engine::{ApplyError, EventKind, ImageEvent, ImageRecord, Labels, CRI_PIN, PINNED};
use pinkeeper::store::{EventStream, ImageStore, MemoryStore};
use pinkeeper_testkit::{
    Client, TestImage, Version, CRI_MANAGED_LABEL, K3S_PIN_LABEL, K8S_NAMESPACE,
};

/// How long any one expected event or state may take.
const DEADLINE: Duration = Duration::from_secs(20);
/// A namespace CRI does not watch.
const NAMESPACE: &str = "conform";
/// Changes in a burst.
const BURST: usize = 200;
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

const APP: &str = "docker.io/library/app:1";
const WEB: &str = "registry.example.com/team/web:2.3";

/// The store under test and the world around it.
#[allow(async_fn_in_trait)]
trait World {
    type Store: ImageStore;

    /// The store pinkeeper calls.
    fn store(&self) -> &Self::Store;

    /// Whether CRI watches this world's namespace (containerd: CRI is on and the namespace
    /// is `k8s.io`).
    fn cri(&self) -> bool;

    /// `Images.Create` of a new record (an import, K3s's `forceCreateTag`).
    async fn create(&self, name: &str, digest: &str, labels: &Labels) -> Result<()>;

    /// An import with real content (so CRI can read the image's config): the record's
    /// target is the manifest.
    async fn import(&self, image: &TestImage) -> Result<()>;

    /// What containerd's importer does with an image already there: `Images.Update` of the
    /// target only (`paths = ["target"]`), falling back to a create when there is none.
    async fn reimport(&self, name: &str, digest: &str) -> Result<()>;

    /// A whole-map label update (`paths = ["labels"]`, K3s's sweep).
    async fn sweep(&self, name: &str, labels: &Labels) -> Result<()>;

    /// `Images.Delete`.
    async fn delete(&self, name: &str) -> Result<()>;

    /// containerd restarts (records persist).
    async fn restart(&mut self) -> Result<()>;
}

// ---- the in-memory store ----

struct MemoryWorld {
    store: MemoryStore,
    cri: bool,
}

impl MemoryWorld {
    fn new(namespace: &str) -> Self {
        MemoryWorld {
            store: MemoryStore::new(),
            cri: namespace == K8S_NAMESPACE,
        }
    }
}

impl World for MemoryWorld {
    type Store = MemoryStore;

    fn store(&self) -> &MemoryStore {
        &self.store
    }

    fn cri(&self) -> bool {
        self.cri
    }

    async fn create(&self, name: &str, digest: &str, labels: &Labels) -> Result<()> {
        ensure!(self.store.record(name).is_none(), "{name} already exists");
        self.store.create(ImageRecord {
            name: name.to_string(),
            labels: labels.clone(),
            digest: Some(digest.to_string()),
        });
        Ok(())
    }

    async fn import(&self, image: &TestImage) -> Result<()> {
        let blobs = image.blobs()?;
        let name = &image.names[0];
        self.create(name, &blobs.manifest.digest, &Labels::new())
            .await?;
        if self.cri {
            // What CRI does on its own: a record named by the config digest, then its label
            // on the named record.
            cri_adopts(&self.store, name, &blobs.config.digest);
        }
        Ok(())
    }

    async fn reimport(&self, name: &str, digest: &str) -> Result<()> {
        self.store.create(ImageRecord {
            name: name.to_string(),
            labels: Labels::new(),
            digest: Some(digest.to_string()),
        });
        Ok(())
    }

    async fn sweep(&self, name: &str, labels: &Labels) -> Result<()> {
        ensure!(self.store.replace_labels(name, labels.clone()), "no {name}");
        if self.cri && !labels.contains_key(CRI_MANAGED_LABEL) {
            // CRI puts its label back when an update drops it.
            let mut labels = labels.clone();
            labels.insert(CRI_MANAGED_LABEL.into(), "managed".into());
            self.store.replace_labels(name, labels);
        }
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<()> {
        ensure!(self.store.delete(name), "no {name}");
        Ok(())
    }

    async fn restart(&mut self) -> Result<()> {
        self.store.restart();
        Ok(())
    }
}

/// CRI's reaction to a new record, as the in-memory world plays it.
fn cri_adopts(store: &MemoryStore, name: &str, config: &str) {
    let managed = labels(&[(CRI_MANAGED_LABEL, "managed")]);
    if store.record(config).is_none() {
        store.create(ImageRecord {
            name: config.to_string(),
            labels: managed.clone(),
            digest: store.record(name).and_then(|r| r.digest),
        });
    }
    let mut labels = store.labels(name).unwrap_or_default();
    labels.extend(managed);
    store.replace_labels(name, labels);
}

// ---- a private containerd ----

struct ContainerdWorld {
    daemon: pinkeeper_testkit::Containerd,
    client: Client,
    store: pinkeeper::containerd::Containerd,
    namespace: String,
}

impl ContainerdWorld {
    async fn start(version: Version, namespace: &str) -> Result<Self> {
        let daemon = pinkeeper_testkit::Containerd::start(version).await?;
        let client = daemon.client(namespace).await?;
        let store = pinkeeper::containerd::Containerd::connect(daemon.socket(), namespace)
            .await
            .context("connecting pinkeeper's store")?;
        Ok(ContainerdWorld {
            daemon,
            client,
            store,
            namespace: namespace.to_string(),
        })
    }
}

impl World for ContainerdWorld {
    type Store = pinkeeper::containerd::Containerd;

    fn store(&self) -> &Self::Store {
        &self.store
    }

    fn cri(&self) -> bool {
        // The testkit's config enables CRI, as under K3s.
        self.namespace == K8S_NAMESPACE
    }

    async fn create(&self, name: &str, digest: &str, labels: &Labels) -> Result<()> {
        self.client
            .create_image(name, descriptor(digest), &map(labels))
            .await?;
        Ok(())
    }

    async fn import(&self, image: &TestImage) -> Result<()> {
        let blobs = image.blobs()?;
        // The content is written under a lease kept for the daemon's life, so the garbage
        // collector never takes it while CRI reads it.
        let lease = format!("conform-{}", blobs.manifest.hex());
        self.client
            .create_lease(&lease, &BTreeMap::new())
            .await
            .with_context(|| format!("creating lease {lease}"))?;
        let leased = self.client.with_lease(Some(lease));
        for blob in blobs.layers.iter().chain([&blobs.config, &blobs.manifest]) {
            let reference = format!("conform-{}", blob.hex());
            leased
                .write_blob(&reference, &blob.digest, &blob.data, &BTreeMap::new())
                .await?;
        }
        let target = Descriptor {
            media_type: blobs.manifest.media_type.clone(),
            digest: blobs.manifest.digest.clone(),
            size: blobs.manifest.data.len() as i64,
            ..Default::default()
        };
        leased
            .create_image(&image.names[0], target, &BTreeMap::new())
            .await?;
        Ok(())
    }

    async fn reimport(&self, name: &str, digest: &str) -> Result<()> {
        let image = containerd_client::services::v1::Image {
            name: name.to_string(),
            target: Some(descriptor(digest)),
            ..Default::default()
        };
        match self.client.update(image.clone(), &["target"]).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::NotFound => {
                self.client.create(image).await?;
                Ok(())
            }
            Err(status) => bail!("re-importing {name}: {status}"),
        }
    }

    async fn sweep(&self, name: &str, labels: &Labels) -> Result<()> {
        self.client.replace_labels(name, &map(labels)).await?;
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<()> {
        self.client.delete_image(name).await
    }

    async fn restart(&mut self) -> Result<()> {
        self.daemon.restart().await
    }
}

// ---- helpers ----

/// The test client's label map.
fn map(labels: &Labels) -> BTreeMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn with(base: &Labels, key: &str, value: &str) -> Labels {
    let mut labels = base.clone();
    labels.insert(key.to_string(), value.to_string());
    labels
}

fn without(base: &Labels, key: &str) -> Labels {
    let mut labels = base.clone();
    labels.remove(key);
    labels
}

fn event(kind: EventKind, name: &str, labels: &Labels) -> ImageEvent {
    ImageEvent {
        kind,
        name: name.to_string(),
        labels: labels.clone(),
    }
}

/// A manifest descriptor for records whose content does not matter.
fn descriptor(digest: &str) -> Descriptor {
    Descriptor {
        media_type: MANIFEST.into(),
        digest: digest.into(),
        size: 1,
        ..Default::default()
    }
}

/// A digest of our own for records whose content does not matter.
fn digest(seed: u8) -> String {
    format!("sha256:{}", format!("{seed:02x}").repeat(32))
}

/// The next image event, skipping what pinkeeper ignores; fails after [`DEADLINE`] or if the
/// stream broke.
async fn next_event(events: &mut impl EventStream) -> Result<ImageEvent> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => bail!("no image event within {DEADLINE:?}"),
            Ok(Err(e)) => bail!("the event stream broke: {e}"),
            Ok(Ok(Some(event))) => return Ok(event),
            Ok(Ok(None)) => {}
        }
    }
}

/// The next events must be exactly `expected`, in order.
async fn expect_events(events: &mut impl EventStream, expected: &[ImageEvent]) -> Result<()> {
    for (i, want) in expected.iter().enumerate() {
        let got = next_event(events)
            .await
            .with_context(|| format!("waiting for event {i}: {want:?}"))?;
        ensure!(&got == want, "event {i}: expected {want:?}, got {got:?}");
    }
    Ok(())
}

/// Nothing was published since the last event read: a marker record created now must be
/// the next event.
async fn expect_quiet<W: World>(
    world: &W,
    events: &mut impl EventStream,
    marker: &str,
) -> Result<()> {
    let marker_labels = labels(&[("marker", marker)]);
    world.create(marker, &digest(0xee), &marker_labels).await?;
    let got = next_event(events).await?;
    ensure!(
        got == event(EventKind::Create, marker, &marker_labels),
        "expected nothing before the marker {marker}'s create, got {got:?}"
    );
    Ok(())
}

async fn get(world: &impl World, name: &str) -> Result<ImageRecord> {
    world
        .store()
        .get(name)
        .await?
        .with_context(|| format!("{name} is missing"))
}

async fn pin(world: &impl World, name: &str) -> Result<()> {
    world
        .store()
        .pin(name)
        .await
        .map_err(|e| anyhow::anyhow!("pin {name}: {e:?}"))
}

async fn unpin(world: &impl World, name: &str) -> Result<()> {
    world
        .store()
        .unpin(name)
        .await
        .map_err(|e| anyhow::anyhow!("unpin {name}: {e:?}"))
}

async fn names(world: &impl World) -> Result<BTreeSet<String>> {
    Ok(world
        .store()
        .list()
        .await?
        .into_iter()
        .map(|r| r.name)
        .collect())
}

// ---- the suite ----

/// Runs one test body against every store.
macro_rules! conformance {
    ($test:ident) => {
        conformance!($test, NAMESPACE);
    };
    ($test:ident, $namespace:expr) => {
        mod $test {
            use super::*;

            #[tokio::test]
            async fn memory() -> Result<()> {
                super::$test(MemoryWorld::new($namespace)).await
            }

            #[tokio::test]
            async fn containerd_1_6() -> Result<()> {
                super::$test(ContainerdWorld::start(Version::V1_6, $namespace).await?).await
            }

            #[tokio::test]
            async fn containerd_1_7() -> Result<()> {
                super::$test(ContainerdWorld::start(Version::V1_7, $namespace).await?).await
            }

            #[tokio::test]
            async fn containerd_2_x() -> Result<()> {
                super::$test(ContainerdWorld::start(Version::V2, $namespace).await?).await
            }
        }
    };
}

conformance!(list_then_watch);
conformance!(pin_and_unpin_are_per_key);
conformance!(delete_events_carry_no_labels);
conformance!(empty_label_values_are_not_stored);
conformance!(a_reimport_keeps_the_labels);
conformance!(a_missing_image);
conformance!(a_restart_breaks_the_stream);
conformance!(cri_adds_its_own_events, K8S_NAMESPACE);

/// After `subscribe()` returns, every committed change is delivered, in order; changes
/// before it are not replayed, and the next `list()` has them.
async fn list_then_watch<W: World>(world: W) -> Result<()> {
    let before = labels(&[("team", "a")]);
    world.create(APP, &digest(1), &before).await?;
    let mut events = world.store().subscribe().await?;

    let app = labels(&[(K3S_PIN_LABEL, PINNED), (CRI_PIN, PINNED)]);
    let web = labels(&[("team", "b")]);
    world.create(WEB, &digest(2), &web).await?;
    world.sweep(APP, &app).await?;
    world.sweep(WEB, &Labels::new()).await?;
    world.delete(WEB).await?;
    world.create(WEB, &digest(3), &web).await?;
    expect_events(
        &mut events,
        &[
            // APP's create, before the subscription, is not replayed.
            event(EventKind::Create, WEB, &web),
            event(EventKind::Update, APP, &app),
            event(EventKind::Update, WEB, &Labels::new()),
            event(EventKind::Delete, WEB, &Labels::new()),
            event(EventKind::Create, WEB, &web),
        ],
    )
    .await?;

    let listed = world.store().list().await?;
    let expected = vec![
        ImageRecord {
            name: APP.into(),
            labels: app,
            digest: Some(digest(1)),
        },
        ImageRecord {
            name: WEB.into(),
            labels: web,
            digest: Some(digest(3)),
        },
    ];
    let mut listed = listed;
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    ensure!(
        listed == expected,
        "listed {listed:?}, expected {expected:?}"
    );

    // A second subscriber sees only what follows its own subscription.
    let mut second = world.store().subscribe().await?;
    world.sweep(APP, &Labels::new()).await?;
    let update = event(EventKind::Update, APP, &Labels::new());
    expect_events(&mut events, std::slice::from_ref(&update)).await?;
    expect_events(&mut second, &[update]).await?;

    // A burst, written faster than anyone reads: every change arrives, in commit order.
    let burst: Vec<ImageEvent> = (0..BURST)
        .map(|i| event(EventKind::Update, WEB, &labels(&[("n", &i.to_string())])))
        .collect();
    for e in &burst {
        world.sweep(WEB, &e.labels).await?;
    }
    expect_events(&mut events, &burst).await?;
    expect_events(&mut second, &burst).await?;
    expect_quiet(&world, &mut events, "marker:1").await
}

/// `pin` sets only `io.cri-containerd.pinned=pinned`, `unpin` removes only that key; both keep
/// every other label and the target, and publish an update with the whole map after the
/// change, even when nothing changed.
async fn pin_and_unpin_are_per_key<W: World>(world: W) -> Result<()> {
    let base = labels(&[(K3S_PIN_LABEL, PINNED), ("team", "a"), ("x.y/z", "1")]);
    world.create(APP, &digest(7), &base).await?;
    let mut events = world.store().subscribe().await?;
    let pinned = with(&base, CRI_PIN, PINNED);

    pin(&world, APP).await?;
    let record = get(&world, APP).await?;
    ensure!(record.labels == pinned, "after pin: {record:?}");
    // The adapter sends an empty descriptor with the per-key mask: the target is kept.
    ensure!(
        record.digest == Some(digest(7)),
        "pin changed the target: {record:?}"
    );

    // Already pinned: still an update.
    pin(&world, APP).await?;
    ensure!(get(&world, APP).await?.labels == pinned);

    unpin(&world, APP).await?;
    let record = get(&world, APP).await?;
    ensure!(record.labels == base, "after unpin: {record:?}");
    ensure!(
        record.digest == Some(digest(7)),
        "unpin changed the target: {record:?}"
    );

    // Unpinning what is not pinned: still an update, nothing removed.
    unpin(&world, APP).await?;
    ensure!(get(&world, APP).await?.labels == base);

    expect_events(
        &mut events,
        &[
            event(EventKind::Update, APP, &pinned),
            event(EventKind::Update, APP, &pinned),
            event(EventKind::Update, APP, &base),
            event(EventKind::Update, APP, &base),
        ],
    )
    .await?;

    // A pin after a sweep dropped it keeps what the sweep wrote.
    let swept = labels(&[("team", "b")]);
    world.sweep(APP, &swept).await?;
    pin(&world, APP).await?;
    expect_events(
        &mut events,
        &[
            event(EventKind::Update, APP, &swept),
            event(EventKind::Update, APP, &with(&swept, CRI_PIN, PINNED)),
        ],
    )
    .await?;
    ensure!(get(&world, APP).await?.digest == Some(digest(7)));
    ensure!(
        without(&get(&world, APP).await?.labels, CRI_PIN) == swept,
        "the pin touched another label"
    );
    expect_quiet(&world, &mut events, "marker:1").await
}

/// A delete event carries the name only, whatever labels the record had.
async fn delete_events_carry_no_labels<W: World>(world: W) -> Result<()> {
    let full = labels(&[(K3S_PIN_LABEL, PINNED), (CRI_PIN, PINNED), ("team", "a")]);
    world.create(APP, &digest(1), &full).await?;
    let mut events = world.store().subscribe().await?;
    world.delete(APP).await?;
    expect_events(
        &mut events,
        &[event(EventKind::Delete, APP, &Labels::new())],
    )
    .await?;
    ensure!(world.store().get(APP).await?.is_none());
    ensure!(!names(&world).await?.contains(APP));
    expect_quiet(&world, &mut events, "marker:1").await
}

/// A label whose value is empty is not stored, by a create or by a whole-map update, and the
/// event does not carry it either.
async fn empty_label_values_are_not_stored<W: World>(world: W) -> Result<()> {
    let mut events = world.store().subscribe().await?;
    world
        .create(APP, &digest(1), &labels(&[("empty", ""), ("team", "a")]))
        .await?;
    let created = labels(&[("team", "a")]);
    expect_events(&mut events, &[event(EventKind::Create, APP, &created)]).await?;
    ensure!(get(&world, APP).await?.labels == created);

    world
        .sweep(APP, &labels(&[(K3S_PIN_LABEL, PINNED), (CRI_PIN, "")]))
        .await?;
    let swept = labels(&[(K3S_PIN_LABEL, PINNED)]);
    expect_events(&mut events, &[event(EventKind::Update, APP, &swept)]).await?;
    let listed = world.store().list().await?;
    ensure!(
        listed.len() == 1 && listed[0].labels == swept,
        "listed {listed:?}"
    );
    expect_quiet(&world, &mut events, "marker:1").await
}

/// Importing an image that is already there updates its target and keeps its labels (an
/// update event with them); importing one that is not creates it.
async fn a_reimport_keeps_the_labels<W: World>(world: W) -> Result<()> {
    let pinned = labels(&[(K3S_PIN_LABEL, PINNED), (CRI_PIN, PINNED)]);
    world.create(APP, &digest(1), &pinned).await?;
    let mut events = world.store().subscribe().await?;
    world.reimport(APP, &digest(2)).await?;
    world.reimport(WEB, &digest(3)).await?;
    expect_events(
        &mut events,
        &[
            event(EventKind::Update, APP, &pinned),
            event(EventKind::Create, WEB, &Labels::new()),
        ],
    )
    .await?;
    let app = get(&world, APP).await?;
    ensure!(
        app.labels == pinned && app.digest == Some(digest(2)),
        "after the re-import: {app:?}"
    );
    ensure!(get(&world, WEB).await?.digest == Some(digest(3)));
    expect_quiet(&world, &mut events, "marker:1").await
}

/// A missing image: `get` is `Ok(None)`, `pin` and `unpin` are `Err(NotFound)`, and nothing
/// is published or created.
async fn a_missing_image<W: World>(world: W) -> Result<()> {
    let mut events = world.store().subscribe().await?;
    ensure!(world.store().get(APP).await?.is_none());
    let pin = world.store().pin(APP).await;
    ensure!(pin == Err(ApplyError::NotFound), "pin: {pin:?}");
    let unpin = world.store().unpin(APP).await;
    ensure!(unpin == Err(ApplyError::NotFound), "unpin: {unpin:?}");
    ensure!(world.store().get(APP).await?.is_none(), "pin created {APP}");

    // Deleted in between: the same answers.
    world.create(WEB, &digest(2), &Labels::new()).await?;
    world.delete(WEB).await?;
    expect_events(
        &mut events,
        &[
            event(EventKind::Create, WEB, &Labels::new()),
            event(EventKind::Delete, WEB, &Labels::new()),
        ],
    )
    .await?;
    ensure!(world.store().pin(WEB).await == Err(ApplyError::NotFound));
    ensure!(world.store().unpin(WEB).await == Err(ApplyError::NotFound));
    ensure!(world.store().get(WEB).await?.is_none());
    expect_quiet(&world, &mut events, "marker:1").await?;
    ensure!(names(&world).await? == BTreeSet::from(["marker:1".to_string()]));
    Ok(())
}

/// A restart breaks an open stream: `next()` returns `Err`. Records persist, and a new
/// subscription works.
async fn a_restart_breaks_the_stream<W: World>(mut world: W) -> Result<()> {
    let app = labels(&[(CRI_PIN, PINNED)]);
    world.create(APP, &digest(1), &app).await?;
    let mut events = world.store().subscribe().await?;
    world.restart().await?;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => bail!("the stream did not break within {DEADLINE:?} of the restart"),
            Ok(Err(_)) => break,
            Ok(Ok(Some(event))) => bail!("an event after the restart: {event:?}"),
            Ok(Ok(None)) => {}
        }
    }
    drop(events);
    let mut events = world.store().subscribe().await?;
    ensure!(
        get(&world, APP).await?.labels == app,
        "the restart lost APP's labels"
    );
    unpin(&world, APP).await?;
    expect_events(
        &mut events,
        &[event(EventKind::Update, APP, &Labels::new())],
    )
    .await?;
    expect_quiet(&world, &mut events, "marker:1").await
}

/// With CRI watching the namespace (`k8s.io`, CRI on as under K3s: every version), a new
/// image gets a record named by its config digest and `io.cri-containerd.image=managed` by an
/// extra update; an update that drops the label is followed by CRI's putting it back;
/// pinkeeper's per-key writes keep it; the config record stays after the named one is
/// deleted. CRI 1.6 also re-writes the config record (an update, or a create) whenever the
/// named record changes: the events of the named record are checked in order, the config
/// record's only for what they carry.
async fn cri_adds_its_own_events<W: World>(world: W) -> Result<()> {
    ensure!(world.cri(), "CRI should watch {K8S_NAMESPACE}");
    let mut events = world.store().subscribe().await?;
    let image = TestImage::new(APP);
    let config = image.blobs()?.config.digest;
    let managed = labels(&[(CRI_MANAGED_LABEL, "managed")]);
    let mut config_created = false;
    // The named record's next events must be `expected`, in order; the config record's may
    // come between.
    let mut expect = async |events: &mut <W::Store as ImageStore>::Events,
                            expected: &[ImageEvent]|
           -> Result<()> {
        for want in expected {
            loop {
                let got = next_event(events)
                    .await
                    .with_context(|| format!("waiting for {want:?}"))?;
                if got.name == config {
                    ensure!(
                        got.kind != EventKind::Delete && got.labels == managed,
                        "CRI's record: {got:?}"
                    );
                    config_created |= got.kind == EventKind::Create;
                    continue;
                }
                ensure!(&got == want, "expected {want:?}, got {got:?}");
                break;
            }
        }
        Ok(())
    };

    world.import(&image).await?;
    expect(
        &mut events,
        &[
            event(EventKind::Create, APP, &Labels::new()),
            event(EventKind::Update, APP, &managed),
        ],
    )
    .await?;

    // K3s's sweep drops CRI's label; CRI puts it back on its own.
    let swept = labels(&[(K3S_PIN_LABEL, PINNED), (CRI_PIN, PINNED)]);
    world.sweep(APP, &swept).await?;
    let back = with(&swept, CRI_MANAGED_LABEL, "managed");
    expect(
        &mut events,
        &[
            event(EventKind::Update, APP, &swept),
            event(EventKind::Update, APP, &back),
        ],
    )
    .await?;

    // pinkeeper's per-key writes keep CRI's label, and CRI adds nothing to the named record.
    let unpinned = without(&back, CRI_PIN);
    unpin(&world, APP).await?;
    pin(&world, APP).await?;
    world.delete(APP).await?;
    expect(
        &mut events,
        &[
            event(EventKind::Update, APP, &unpinned),
            event(EventKind::Update, APP, &back),
            event(EventKind::Delete, APP, &Labels::new()),
        ],
    )
    .await?;
    ensure!(config_created, "CRI never created {config}");
    let left = names(&world).await?;
    ensure!(
        left == BTreeSet::from([config.clone()]),
        "CRI's record should outlive the named one: {left:?}"
    );
    let record = get(&world, &config).await?;
    ensure!(record.labels == managed, "CRI's record: {record:?}");
    Ok(())
}
