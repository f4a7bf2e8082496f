//! Private containerd daemons for tests.
//!
//! Each [`Containerd`] owns a short temp dir `/tmp/pkXXXXXX` (unix socket paths must stay under
//! 104 bytes including the `.ttrpc` socket, FACTS.md 3a) holding its config, `root`, `state`,
//! sockets and log. It never touches a host containerd. [`Containerd::restart`] kills the
//! process with SIGKILL (K3s starts containerd with a parent-death signal, so a K3s restart
//! kills it that way) and starts a new one on the same root, state and socket.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::client::Client;

/// Default cache of the unpacked containerd 1.7 and 2.x (`scripts/containerd-cache.sh`).
pub const DEFAULT_CACHE: &str = "/var/cache/pinkeeper/containerd";
/// Environment variable that overrides [`DEFAULT_CACHE`].
pub const CACHE_ENV: &str = "PINKEEPER_CONTAINERD_CACHE";
/// How long a daemon may take to answer `Version` after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Poll interval while waiting for the socket.
const POLL: Duration = Duration::from_millis(10);

/// The containerd versions the tests run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Version {
    /// Debian bookworm's 1.6.20 (`/usr/bin/containerd`).
    V1_6,
    /// Debian trixie's 1.7.x, unpacked into the cache.
    V1_7,
    /// Debian forky's 2.x, unpacked into the cache.
    V2,
}

impl Version {
    /// Every version, oldest first.
    pub fn all() -> [Version; 3] {
        [Version::V1_6, Version::V1_7, Version::V2]
    }

    /// Short name: `1.6`, `1.7`, `2.x`.
    pub fn name(self) -> &'static str {
        match self {
            Version::V1_6 => "1.6",
            Version::V1_7 => "1.7",
            Version::V2 => "2.x",
        }
    }

    /// Parses `1.6`, `1.7`, `2`, `2.x`.
    pub fn parse(s: &str) -> Result<Version> {
        match s {
            "1.6" => Ok(Version::V1_6),
            "1.7" => Ok(Version::V1_7),
            "2" | "2.x" => Ok(Version::V2),
            other => bail!("unknown containerd version {other:?} (expected 1.6, 1.7 or 2.x)"),
        }
    }

    /// Where the binary of this version is expected (not checked).
    pub fn binary_path(self) -> PathBuf {
        match self {
            Version::V1_6 => PathBuf::from("/usr/bin/containerd"),
            Version::V1_7 | Version::V2 => cache_dir().join(self.name()).join("usr/bin/containerd"),
        }
    }

    /// The binary of this version; an error that says how to install it if it is missing.
    pub fn binary(self) -> Result<PathBuf> {
        let path = self.binary_path();
        if !path.is_file() {
            bail!(
                "containerd {} is not installed: {} is missing. Run `make deps` \
                 (or `scripts/install-deps.sh` as root; set {CACHE_ENV} to use another cache)",
                self.name(),
                path.display()
            );
        }
        Ok(path)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "containerd {}", self.name())
    }
}

/// The cache dir of the unpacked 1.7 and 2.x binaries.
pub fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

/// A private containerd daemon. Killed (and its dir removed) on drop.
pub struct Containerd {
    /// Which containerd this is.
    version: Version,
    /// The binary started.
    binary: PathBuf,
    /// The short temp dir holding everything; removed on drop.
    dir: TempDir,
    /// The running process, if any.
    child: Option<Child>,
    /// gRPC socket.
    socket: PathBuf,
    /// Log file (appended to across restarts).
    log: PathBuf,
    /// How long the last start took until `Version` answered.
    last_start: Duration,
    /// The version string the daemon reported.
    reported_version: String,
}

impl fmt::Debug for Containerd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Containerd")
            .field("version", &self.version)
            .field("dir", &self.dir.path())
            .field("pid", &self.pid())
            .finish()
    }
}

impl Containerd {
    /// Creates the dir and config and starts the daemon, CRI enabled as under K3s; returns once
    /// `Version` answers.
    pub async fn start(version: Version) -> Result<Containerd> {
        Containerd::start_with(version, Options::default()).await
    }

    /// [`Containerd::start`] with [`Options`].
    pub async fn start_with(version: Version, options: Options) -> Result<Containerd> {
        let binary = version.binary()?;
        let dir = tempfile::Builder::new()
            .prefix("pk")
            .tempdir_in("/tmp")
            .context("creating a temp dir under /tmp")?;
        let base = dir.path().to_path_buf();
        let socket = base.join("c.sock");
        for sub in ["root", "state", "opt", "cni/bin", "cni/conf"] {
            fs::create_dir_all(base.join(sub))
                .with_context(|| format!("creating {}", base.join(sub).display()))?;
        }
        fs::write(base.join("config.toml"), config(&base, &socket, options))
            .with_context(|| format!("writing {}", base.join("config.toml").display()))?;
        let mut daemon = Containerd {
            version,
            binary,
            log: base.join("containerd.log"),
            dir,
            child: None,
            socket,
            last_start: Duration::ZERO,
            reported_version: String::new(),
        };
        daemon.spawn_and_wait().await?;
        Ok(daemon)
    }

    /// Kills the daemon with SIGKILL, waits for it, and starts it again on the same root,
    /// state and socket (what a `systemctl restart k3s` does to K3s's child containerd).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn_and_wait().await
    }

    /// Starts the daemon again after [`Containerd::stop`].
    pub async fn resume(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.version);
        }
        self.spawn_and_wait().await
    }

    /// Kills the daemon with SIGKILL and waits for it to exit. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // The process may have exited already; kill then fails with InvalidInput.
            let _ = child.kill();
            child
                .wait()
                .with_context(|| format!("waiting for {} to exit", self.version))?;
        }
        Ok(())
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit, then SIGKILLs.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .context("running kill -TERM")?;
        if status.success() {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if child
                    .try_wait()
                    .context("waiting for containerd")?
                    .is_some()
                {
                    self.child = None;
                    return Ok(());
                }
                tokio::time::sleep(POLL).await;
            }
        }
        self.stop()
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let base = self.dir.path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let started = Instant::now();
        // The same flags K3s passes (-c, -a, --state, --root).
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(base.join("config.toml"))
            .arg("-a")
            .arg(&self.socket)
            .arg("--state")
            .arg(base.join("state"))
            .arg("--root")
            .arg(base.join("root"))
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = started + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("polling containerd")? {
                    self.child = None;
                    bail!(
                        "{} exited during start-up ({status}); log:\n{}",
                        self.version,
                        self.log_since(log_offset)
                    );
                }
            }
            if self.socket.exists() {
                if let Ok(client) = Client::connect(&self.socket, crate::K8S_NAMESPACE).await {
                    if let Ok(version) = client.version().await {
                        self.reported_version = version;
                        self.last_start = started.elapsed();
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                self.stop()?;
                bail!(
                    "{} did not answer on {} within {START_TIMEOUT:?}; log:\n{}",
                    self.version,
                    self.socket.display(),
                    self.log_since(log_offset)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A client in `namespace`.
    pub async fn client(&self, namespace: &str) -> Result<Client> {
        Client::connect(&self.socket, namespace).await
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Which containerd this is.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The version string the daemon reported at its last start.
    pub fn reported_version(&self) -> &str {
        &self.reported_version
    }

    /// How long the last (re)start took until `Version` answered.
    pub fn last_start(&self) -> Duration {
        self.last_start
    }

    /// The temp dir (config, root, state, sockets, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last 8 KiB of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let len = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        self.log_since(len.saturating_sub(8192))
    }

    fn log_since(&self, offset: u64) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            if file.seek(SeekFrom::Start(offset)).is_ok() {
                let _ = file.take(64 * 1024).read_to_string(&mut text);
            }
        }
        text
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// How a containerd is configured ([`Containerd::start_with`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// CRI on (as under K3s, the default) or off: off, no CRI plugin labels or lists images,
    /// so a benchmark counts only containerd's image service.
    pub cri: Cri,
    /// `[grpc] max_send_message_size`: containerd's default is 16 MiB; smaller makes a listing
    /// too large for one answer with a few hundred records.
    pub max_send_message_size: Option<usize>,
}

/// Whether containerd runs its CRI plugins ([`Options::cri`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cri {
    /// As under K3s.
    #[default]
    On,
    /// Disabled: on 2.x CRI is several plugins, all listed; a version ignores the IDs it does
    /// not have.
    Off,
}

/// A version 2 config (accepted by 1.6, 1.7 and 2.x, FACTS.md 3a) with CRI enabled as under
/// K3s (or disabled), and everything that cannot work in a container or would touch host paths
/// disabled.
fn config(base: &Path, socket: &Path, options: Options) -> String {
    let b = base.display();
    let s = socket.display();
    let send_limit = options
        .max_send_message_size
        .map(|n| format!("\n  max_send_message_size = {n}"))
        .unwrap_or_default();
    let cri_plugins = match options.cri {
        Cri::On => "",
        Cri::Off => {
            r#"
  "io.containerd.grpc.v1.cri",
  "io.containerd.cri.v1.images",
  "io.containerd.cri.v1.runtime",
  "io.containerd.podsandbox.controller.v1.podsandbox",
  "io.containerd.sandbox.controller.v1.shim","#
        }
    };
    format!(
        r#"version = 2
root = "{b}/root"
state = "{b}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.nri.v1.nri",{cri_plugins}
]

[grpc]
  address = "{s}"{send_limit}

[ttrpc]
  address = "{s}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{b}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{b}/cni/bin"
    conf_dir = "{b}/cni/conf"
"#
    )
}
