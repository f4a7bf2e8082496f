//! `k3s-emu`: the testkit's K3s emulator and helpers, for demos and scripts.
//!
//! ```text
//! k3s-emu --socket S --images-dir D [--namespace k8s.io] [--cache-json] start
//! k3s-emu --socket S sweep | labels | unpin NAME
//! k3s-emu --socket S --images-dir D import FILE
//! k3s-emu archive OUT.tar.zst [--layout oci|docker] NAME...
//! k3s-emu containerd 1.7          # run a private containerd until SIGINT/SIGTERM; prints its socket
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use pinkeeper_testkit::archive::{write_archive, Layout, TestImage};
use pinkeeper_testkit::{Client, Containerd, K3s, K3sConfig, Version};

#[derive(Parser)]
#[command(about = "Makes K3s's start-up calls to a containerd (pinkeeper testkit)")]
struct Cli {
    /// containerd's gRPC socket.
    #[arg(
        long,
        global = true,
        default_value = "/run/k3s/containerd/containerd.sock"
    )]
    socket: PathBuf,
    /// The images dir (`<data-dir>/agent/images`).
    #[arg(long, global = true)]
    images_dir: Option<PathBuf>,
    /// containerd namespace.
    #[arg(long, global = true, default_value = "k8s.io")]
    namespace: String,
    /// `k3s` or `rke2` (pin label `io.cattle.<program>.pinned`).
    #[arg(long, global = true, default_value = "k3s")]
    program: String,
    /// Emulate an operator-created `.cache.json` (with bug k3s-io/k3s#14265).
    #[arg(long, global = true)]
    cache_json: bool,
    /// `--airgap-extra-registry`: also retag into this registry (repeatable).
    #[arg(long = "extra-registry", global = true)]
    extra_registries: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// What K3s does at every start: lease clean-up, sweep, import of the images dir.
    Start,
    /// Only the sweep (`clearLabels`).
    Sweep,
    /// Import one archive (`preloadFile`).
    Import {
        /// The archive.
        file: PathBuf,
    },
    /// Print every image as JSON: name -> {digest, labels}.
    Labels,
    /// `ctr -n k8s.io images label NAME io.cri-containerd.pinned=` (an operator's unpin).
    Unpin {
        /// Image name.
        name: String,
    },
    /// Build a test archive (compression from the suffix).
    Archive {
        /// Output file (.tar .tar.gz .tgz .tar.bz2 .tbz .tar.zst .tzst .tar.lz4).
        out: PathBuf,
        /// Layout.
        #[arg(long, value_enum, default_value = "oci")]
        layout: LayoutArg,
        /// Bytes per layer.
        #[arg(long, default_value_t = 64)]
        layer_size: usize,
        /// Image names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Run a private containerd (1.6, 1.7, 2.x) until killed; prints its socket.
    Containerd {
        /// Version.
        version: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LayoutArg {
    Oci,
    Docker,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let config = || -> Result<K3sConfig> {
        let images_dir = cli
            .images_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/rancher/k3s/agent/images"));
        let mut config = K3sConfig::new(&cli.socket, images_dir);
        config.namespace = cli.namespace.clone();
        config.program = cli.program.clone();
        config.cache_json = cli.cache_json;
        config.extra_registries = cli.extra_registries.clone();
        Ok(config)
    };
    match &cli.command {
        Command::Start => {
            let report = K3s::new(config()?).start().await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Sweep => {
            let swept = K3s::new(config()?).sweep().await?;
            println!("{}", serde_json::to_string_pretty(&swept)?);
        }
        Command::Import { file } => {
            let report = K3s::new(config()?).import_file(file).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Labels => {
            let client = Client::connect(&cli.socket, &cli.namespace).await?;
            let images = client.images_by_name().await?;
            println!("{}", serde_json::to_string_pretty(&images)?);
        }
        Command::Unpin { name } => {
            let client = Client::connect(&cli.socket, &cli.namespace).await?;
            let info = client.ctr_remove_cri_pin(name).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        Command::Archive {
            out,
            layout,
            layer_size,
            names,
        } => {
            let layout = match layout {
                LayoutArg::Oci => Layout::oci(),
                LayoutArg::Docker => Layout::DockerSave,
            };
            let images: Vec<TestImage> = names
                .iter()
                .map(|n| TestImage::new(n.clone()).layer_size(*layer_size))
                .collect();
            let names = write_archive(out, layout, &images)?;
            println!("{}", serde_json::to_string_pretty(&names)?);
        }
        Command::Containerd { version } => {
            let containerd = Containerd::start(Version::parse(version)?).await?;
            println!("{}", containerd.socket().display());
            eprintln!(
                "{} ({}) in {}; log {}; SIGINT/SIGTERM to stop",
                containerd.version(),
                containerd.reported_version(),
                containerd.dir().display(),
                containerd.log_path().display()
            );
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
            let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            // Dropping kills the daemon and removes its dir.
            drop(containerd);
        }
    }
    Ok(())
}
