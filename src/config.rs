//! Settings of `pinkeeper run`: defaults, the TOML config file, and flags (flags win).
//!
//! Owns validation: a bad value is rejected here with a message naming the flag or key and
//! what is expected, before anything else starts.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// K3s's containerd socket.
pub const DEFAULT_CONTAINERD_SOCKET: &str = "/run/k3s/containerd/containerd.sock";
/// CRI's namespace, where K3s imports.
pub const DEFAULT_NAMESPACE: &str = "k8s.io";
/// K3s's images directory (`<data-dir>/agent/images`).
pub const DEFAULT_IMAGES_DIR: &str = "/var/lib/rancher/k3s/agent/images";
/// Where the ledger lives.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pinkeeper";
/// The operator API's socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/pinkeeper/pinkeeper.sock";
/// Default quiet time before the check of K3s's re-pins, in ms.
pub const DEFAULT_SETTLE_MS: u64 = 3_000;
/// Longest accepted quiet time: kubelet's image GC starts after the start-up.
const MAX_SETTLE_MS: u64 = 120_000;
/// The longest path a unix socket address holds (`sun_path`, less the NUL).
const MAX_SOCKET_PATH: usize = 107;

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
}

/// Values given on the command line: the same keys as the file, each overriding it.
pub type Overrides = FileConfig;

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
}

/// A setting that cannot be used. Exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys / wrong types.
    #[error("config file {path}: {message}")]
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
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })
    }
}

impl Settings {
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
        let (containerd_socket, f1) = pick_path(
            flags.containerd_socket,
            file.containerd_socket,
            DEFAULT_CONTAINERD_SOCKET,
        );
        let (images_dir, f2) = pick_path(flags.images_dir, file.images_dir, DEFAULT_IMAGES_DIR);
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
        if !valid_namespace(&namespace) {
            return Err(ConfigError::Invalid {
                what: origin("namespace", "namespace", ns_from_flag),
                value: namespace,
                expected: "expected a containerd namespace: letters and digits, separated by single '.', '_' or '-', at most 76 characters (K3s uses k8s.io)".into(),
            });
        }
        Ok(Settings {
            containerd_socket,
            namespace,
            images_dir,
            state_dir,
            control_socket,
            settle_ms,
        })
    }
}

fn check_socket(path: &Path, what: &str) -> Result<(), ConfigError> {
    let bytes = path.as_os_str().len();
    if path.as_os_str().is_empty() || !path.is_absolute() || bytes > MAX_SOCKET_PATH {
        return Err(ConfigError::Invalid {
            what: what.to_string(),
            value: path.display().to_string(),
            expected: format!(
                "expected an absolute path to a unix socket, at most {MAX_SOCKET_PATH} bytes"
            ),
        });
    }
    Ok(())
}

fn check_dir(path: &Path, what: &str) -> Result<(), ConfigError> {
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
    Ok(())
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
mod tests {
    use super::*;

    #[test]
    fn defaults_when_nothing_given() {
        let s = Settings::resolve(None, Overrides::default()).unwrap();
        assert_eq!(
            s.containerd_socket,
            PathBuf::from(DEFAULT_CONTAINERD_SOCKET)
        );
        assert_eq!(s.namespace, "k8s.io");
        assert_eq!(s.images_dir, PathBuf::from(DEFAULT_IMAGES_DIR));
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: FileConfig =
            toml::from_str("namespace = \"other\"\nstate_dir = \"/srv/pk\"").unwrap();
        let flags = Overrides {
            namespace: Some("k8s.io".into()),
            ..Overrides::default()
        };
        let s = Settings::resolve(Some((Path::new("/etc/pinkeeper/config.toml"), file)), flags)
            .unwrap();
        assert_eq!(s.namespace, "k8s.io");
        assert_eq!(s.state_dir, PathBuf::from("/srv/pk"));
    }

    #[test]
    fn bad_values_name_their_source() {
        let file: FileConfig = toml::from_str("namespace = \"bad..ns\"").unwrap();
        let err = Settings::resolve(Some((Path::new("/etc/p.toml"), file)), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("namespace in /etc/p.toml"), "{err}");
        let flags = Overrides {
            containerd_socket: Some("relative.sock".into()),
            ..Overrides::default()
        };
        let err = Settings::resolve(None, flags).unwrap_err().to_string();
        assert!(err.starts_with("--containerd-socket"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "containerd_sockett = \"/x\"\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("containerd_sockett") && err.contains("c.toml"),
            "{err}"
        );
    }
}
