//! `pinkeeper record --out FILE`: writes what containerd's image events and the images directory
//! show, as a replay fixture in the format of [`crate::replay`], so that a bug report carries
//! the very stream the daemon saw and `pinkeeper replay FILE` runs the engine on it offline.
//!
//! It follows the daemon's list-then-watch cycle line for line, because the replay must see
//! what the daemon saw: subscribe (with the barrier), read the images directory, drop what the
//! listing covers, list (`images` + `connect`), then every image event as containerd's envelope;
//! on a break `disconnect`, then the same again. Events carry no digest (FACTS.md section 3),
//! so each created record's digest is fetched and written first (`digests`), which is what the
//! replay's store gives the record the create makes.
//!
//! Owns: the output file (one `write` per line, so a recording survives Ctrl-C), its own
//! connection to containerd, used read-only (Subscribe, List, Get and the subscription's
//! barrier events), and a watch of the images directory. It never writes an image record,
//! never opens the ledger, and decides nothing: it holds no rule of the engine.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::cli::node::NodeArgs;
use crate::config::{ConfigError, Overrides, DEFAULT_CONTAINERD_SOCKET};
use crate::containerd::reconnect::{images_dir_changed, Backoff};
use crate::containerd::{Containerd, ContainerdError, EnvelopedEvent};
use crate::engine::{EventKind, ImageRecord};
use crate::inventory::watch::Watcher;
use crate::inventory::Scanner;
use crate::replay::format_timestamp;

/// Events queued between the stream reader and the writer (which waits for a `Get` per
/// created record). Past that the recording lists again, as the daemon does on overflow:
/// containerd never drops a slow subscriber, it buffers without bound (FACTS.md section 3).
const QUEUE: usize = 65_536;

/// Arguments of `pinkeeper record`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RecordArgs {
    /// The file to write (JSON lines, replaced if it exists); replay it with
    /// `pinkeeper replay FILE`
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The node's settings.
    #[command(flatten)]
    pub node: NodeArgs,
    /// Stop after this many seconds [default: at SIGINT (Ctrl-C) or SIGTERM]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub duration_secs: Option<u64>,
}

/// What a recording reads and writes, resolved from [`RecordArgs`] as `pinkeeper run`
/// resolves its settings (the config file and `--program` included).
#[derive(Debug, Clone)]
pub(crate) struct RecordSettings {
    /// The file to write.
    pub out: PathBuf,
    /// containerd's gRPC socket.
    pub containerd_socket: PathBuf,
    /// containerd namespace K3s imports into.
    pub namespace: String,
    /// K3s's images directory.
    pub images_dir: PathBuf,
    /// When to stop by itself.
    pub duration_secs: Option<u64>,
}

impl RecordArgs {
    /// The recording these arguments ask for.
    pub(crate) fn resolve(&self) -> Result<RecordSettings, ConfigError> {
        let settings = self.node.resolve(Overrides::default())?;
        Ok(RecordSettings {
            out: self.out.clone(),
            containerd_socket: settings.containerd_socket,
            namespace: settings.namespace,
            images_dir: settings.images_dir,
            duration_secs: self.duration_secs,
        })
    }
}

/// Why a recording stopped short.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    /// The output file cannot be created or written.
    #[error(
        "cannot write the recording {path}: {source}; check that its directory exists and is \
         writable and that the disk is not full, or pass another --out FILE"
    )]
    Output {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// containerd does not answer at the start.
    #[error(
        "{source}. Is K3s (or containerd) running? Pass its socket with --containerd-socket PATH \
         (K3s: {DEFAULT_CONTAINERD_SOCKET}) and run as root"
    )]
    Unreachable {
        /// What failed.
        source: ContainerdError,
    },
    /// The async runtime or a signal handler cannot be set up.
    #[error("cannot start: {0}")]
    Setup(std::io::Error),
}

/// Runs `pinkeeper record`: exit 0 once stopped by a signal or `--duration-secs`, 1 on a
/// failure, 2 on bad usage (a flag, or the config file).
pub(crate) fn run(args: RecordArgs) -> ExitCode {
    let args = match args.resolve() {
        Ok(args) => args,
        Err(e) => return crate::cli::usage_error(&e),
    };
    let runtime = match crate::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(record(&args));
    match result {
        Ok(why) => {
            eprintln!(
                "pinkeeper record: {why}: stopped; replay it with `pinkeeper replay {}`",
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pinkeeper record: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Records until a signal or the duration; returns what stopped it.
pub(crate) async fn record(args: &RecordSettings) -> Result<&'static str, RecordError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Both handlers are in place before anything is written: a signal at any moment ends the
    // file with its closing lines instead of killing the process between two lines.
    let mut terminate = signal(SignalKind::terminate()).map_err(RecordError::Setup)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(RecordError::Setup)?;
    let duration = args.duration_secs.map(Duration::from_secs);
    let stop = async move {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
            _ = sleep_for(duration) => "--duration-secs elapsed",
        }
    };
    tokio::pin!(stop);

    // containerd first: a wrong socket must not clobber an earlier recording.
    let socket = &args.containerd_socket;
    let unreachable = |source| RecordError::Unreachable { source };
    let client = Containerd::connect(socket, &args.namespace)
        .await
        .map_err(unreachable)?;
    let version = client.version().await.map_err(unreachable)?;
    let mut out = Recording::create(&args.out)?;
    out.comment(&format!(
        "recorded by pinkeeper record {} from {}, namespace {}, at {}",
        env!("CARGO_PKG_VERSION"),
        socket.display(),
        args.namespace,
        format_timestamp(SystemTime::now())
    ))?;
    out.comment(&format!(
        "containerd {version}; images directory {}",
        args.images_dir.display()
    ))?;
    eprintln!(
        "pinkeeper record: recording containerd {version} at {} (namespace {}) and {} to {}; \
         Ctrl-C to stop",
        socket.display(),
        args.namespace,
        args.images_dir.display(),
        args.out.display()
    );
    let watch = match Watcher::start(&args.images_dir) {
        Ok(watch) => Some(watch),
        Err(e) => {
            eprintln!(
                "pinkeeper record: cannot watch {} ({e}); it is read again at each reconnection \
                 only",
                args.images_dir.display()
            );
            None
        }
    };
    let mut recorder = Recorder {
        args,
        out,
        scanner: Some(Scanner::new(&args.images_dir)),
        watch,
        last_files: None,
        scan_error: None,
    };
    let why = tokio::select! {
        result = recorder.follow(client) => {
            let Err(error) = result;
            return Err(error);
        }
        why = &mut stop => why,
    };
    // The end of the story: the replay lets time pass up to here, so timers that fired in
    // the daemon before the recording stopped fire in the replay too.
    recorder
        .out
        .comment(&format!("stopped ({why})"))
        .and_then(|()| recorder.out.line(&json!({"timestamp": now()})))?;
    Ok(why)
}

/// The output file.
struct Recording {
    file: File,
    path: PathBuf,
    /// A `connect` was written and no `disconnect` since.
    connected: bool,
}

impl Recording {
    fn create(path: &Path) -> Result<Recording, RecordError> {
        let file = File::create(path).map_err(|source| RecordError::Output {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Recording {
            file,
            path: path.to_path_buf(),
            connected: false,
        })
    }

    /// Writes one line with one `write` to an unbuffered file: nothing is held back in
    /// memory, so whatever was recorded is in the file when pinkeeper is interrupted.
    fn write(&mut self, text: String) -> Result<(), RecordError> {
        self.file
            .write_all(text.as_bytes())
            .map_err(|source| RecordError::Output {
                path: self.path.clone(),
                source,
            })
    }

    fn line(&mut self, value: &Value) -> Result<(), RecordError> {
        self.write(format!("{value}\n"))
    }

    fn comment(&mut self, text: &str) -> Result<(), RecordError> {
        self.write(format!("// {}\n", text.replace('\n', " ")))
    }
}

/// The recorder's state across connections.
struct Recorder<'a> {
    args: &'a RecordSettings,
    out: Recording,
    /// Taken while a scan runs on the blocking pool.
    scanner: Option<Scanner>,
    watch: Option<Watcher>,
    /// The images directory as last written (a `files` line is written when it changes).
    last_files: Option<BTreeMap<String, Vec<String>>>,
    /// The last error reading the directory, reported once.
    scan_error: Option<String>,
}

impl Recorder<'_> {
    /// Follows containerd across breaks; returns only when the output file fails (the caller
    /// stops it otherwise).
    async fn follow(&mut self, first: Containerd) -> Result<Infallible, RecordError> {
        let mut client = first;
        loop {
            let why = self.session(&client).await?;
            if self.out.connected {
                self.out
                    .line(&json!({"disconnect": true, "timestamp": now()}))?;
                self.out.connected = false;
            }
            eprintln!("pinkeeper record: {why}; reconnecting");
            client = self.reconnect().await;
            eprintln!("pinkeeper record: reconnected");
        }
    }

    /// One subscription: read the directory, list, then write every event until the stream
    /// breaks. Returns why it ended; errors are the output file's (fatal).
    async fn session(&mut self, client: &Containerd) -> Result<String, RecordError> {
        if let Some(watch) = &self.watch {
            // As the daemon does at each connection: a watch lost meanwhile is added again.
            watch.rearm();
        }
        let mut subscription = match client.subscribe().await {
            Ok(s) => s,
            Err(e) => return Ok(e.to_string()),
        };
        let (tx, mut rx) = mpsc::channel(QUEUE);
        // Drains the stream at once: containerd must not buffer for a slow recorder.
        let reader = tokio::spawn(async move {
            loop {
                match subscription.next_enveloped().await {
                    Ok(Some(event)) => {
                        if tx.try_send(Ok(event)).is_err() {
                            // Full: the writer sees the channel close and lists again.
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        let _abort = tokio_util::task::AbortOnDropHandle::new(reader);
        // The daemon's order (src/daemon/mod.rs `resync`): directory, drop what the listing
        // covers, list.
        self.rescan().await?;
        while rx.try_recv().is_ok() {}
        let images = match client.list().await {
            Ok(images) => images,
            Err(e) => return Ok(e.to_string()),
        };
        self.out.line(&images_line(&images, SystemTime::now()))?;
        self.out
            .line(&json!({"connect": true, "timestamp": now()}))?;
        self.out.connected = true;
        loop {
            tokio::select! {
                message = rx.recv() => match message {
                    Some(Ok(event)) => self.event(client, event).await?,
                    Some(Err(e)) => return Ok(format!("lost containerd's event stream ({e})")),
                    None => {
                        return Ok("more image events than the recorder could queue; listing \
                                   again"
                            .to_string())
                    }
                },
                _ = images_dir_changed(&mut self.watch) => self.rescan().await?,
            }
        }
    }

    async fn event(
        &mut self,
        client: &Containerd,
        event: EnvelopedEvent,
    ) -> Result<(), RecordError> {
        if event.event.kind == EventKind::Create {
            // Before the create, so the replay's store gives the new record its real digest
            // (K3s's aliases are tied to their archive by it). A record already gone again
            // or a containerd going away gets none: the replay derives one.
            if let Ok(Some(ImageRecord {
                digest: Some(digest),
                ..
            })) = client.get(&event.event.name).await
            {
                self.out
                    .line(&json!({"digests": {event.event.name.as_str(): digest}}))?;
            }
        }
        self.out.line(&envelope_line(&event))
    }

    /// Connects again with capped, jittered backoff.
    async fn reconnect(&self) -> Containerd {
        let mut backoff = Backoff::default();
        loop {
            tokio::time::sleep(backoff.next_delay()).await;
            if let Ok(client) =
                Containerd::connect(&self.args.containerd_socket, &self.args.namespace).await
            {
                if client.version().await.is_ok() {
                    return client;
                }
            }
        }
    }

    /// Reads the images directory (off the async thread) and writes a `files` line if it
    /// changed. A directory that cannot be read is reported once and leaves the last one.
    async fn rescan(&mut self) -> Result<(), RecordError> {
        let Some(mut scanner) = self.scanner.take() else {
            return Ok(());
        };
        let joined = tokio::task::spawn_blocking(move || {
            let result = scanner.scan();
            (scanner, result)
        })
        .await;
        let Ok((scanner, result)) = joined else {
            // The scan panicked (a bug): keep recording events without the directory.
            eprintln!(
                "pinkeeper record: reading the images directory crashed; not reading it again"
            );
            return Ok(());
        };
        self.scanner = Some(scanner);
        match result {
            Ok(inventory) => {
                self.scan_error = None;
                let files = files_by_file(&self.args.images_dir, &inventory.provided());
                if self.last_files.as_ref() != Some(&files) {
                    self.out
                        .line(&json!({"files": files, "timestamp": now()}))?;
                    self.last_files = Some(files);
                }
            }
            Err(e) => {
                let e = e.to_string();
                if self.scan_error.as_ref() != Some(&e) {
                    eprintln!("pinkeeper record: {e}");
                    // The daemon then tells the engine nothing (no archive is called gone);
                    // a replay cannot say "unknown", so the reader of the file is told.
                    self.out
                        .comment(&format!("the images directory cannot be read: {e}"))?;
                    self.scan_error = Some(e);
                }
            }
        }
        Ok(())
    }
}

/// The images directory as a replay's `files` line holds it: file (relative to the directory)
/// -> the names it provides, each name under the file the inventory says provides it.
pub(crate) fn files_by_file(
    images_dir: &Path,
    provided: &BTreeMap<String, PathBuf>,
) -> BTreeMap<String, Vec<String>> {
    let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, path) in provided {
        let relative = path.strip_prefix(images_dir).unwrap_or(path);
        files
            .entry(relative.display().to_string())
            .or_default()
            .push(name.clone());
    }
    files
}

/// A listing taken at `at` as a replay's `images` line.
pub(crate) fn images_line(images: &[ImageRecord], at: SystemTime) -> Value {
    let records: serde_json::Map<String, Value> = images
        .iter()
        .map(|image| {
            let mut record = json!({ "labels": image.labels });
            if let Some(digest) = &image.digest {
                record["digest"] = json!(digest);
            }
            (image.name.clone(), record)
        })
        .collect();
    json!({"images": records, "timestamp": format_timestamp(at)})
}

/// An image event as containerd's envelope, in the shape of `shared/fixtures/containerd-events/`.
pub(crate) fn envelope_line(event: &EnvelopedEvent) -> Value {
    let mut payload = json!({ "name": event.event.name });
    if event.event.kind != EventKind::Delete {
        // Create and update carry the full label map; delete carries none (FACTS.md 3).
        payload["labels"] = json!(event.event.labels);
    }
    let mut line = json!({
        "namespace": event.namespace,
        "topic": event.topic,
        "type_url": event.type_url,
        "payload": payload,
    });
    if let Some(at) = event.timestamp {
        line["timestamp"] = json!(format_timestamp(at));
    }
    line
}

fn now() -> String {
    format_timestamp(SystemTime::now())
}

async fn sleep_for(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Config, ImageEvent, IntentState, Labels, Output, RestoreReason};
    use crate::replay::Replay;
    use std::time::UNIX_EPOCH;

    const APP: &str = "docker.io/library/app:1";
    const WEB: &str = "docker.io/library/web:1";
    const WEB_DIGEST: &str =
        "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// `record` honours the config file and `--program` as `run` does.
    #[test]
    fn the_recording_takes_the_nodes_settings() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            "program = \"rke2\"\ncontainerd_socket = \"/run/other.sock\"\n",
        )
        .unwrap();
        let args = RecordArgs {
            out: dir.path().join("out.jsonl"),
            node: NodeArgs {
                config: Some(config),
                namespace: Some("ns".into()),
                ..NodeArgs::default()
            },
            duration_secs: Some(1),
        };
        let rec = args.resolve().unwrap();
        assert_eq!(rec.containerd_socket, PathBuf::from("/run/other.sock"));
        assert_eq!(rec.namespace, "ns");
        assert_eq!(
            rec.images_dir,
            PathBuf::from(crate::config::Program::Rke2.default_images_dir())
        );
        let mut bad = args.clone();
        bad.node.program = Some("k9s".into());
        assert!(bad.resolve().is_err());
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pinned() -> Labels {
        labels(&[
            ("io.cattle.k3s.pinned", "pinned"),
            ("io.cri-containerd.pinned", "pinned"),
        ])
    }

    fn event(kind: EventKind, name: &str, labels: Labels, ms: u64) -> EnvelopedEvent {
        let (topic, type_url) = match kind {
            EventKind::Create => (
                "/images/create",
                "containerd.services.images.v1.ImageCreate",
            ),
            EventKind::Update => (
                "/images/update",
                "containerd.services.images.v1.ImageUpdate",
            ),
            EventKind::Delete => (
                "/images/delete",
                "containerd.services.images.v1.ImageDelete",
            ),
        };
        EnvelopedEvent {
            timestamp: Some(UNIX_EPOCH + Duration::from_millis(ms)),
            namespace: "k8s.io".into(),
            topic: topic.into(),
            type_url: type_url.into(),
            event: ImageEvent {
                kind,
                name: name.into(),
                labels,
            },
        }
    }

    #[test]
    fn an_envelope_line_has_the_fixture_shape() {
        let line = envelope_line(&event(EventKind::Delete, APP, Labels::new(), 1_500));
        assert_eq!(
            line,
            json!({
                "namespace": "k8s.io",
                "topic": "/images/delete",
                "type_url": "containerd.services.images.v1.ImageDelete",
                "payload": {"name": APP},
                "timestamp": "1970-01-01T00:00:01.500000000Z",
            })
        );
    }

    #[test]
    fn files_are_grouped_by_file_relative_to_the_directory() {
        let dir = Path::new("/var/lib/rancher/k3s/agent/images");
        let provided = [
            ("a:1", dir.join("both.tar")),
            ("b:1", dir.join("both.tar")),
            ("c:1", dir.join("sub/c.tar.zst")),
        ]
        .into_iter()
        .map(|(n, p)| (n.to_string(), p))
        .collect();
        let files = files_by_file(dir, &provided);
        assert_eq!(
            files,
            BTreeMap::from([
                (
                    "both.tar".to_string(),
                    vec!["a:1".to_string(), "b:1".to_string()]
                ),
                ("sub/c.tar.zst".to_string(), vec!["c:1".to_string()]),
            ])
        );
    }

    /// What the recorder writes for a first boot, an archive deleted and a K3s restart reads
    /// back in the replay: the created record gets its real digest, the restart is a
    /// disconnect and a listing, and the image of the gone archive is restored.
    #[test]
    fn a_recording_replays() {
        let mut text = String::from("// recorded by a test\n");
        let mut push = |value: Value| text.push_str(&format!("{value}\n"));
        let mut files = BTreeMap::from([
            ("app.tar".to_string(), vec![APP.to_string()]),
            ("web.tar".to_string(), vec![WEB.to_string()]),
        ]);
        push(json!({"files": files, "timestamp": "1970-01-01T00:00:01Z"}));
        push(images_line(&[], UNIX_EPOCH + Duration::from_secs(1)));
        push(json!({"connect": true, "timestamp": "1970-01-01T00:00:01Z"}));
        for (name, ms) in [(APP, 2_000), (WEB, 2_100)] {
            if name == WEB {
                push(json!({"digests": {WEB: WEB_DIGEST}}));
            }
            push(envelope_line(&event(
                EventKind::Create,
                name,
                Labels::new(),
                ms,
            )));
            push(envelope_line(&event(
                EventKind::Update,
                name,
                pinned(),
                ms + 1,
            )));
        }
        // K3s restarts with web.tar deleted.
        push(json!({"disconnect": true, "timestamp": "1970-01-01T00:00:10Z"}));
        files.remove("web.tar");
        push(json!({"files": files, "timestamp": "1970-01-01T00:00:11Z"}));
        let listed = [APP, WEB].map(|name| ImageRecord {
            name: name.to_string(),
            labels: pinned(),
            digest: Some(WEB_DIGEST.to_string()).filter(|_| name == WEB),
        });
        push(images_line(&listed, UNIX_EPOCH + Duration::from_secs(11)));
        push(json!({"connect": true, "timestamp": "1970-01-01T00:00:11Z"}));
        let swept = labels(&[("io.cri-containerd.image", "managed")]);
        push(envelope_line(&event(
            EventKind::Update,
            APP,
            swept.clone(),
            12_000,
        )));
        push(envelope_line(&event(EventKind::Update, WEB, swept, 12_001)));
        push(envelope_line(&event(
            EventKind::Update,
            APP,
            pinned(),
            12_100,
        )));
        push(json!({"timestamp": "1970-01-01T00:01:00Z"}));

        let mut replay = Replay::new(Config::default());
        if let Err(e) = replay.run(&text) {
            panic!("{e}\n{text}");
        }
        let pins: Vec<_> = replay
            .decisions
            .iter()
            .filter_map(|(_, o)| match o {
                Output::Pin { name, reason } => Some((name.as_str(), *reason)),
                _ => None,
            })
            .collect();
        assert_eq!(pins, [(WEB, RestoreReason::ArchiveGone)]);
        assert_eq!(
            replay.store.images()[WEB].digest.as_deref(),
            Some(WEB_DIGEST)
        );
        for name in [APP, WEB] {
            assert_eq!(replay.ledger()[name].state, IntentState::Held, "{name}");
        }
    }
}
