//! The node's settings on the command line: one set of flags for every command that looks at
//! the node (`run`, `doctor`, `record`, `inventory`), resolved as `pinkeeper run` resolves
//! them (defaults, then the config file, then the flags) by [`crate::config::Settings`].
//!
//! It owns the flags and their help text only; what the values mean and how they are checked
//! is `src/config.rs`'s.

use std::path::PathBuf;

use crate::config::{ConfigError, FileConfig, Overrides, Settings};

/// Where containerd, K3s's images and the ledger are, and whose pins to follow.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct NodeArgs {
    /// TOML config file of `pinkeeper run`; flags override its values. Must exist when given
    /// [default: /etc/pinkeeper/config.toml, read only if it exists]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// K3s or RKE2: the pin label pinkeeper follows (io.cattle.<program>.pinned) and the
    /// default images directory [default: k3s]
    #[arg(long, value_name = "PROGRAM", value_parser = ["k3s", "rke2"])]
    pub program: Option<String>,
    /// containerd's gRPC socket [default: /run/k3s/containerd/containerd.sock]
    #[arg(long, value_name = "PATH")]
    pub containerd_socket: Option<PathBuf>,
    /// containerd namespace K3s imports into [default: k8s.io]
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// K3s's images directory [default: /var/lib/rancher/k3s/agent/images; with --program
    /// rke2: /var/lib/rancher/rke2/agent/images]
    #[arg(long, value_name = "PATH")]
    pub images_dir: Option<PathBuf>,
    /// Directory of the ledger [default: /var/lib/pinkeeper]
    #[arg(long, value_name = "PATH")]
    pub state_dir: Option<PathBuf>,
}

impl NodeArgs {
    /// The settings: defaults, the config file (`--config`, or the default file if it
    /// exists), these flags, and `more` (a command's own flags, such as `run`'s), which win
    /// over the file too.
    pub(crate) fn resolve(&self, more: Overrides) -> Result<Settings, ConfigError> {
        let file = FileConfig::find(self.config.as_deref())?;
        let flags = Overrides {
            containerd_socket: self.containerd_socket.clone(),
            namespace: self.namespace.clone(),
            images_dir: self.images_dir.clone(),
            state_dir: self.state_dir.clone(),
            program: self.program.clone(),
            ..more
        };
        Settings::resolve_found(file, flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Program, DEFAULT_IMAGES_DIR};

    #[test]
    fn flags_win_over_the_file_and_the_program_gives_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.toml");
        std::fs::write(&config, "state_dir = \"/srv/pk\"\nnamespace = \"other\"\n").unwrap();
        let args = NodeArgs {
            config: Some(config.clone()),
            namespace: Some("k8s.io".into()),
            ..NodeArgs::default()
        };
        let s = args.resolve(Overrides::default()).unwrap();
        assert_eq!(s.state_dir, PathBuf::from("/srv/pk"));
        assert_eq!(s.namespace, "k8s.io");
        assert_eq!(s.images_dir, PathBuf::from(DEFAULT_IMAGES_DIR));
        std::fs::write(&config, "program = \"rke2\"\n").unwrap();
        let s = args.resolve(Overrides::default()).unwrap();
        assert_eq!(s.program, Program::Rke2);
        assert_eq!(
            s.images_dir,
            PathBuf::from(Program::Rke2.default_images_dir())
        );
        let missing = NodeArgs {
            config: Some(dir.path().join("missing.toml")),
            ..NodeArgs::default()
        };
        assert!(missing.resolve(Overrides::default()).is_err());
    }
}
