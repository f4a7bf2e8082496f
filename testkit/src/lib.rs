//! Test support for pinkeeper.
//!
//! - [`daemon`]: private containerd daemons (1.6, 1.7, 2.x) with their own root, state and
//!   socket under a short temp dir, restartable like K3s restarts its child containerd.
//! - [`client`]: a thin containerd gRPC client (images, content, leases) for tests and the
//!   emulator, plus the operator's `ctr images label NAME io.cri-containerd.pinned=`.
//! - [`archive`]: image archives built offline (OCI layout and docker-save, every compression
//!   K3s reads), deterministic per image name.
//! - [`k3s`]: an emulator that makes exactly K3s's calls to containerd at start-up: the lease
//!   clean-up, the sweep (`clearLabels`) and the import of the images dir (FACTS.md section 2).
//! - [`reference`]: docker reference normalisation as containerd and K3s do it.
//!
//! Nothing here touches a host containerd: every daemon is private to a test. A missing
//! containerd binary is an error that says to run `make deps` / `scripts/install-deps.sh`;
//! tests must fail loudly rather than skip.

pub mod archive;
pub mod client;
pub mod daemon;
pub mod k3s;
pub mod reference;
pub mod registry;

pub use archive::{Compression, Layout, OciNames, TestImage};
pub use client::{Client, ImageInfo};
pub use daemon::{Containerd, Cri, Options, Version};
pub use k3s::{ImportReport, K3s, K3sConfig, StartReport};
pub use registry::Registry;

/// K3s's own pin label (`io.cattle.<program>.pinned`, FACTS.md 1).
pub const K3S_PIN_LABEL: &str = "io.cattle.k3s.pinned";
/// RKE2's variant of [`K3S_PIN_LABEL`].
pub const RKE2_PIN_LABEL: &str = "io.cattle.rke2.pinned";
/// containerd CRI's pin label (note the hyphen, FACTS.md 1).
pub const CRI_PIN_LABEL: &str = "io.cri-containerd.pinned";
/// The value both pin labels carry.
pub const PINNED: &str = "pinned";
/// The namespace K3s and CRI use.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// The label CRI adds to every image record it manages (FACTS.md 3).
pub const CRI_MANAGED_LABEL: &str = "io.cri-containerd.image";
