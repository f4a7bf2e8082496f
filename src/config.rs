//! Settings of `pinkeeper run` (and `pinkeeper doctor`): defaults, the TOML config file, and
//! flags (flags win).
//!
//! Owns validation: a bad value is rejected here with a message naming the flag or key and
//! what is expected, before anything else starts. Owns which config file is read: `--config
//! PATH` (which must exist), else [`DEFAULT_CONFIG`] when it exists, else none.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The config file read when `--config` is not given, if it exists.
pub(crate) const DEFAULT_CONFIG: &str = "/etc/pinkeeper/config.toml";
/// K3s's containerd socket, which is RKE2's too (FACTS.md section 1; rancher/rke2
/// `pkg/executor/staticpod/spw.go` `ContainerdSock`).
pub(crate) const DEFAULT_CONTAINERD_SOCKET: &str = "/run/k3s/containerd/containerd.sock";
/// CRI's namespace, where K3s imports.
pub(crate) const DEFAULT_NAMESPACE: &str = "k8s.io";
/// K3s's images directory (`<data-dir>/agent/images`).
pub(crate) const DEFAULT_IMAGES_DIR: &str = "/var/lib/rancher/k3s/agent/images";
/// RKE2's images directory (`<data-dir>/agent/images`, data dir `/var/lib/rancher/rke2`).
pub(crate) const RKE2_IMAGES_DIR: &str = "/var/lib/rancher/rke2/agent/images";
/// RKE2's pin label (`io.cattle.<program>.pinned`, FACTS.md section 1).
pub(crate) const RKE2_PIN: &str = "io.cattle.rke2.pinned";
/// Where the ledger lives.
pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/pinkeeper";
/// The operator API's socket.
pub(crate) const DEFAULT_CONTROL_SOCKET: &str = "/run/pinkeeper/pinkeeper.sock";
/// Default quiet time before the check of K3s's re-pins, in ms.
pub(crate) const DEFAULT_SETTLE_MS: u64 = 3_000;
/// Longest accepted quiet time: kubelet's image GC starts after the start-up.
const MAX_SETTLE_MS: u64 = 120_000;
/// The longest path a unix socket address holds (`sun_path`, less the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The largest config file read: it has ten short keys; anything bigger is not one.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// Values of the settings, each optional: the config file's keys (unknown keys are an error)
/// and, as [`Overrides`], the flags of `pinkeeper run` (`--containerd-socket` for
/// `containerd_socket`, ...), which win over the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// containerd's gRPC socket.
    pub containerd_socket: Option<PathBuf>,
    /// containerd namespace K3s imports into.
    pub namespace: Option<String>,
    /// K3s's images directory.
    pub images_dir: Option<PathBuf>,
    /// Directory of the ledger.
    pub state_dir: Option<PathBuf>,
    /// The control API socket.
    pub control_socket: Option<PathBuf>,
    /// Quiet time (ms) of a K3s start-up before pinkeeper checks K3s's re-pins.
    pub settle_ms: Option<u64>,
    /// `k3s` or `rke2`: the label pinkeeper follows and the default images directory.
    pub program: Option<String>,
    /// `text` or `json`: the form of the log lines on stderr.
    pub log_format: Option<String>,
    /// A node-exporter textfile-collector file (`*.prom`) to write metrics to.
    pub metrics_textfile: Option<PathBuf>,
    /// `IP:PORT` (loopback only) to serve metrics on.
    pub metrics_address: Option<String>,
    /// Images kept by policy: glob patterns (`*`, `?`) over the full image name.
    pub keep: Option<Vec<String>>,
}

/// Values given on the command line: the same keys as the file, each overriding it.
pub(crate) type Overrides = FileConfig;

/// The settings `pinkeeper run` uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// containerd's gRPC socket.
    pub containerd_socket: PathBuf,
    /// containerd namespace.
    pub namespace: String,
    /// K3s's images directory.
    pub images_dir: PathBuf,
    /// The ledger's directory.
    pub state_dir: PathBuf,
    /// The control API socket.
    pub control_socket: PathBuf,
    /// Quiet time (ms) after the last image event of a K3s start-up before pinkeeper checks
    /// that K3s re-pinned every image whose archive is still there.
    pub settle_ms: u64,
    /// K3s or RKE2: whose pin label and sweep pinkeeper follows.
    pub program: Program,
    /// The form of the log lines.
    pub log_format: LogFormat,
    /// A node-exporter textfile-collector file to write metrics to; off when `None`.
    pub metrics_textfile: Option<PathBuf>,
    /// A loopback address to serve metrics on; off when `None`.
    pub metrics_address: Option<SocketAddr>,
    /// Images kept by policy (contract rule 9): patterns checked by
    /// [`crate::engine::check_pattern`]. Read again on SIGHUP.
    pub keep: Vec<String>,
}

/// The Kubernetes distribution whose containerd pinkeeper watches. They differ, for pinkeeper,
/// in the pin label they sweep (`io.cattle.<program>.pinned`) and their data directory; the
/// containerd socket is the same (FACTS.md section 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Program {
    /// K3s (`/var/lib/rancher/k3s`).
    #[default]
    K3s,
    /// RKE2 (`/var/lib/rancher/rke2`).
    Rke2,
}

impl Program {
    /// Every program, in the order the help lists them.
    pub const ALL: [Program; 2] = [Program::K3s, Program::Rke2];

    /// The value of `--program` and of `program` in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Program::K3s => "k3s",
            Program::Rke2 => "rke2",
        }
    }

    /// Parses `k3s` or `rke2`.
    pub fn parse(value: &str) -> Option<Program> {
        Program::ALL.into_iter().find(|p| p.as_str() == value)
    }

    /// How people write its name.
    pub fn display_name(self) -> &'static str {
        match self {
            Program::K3s => "K3s",
            Program::Rke2 => "RKE2",
        }
    }

    /// The label it pins with and sweeps away at start: `io.cattle.<program>.pinned`.
    pub fn label(self) -> &'static str {
        match self {
            Program::K3s => crate::engine::K3S_PIN,
            Program::Rke2 => RKE2_PIN,
        }
    }

    /// Its images directory by default (`<data-dir>/agent/images`).
    pub fn default_images_dir(self) -> &'static str {
        match self {
            Program::K3s => DEFAULT_IMAGES_DIR,
            Program::Rke2 => RKE2_IMAGES_DIR,
        }
    }

    /// Its containerd socket by default: the same for both.
    pub fn default_containerd_socket(self) -> &'static str {
        DEFAULT_CONTAINERD_SOCKET
    }
}

/// The form of the log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LogFormat {
    /// One line of text per event; ANSI colours only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Parses `text` or `json`.
    pub fn parse(value: &str) -> Option<LogFormat> {
        match value {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// A setting that cannot be used. Exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read the config file {}: {source}", crate::escape::path(path))]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not a regular file (a FIFO, a directory, a device) or is too big.
    #[error(
        "the config file {} {what}; pass a regular TOML file with --config",
        crate::escape::path(path)
    )]
    NotAFile {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        what: String,
    },
    /// The config file is not valid TOML or has unknown keys / wrong types.
    #[error("config file {}: {message}", crate::escape::path(path))]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A value is not acceptable.
    #[error("{what} {value:?}: {expected}")]
    Invalid {
        /// `--flag` (or `key` in FILE).
        what: String,
        /// The value given.
        value: String,
        /// What is expected.
        expected: String,
    },
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = read_regular(path)?;
        FileConfig::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })
    }

    /// The config file to use: `explicit` (`--config PATH`), which must exist, else
    /// [`DEFAULT_CONFIG`] if it exists (a systemd unit runs `pinkeeper run` with no flags and
    /// picks it up; without it the defaults apply), else none.
    pub fn find(explicit: Option<&Path>) -> Result<Option<(PathBuf, FileConfig)>, ConfigError> {
        FileConfig::find_with_default(explicit, Path::new(DEFAULT_CONFIG))
    }

    /// [`FileConfig::find`] with another default path (for tests).
    pub fn find_with_default(
        explicit: Option<&Path>,
        default: &Path,
    ) -> Result<Option<(PathBuf, FileConfig)>, ConfigError> {
        if let Some(path) = explicit {
            return FileConfig::load(path).map(|file| Some((path.to_path_buf(), file)));
        }
        match read_regular(default) {
            Ok(text) => FileConfig::parse(default, &text).map(|file| Some((default.into(), file))),
            Err(ConfigError::Read { source, .. }) if source.kind() == ErrorKind::NotFound => {
                Ok(None)
            }
            // There but unreadable (a directory, a FIFO, no permission): say so rather than run
            // with settings the operator did not mean.
            Err(e) => Err(e),
        }
    }
}

impl Settings {
    /// [`Settings::resolve`] with the file [`FileConfig::find`] found, if any.
    pub fn resolve_found(
        found: Option<(PathBuf, FileConfig)>,
        flags: Overrides,
    ) -> Result<Settings, ConfigError> {
        match found {
            Some((path, file)) => Settings::resolve(Some((&path, file)), flags),
            None => Settings::resolve(None, flags),
        }
    }

    /// Merges defaults, the config file (if any) and the flags, and validates the result.
    pub fn resolve(
        file: Option<(&Path, FileConfig)>,
        flags: Overrides,
    ) -> Result<Settings, ConfigError> {
        let (file_path, file) = match file {
            Some((p, f)) => (Some(p), f),
            None => (None, FileConfig::default()),
        };
        // Names the source of a value in messages: the flag, or the key in its file.
        let origin = |flag: &str, key: &str, from_flag: bool| match (from_flag, file_path) {
            (false, Some(p)) => format!("{key} in {}", p.display()),
            _ => format!("--{flag}"),
        };
        let pick_path = |flag: Option<PathBuf>, key: Option<PathBuf>, default: &str| {
            let from_flag = flag.is_some();
            (
                flag.or(key).unwrap_or_else(|| PathBuf::from(default)),
                from_flag,
            )
        };
        // The program first: it gives the defaults of the paths below.
        let program_from_flag = flags.program.is_some();
        let program = match flags.program.or(file.program) {
            None => Program::default(),
            Some(value) => Program::parse(&value).ok_or_else(|| ConfigError::Invalid {
                what: origin("program", "program", program_from_flag),
                value,
                expected: "expected k3s or rke2".into(),
            })?,
        };
        let (containerd_socket, f1) = pick_path(
            flags.containerd_socket,
            file.containerd_socket,
            program.default_containerd_socket(),
        );
        let (images_dir, f2) = pick_path(
            flags.images_dir,
            file.images_dir,
            program.default_images_dir(),
        );
        let (state_dir, f3) = pick_path(flags.state_dir, file.state_dir, DEFAULT_STATE_DIR);
        let (control_socket, f4) = pick_path(
            flags.control_socket,
            file.control_socket,
            DEFAULT_CONTROL_SOCKET,
        );
        let ns_from_flag = flags.namespace.is_some();
        let namespace = flags
            .namespace
            .or(file.namespace)
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());

        let settle_from_flag = flags.settle_ms.is_some();
        let settle_ms = flags
            .settle_ms
            .or(file.settle_ms)
            .unwrap_or(DEFAULT_SETTLE_MS);
        if !(100..=MAX_SETTLE_MS).contains(&settle_ms) {
            return Err(ConfigError::Invalid {
                what: origin("settle-ms", "settle_ms", settle_from_flag),
                value: settle_ms.to_string(),
                expected: format!("expected milliseconds between 100 and {MAX_SETTLE_MS}"),
            });
        }
        check_socket(
            &containerd_socket,
            &origin("containerd-socket", "containerd_socket", f1),
        )?;
        check_socket(
            &control_socket,
            &origin("control-socket", "control_socket", f4),
        )?;
        check_dir(&images_dir, &origin("images-dir", "images_dir", f2))?;
        check_dir(&state_dir, &origin("state-dir", "state_dir", f3))?;
        if normal(&state_dir).starts_with(normal(&images_dir)) {
            return Err(ConfigError::Invalid {
                what: origin("state-dir", "state_dir", f3),
                value: state_dir.display().to_string(),
                expected: format!(
                    "is inside the images directory {}, which holds K3s's archives; put the \
                     ledger elsewhere (default {DEFAULT_STATE_DIR})",
                    images_dir.display()
                ),
            });
        }
        if !valid_namespace(&namespace) {
            return Err(ConfigError::Invalid {
                what: origin("namespace", "namespace", ns_from_flag),
                value: namespace,
                expected: "expected a containerd namespace: letters and digits, separated by single '.', '_' or '-', at most 76 characters (K3s uses k8s.io)".into(),
            });
        }
        let log_from_flag = flags.log_format.is_some();
        let log_format = match flags.log_format.or(file.log_format) {
            None => LogFormat::default(),
            Some(value) => LogFormat::parse(&value).ok_or_else(|| ConfigError::Invalid {
                what: origin("log-format", "log_format", log_from_flag),
                value,
                expected: "expected text or json".into(),
            })?,
        };
        let textfile_from_flag = flags.metrics_textfile.is_some();
        let metrics_textfile = flags.metrics_textfile.or(file.metrics_textfile);
        if let Some(path) = &metrics_textfile {
            check_textfile(
                path,
                &origin("metrics-textfile", "metrics_textfile", textfile_from_flag),
            )?;
        }
        let address_from_flag = flags.metrics_address.is_some();
        let metrics_address = match flags.metrics_address.or(file.metrics_address) {
            None => None,
            Some(value) => Some(parse_metrics_address(
                value,
                &origin("metrics-address", "metrics_address", address_from_flag),
            )?),
        };
        let keep_from_flag = flags.keep.is_some();
        let keep = flags.keep.or(file.keep).unwrap_or_default();
        for pattern in &keep {
            if let Err(why) = crate::engine::check_pattern(pattern) {
                return Err(ConfigError::Invalid {
                    what: origin("keep", "keep", keep_from_flag),
                    value: pattern.clone(),
                    expected: why,
                });
            }
        }
        Ok(Settings {
            keep,
            containerd_socket,
            namespace,
            images_dir,
            state_dir,
            control_socket,
            settle_ms,
            program,
            log_format,
            metrics_textfile,
            metrics_address,
        })
    }
}

/// Reads a config file that must be a regular file, without ever blocking: opened with
/// `O_NONBLOCK` (a FIFO's open does not wait for a writer), its type checked on the open file
/// (`fstat`, so nothing can be swapped in between), and at most [`MAX_CONFIG_BYTES`] read.
pub(crate) fn read_regular(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let read_error = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let not_a_file = |what: &str| ConfigError::NotAFile {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // A directory opened for reading fails only at read time on some systems; this
            // one says so at once on others.
            Some(libc::EISDIR) => not_a_file("is a directory"),
            Some(libc::ENXIO) => not_a_file("is a socket or a device without a reader"),
            _ => read_error(e),
        })?;
    let meta = file.metadata().map_err(read_error)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "is a directory"
        } else if kind.is_fifo() {
            "is a FIFO (named pipe)"
        } else if kind.is_char_device() || kind.is_block_device() {
            "is a device"
        } else if kind.is_socket() {
            "is a socket"
        } else {
            "is not a regular file"
        };
        return Err(not_a_file(what));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(not_a_file(&format!(
            "is {} bytes, more than a config file's {MAX_CONFIG_BYTES}",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    // Bounded even if the file grows while it is read.
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(not_a_file(&format!(
            "is more than a config file's {MAX_CONFIG_BYTES} bytes"
        )));
    }
    String::from_utf8(bytes).map_err(|_| ConfigError::Parse {
        path: path.to_path_buf(),
        message: "is not UTF-8 text (TOML files are UTF-8)".into(),
    })
}

/// A NUL byte ends a path at the system call: no file can have one in its name, and a path
/// cut short there would be some other file.
fn check_no_nul(path: &Path, what: &str) -> Result<(), ConfigError> {
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(ConfigError::Invalid {
            what: what.to_string(),
            value: path.display().to_string(),
            expected: "contains a NUL byte (\\u0000 in TOML), which no path can hold; remove it"
                .into(),
        });
    }
    Ok(())
}

fn check_socket(path: &Path, what: &str) -> Result<(), ConfigError> {
    check_no_nul(path, what)?;
    let bytes = path.as_os_str().len();
    if path.as_os_str().is_empty()
        || !path.is_absolute()
        || bytes > MAX_SOCKET_PATH
        || path.file_name().is_none()
        || path.as_os_str().as_encoded_bytes().ends_with(b"/")
    {
        return Err(ConfigError::Invalid {
            what: what.to_string(),
            value: path.display().to_string(),
            expected: format!(
                "expected an absolute path to a unix socket, at most {MAX_SOCKET_PATH} bytes"
            ),
        });
    }
    // What is at the path now is not checked: it is the node's state, not the configuration.
    // Exit 2 is never restarted, while a control socket that cannot be served only costs the
    // operator's API (the daemon keeps protecting and says so) and a containerd socket that is
    // not there yet is waited for.
    Ok(())
}

/// The nearest existing ancestor of `path` must be a directory: otherwise creating the path
/// (or anything under it) fails later, once the daemon has started.
fn check_ancestors(path: &Path, what: &str) -> Result<(), ConfigError> {
    for dir in path.ancestors().skip(1) {
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(ConfigError::Invalid {
                    what: what.to_string(),
                    value: path.display().to_string(),
                    expected: format!(
                        "{} exists and is not a directory; expected a path under a directory",
                        dir.display()
                    ),
                })
            }
            Err(_) => continue,
        }
    }
    Ok(())
}

fn check_dir(path: &Path, what: &str) -> Result<(), ConfigError> {
    check_no_nul(path, what)?;
    if path.as_os_str().is_empty() || !path.is_absolute() {
        return Err(ConfigError::Invalid {
            what: what.to_string(),
            value: path.display().to_string(),
            expected: "expected an absolute directory path".into(),
        });
    }
    if path.exists() && !path.is_dir() {
        return Err(ConfigError::Invalid {
            what: what.to_string(),
            value: path.display().to_string(),
            expected: "exists but is not a directory".into(),
        });
    }
    check_ancestors(path, what)
}

/// A node-exporter textfile collector reads `*.prom` files of one directory, given as an
/// absolute path; the file is written next to its final name and renamed, so it must not be a
/// directory.
fn check_textfile(path: &Path, what: &str) -> Result<(), ConfigError> {
    let invalid = |expected: &str| ConfigError::Invalid {
        what: what.to_string(),
        value: path.display().to_string(),
        expected: expected.to_string(),
    };
    check_no_nul(path, what)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !path.is_absolute() || name.len() <= ".prom".len() || !name.ends_with(".prom") {
        return Err(invalid(
            "expected an absolute path of a file whose name ends in .prom, in the directory of \
             node-exporter's textfile collector (--collector.textfile.directory), e.g. \
             /var/lib/node_exporter/textfile_collector/pinkeeper.prom",
        ));
    }
    if path.is_dir() {
        return Err(invalid(
            "is a directory; expected the path of a file ending in .prom",
        ));
    }
    if let Some(dir) = path.parent() {
        if dir.exists() && !dir.is_dir() {
            return Err(invalid(
                "its directory exists but is not a directory; expected a file in the \
                 textfile collector's directory",
            ));
        }
    }
    Ok(())
}

/// Only loopback: the metrics are for a scraper on the node itself (or a proxy beside it); a
/// port of a root daemon open to the network is not pinkeeper's job.
fn parse_metrics_address(value: String, what: &str) -> Result<SocketAddr, ConfigError> {
    let invalid = |value: String, expected: &str| ConfigError::Invalid {
        what: what.to_string(),
        value,
        expected: expected.to_string(),
    };
    let Ok(address) = value.parse::<SocketAddr>() else {
        return Err(invalid(
            value,
            "expected IP:PORT with a loopback IP, e.g. 127.0.0.1:9977 or [::1]:9977 (no host \
             names)",
        ));
    };
    if !address.ip().is_loopback() {
        return Err(invalid(
            value,
            "only a loopback address is accepted (127.0.0.0/8 or [::1]): serve the metrics to \
             a scraper on the node, or use --metrics-textfile with node-exporter",
        ));
    }
    if address.port() == 0 {
        return Err(invalid(
            value,
            "expected a fixed port (1 to 65535), not 0: a scraper has to know where to look",
        ));
    }
    Ok(address)
}

/// `path` with its `.` components and trailing slashes gone (no file system access).
fn normal(path: &Path) -> PathBuf {
    path.components().collect()
}

/// containerd's namespace rule (`identifiers.Validate`): alphanumerics separated by single
/// `.`, `_` or `-`, starting and ending with an alphanumeric, at most 76 characters.
fn valid_namespace(ns: &str) -> bool {
    if ns.is_empty() || ns.len() > 76 {
        return false;
    }
    let bytes = ns.as_bytes();
    let sep = |b: u8| matches!(b, b'.' | b'_' | b'-');
    bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || sep(*b))
        && !bytes.windows(2).any(|w| sep(w[0]) && sep(w[1]))
}

#[cfg(test)]
mod tests;
