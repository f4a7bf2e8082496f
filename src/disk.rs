//! What kubelet's image GC can still do around the pins (issue 13): the bytes pinned images
//! hold, the image filesystem, kubelet's GC thresholds and where K3s sets them. Pure: the
//! daemon and `pinkeeper doctor` read containerd, the filesystem and the files, and hand the
//! text and the figures over.
//!
//! Kubelet's image GC runs when the image filesystem's use is above `image-gc-high-threshold`
//! (85% by default) and deletes unused, unpinned images until it is under
//! `image-gc-low-threshold` (80%). What it can never free is what the pins hold: if, with every
//! unpinned image gone, the filesystem would still be above the low threshold, GC cannot get
//! there, and kubelet evicts pods instead.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Kubelet's defaults (`--image-gc-high-threshold`, `--image-gc-low-threshold`).
pub const DEFAULT_HIGH: u8 = 85;
/// See [`DEFAULT_HIGH`].
pub const DEFAULT_LOW: u8 = 80;

/// The label prefix containerd's GC follows from a blob to the blobs it refers to (an index to
/// its manifests, a manifest to its config and layers).
pub const GC_REF_CONTENT: &str = "containerd.io/gc.ref.content.";

/// Kubelet's image GC thresholds, in percent of the image filesystem, and where they come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thresholds {
    /// GC starts above this.
    pub high: u8,
    /// GC frees until under this.
    pub low: u8,
    /// Where each came from: "kubelet's default", or the file and the key.
    pub from: String,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            high: DEFAULT_HIGH,
            low: DEFAULT_LOW,
            from: "kubelet's defaults".into(),
        }
    }
}

/// The files K3s (or RKE2) sets kubelet's thresholds in, in the order they apply (later wins):
/// kubelet's config drop-ins under `<data-dir>/agent/etc/kubelet.conf.d/` (K3s writes its
/// defaults there, an operator may add files), then the `kubelet-arg` entries of
/// `/etc/rancher/<program>/config.yaml` and `config.yaml.d/*.yaml`, which become kubelet flags
/// and win over its config files. `etc` is `/etc/rancher/<program>`; `data_dir` is
/// `/var/lib/rancher/<program>`.
pub fn threshold_sources(etc: &Path, data_dir: &Path) -> Vec<PathBuf> {
    let sorted = |dir: PathBuf, suffix: &str| -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        files.sort();
        files
    };
    let mut files = sorted(data_dir.join("agent/etc/kubelet.conf.d"), ".conf");
    files.push(etc.join("config.yaml"));
    files.extend(sorted(etc.join("config.yaml.d"), ".yaml"));
    files
}

/// The thresholds the files say, each `(path, text)` in [`threshold_sources`]'s order (files
/// that do not exist are left out by the caller). A file that is not YAML, or a value that is
/// not a percentage, is an error naming the file and the key: kubelet itself would refuse it.
pub fn thresholds(files: &[(PathBuf, String)]) -> Result<Thresholds, String> {
    let mut t = Thresholds::default();
    let (mut high_from, mut low_from) = (None::<String>, None::<String>);
    for (path, text) in files {
        let shown = crate::escape::path(path).to_string();
        let docs = yaml_rust2::YamlLoader::load_from_str(text)
            .map_err(|e| format!("{shown} is not YAML: {e}"))?;
        let Some(doc) = docs.first() else { continue };
        let is_kubelet_conf = path.extension().is_some_and(|e| e == "conf");
        if is_kubelet_conf {
            for (key, high) in [
                ("imageGCHighThresholdPercent", true),
                ("imageGCLowThresholdPercent", false),
            ] {
                let value = &doc[key];
                if value.is_badvalue() || value.is_null() {
                    continue;
                }
                let n = value
                    .as_i64()
                    .and_then(|n| u8::try_from(n).ok())
                    .filter(|n| *n <= 100)
                    .ok_or_else(|| format!("{key} in {shown} is not a percentage: {value:?}"))?;
                let from = format!("{key}: {n} in {shown}");
                if high {
                    (t.high, high_from) = (n, Some(from));
                } else {
                    (t.low, low_from) = (n, Some(from));
                }
            }
            continue;
        }
        for key in ["kubelet-arg", "kubelet-arg+"] {
            let args: Vec<&str> = match &doc[key] {
                yaml_rust2::Yaml::Array(items) => items.iter().filter_map(|i| i.as_str()).collect(),
                yaml_rust2::Yaml::String(s) => vec![s.as_str()],
                _ => continue,
            };
            for arg in args {
                let arg = arg.trim().trim_start_matches("--");
                let Some((name, value)) = arg.split_once('=') else {
                    continue;
                };
                let high = match name {
                    "image-gc-high-threshold" => true,
                    "image-gc-low-threshold" => false,
                    _ => continue,
                };
                let n = value
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|n| *n <= 100)
                    .ok_or_else(|| {
                        format!("{key} {name}={value} in {shown} is not a percentage")
                    })?;
                let from = format!("{key} {name}={n} in {shown}");
                if high {
                    (t.high, high_from) = (n, Some(from));
                } else {
                    (t.low, low_from) = (n, Some(from));
                }
            }
        }
    }
    t.from = match (high_from, low_from) {
        (None, None) => Thresholds::default().from,
        (Some(h), Some(l)) => format!("{h}; {l}"),
        (Some(h), None) => format!("{h}; low: kubelet's default"),
        (None, Some(l)) => format!("high: kubelet's default; {l}"),
    };
    Ok(t)
}

/// One blob of containerd's content store: its size and the blobs it refers to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blob {
    /// Bytes.
    pub size: u64,
    /// The digests of its `containerd.io/gc.ref.content.*` labels.
    pub refs: Vec<String>,
}

/// The blobs reachable from `root` (itself included), by the content store's GC labels.
fn reach<'a>(root: &'a str, blobs: &'a HashMap<String, Blob>, seen: &mut BTreeSet<&'a str>) {
    let mut todo = vec![root];
    while let Some(digest) = todo.pop() {
        let Some((key, blob)) = blobs.get_key_value(digest) else {
            continue;
        };
        if seen.insert(key.as_str()) {
            todo.extend(blob.refs.iter().map(String::as_str));
        }
    }
}

/// The bytes the images at `roots` (their target digests) hold: every blob reachable from one,
/// counted once however many images share it.
pub fn unique_bytes<'a>(
    roots: impl IntoIterator<Item = &'a str>,
    blobs: &HashMap<String, Blob>,
) -> u64 {
    let mut seen = BTreeSet::new();
    for root in roots {
        reach(root, blobs, &mut seen);
    }
    seen.iter().map(|d| blobs[*d].size).sum()
}

/// The bytes of one image (its blobs, shared ones included).
pub fn image_bytes(root: &str, blobs: &HashMap<String, Blob>) -> u64 {
    unique_bytes([root], blobs)
}

/// The image filesystem as kubelet sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filesystem {
    /// Its size in bytes.
    pub size: u64,
    /// Bytes in use.
    pub used: u64,
}

/// What the pins leave kubelet's image GC: `pinned` bytes held by the pins, `content` bytes in
/// the whole content store, on `fs`. `None` when GC can still get under the low threshold (or
/// the filesystem's size is unknown); else how full the filesystem would still be, in percent,
/// with every image GC may delete deleted.
pub fn gc_floor(pinned: u64, content: u64, fs: Filesystem, t: &Thresholds) -> Option<f64> {
    if fs.size == 0 || pinned == 0 {
        return None;
    }
    let reclaimable = content.saturating_sub(pinned);
    let floor = fs.used.saturating_sub(reclaimable);
    let percent = floor as f64 * 100.0 / fs.size as f64;
    (percent > f64::from(t.low)).then_some(percent)
}

/// `bytes` for people: `1.5 GiB`, `300 MiB`, `12 KiB`, `10 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        list.iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect()
    }

    #[test]
    fn thresholds_default_and_later_files_and_flags_win() {
        assert_eq!(thresholds(&[]).unwrap(), Thresholds::default());
        let t = thresholds(&files(&[
            (
                "/var/lib/rancher/k3s/agent/etc/kubelet.conf.d/00-k3s-defaults.conf",
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n",
            ),
            (
                "/var/lib/rancher/k3s/agent/etc/kubelet.conf.d/50-gc.conf",
                "imageGCHighThresholdPercent: 90\nimageGCLowThresholdPercent: 70\n",
            ),
            (
                "/etc/rancher/k3s/config.yaml",
                "write-kubeconfig-mode: \"0644\"\nkubelet-arg:\n  - \"image-gc-high-threshold=75\"\n  - max-pods=200\n",
            ),
            (
                "/etc/rancher/k3s/config.yaml.d/10-gc.yaml",
                "kubelet-arg+: [\"--image-gc-low-threshold=60\"]\n",
            ),
        ]))
        .unwrap();
        assert_eq!((t.high, t.low), (75, 60));
        assert_eq!(
            t.from,
            "kubelet-arg image-gc-high-threshold=75 in /etc/rancher/k3s/config.yaml; \
             kubelet-arg+ image-gc-low-threshold=60 in /etc/rancher/k3s/config.yaml.d/10-gc.yaml"
        );
        let t = thresholds(&files(&[(
            "/etc/rancher/k3s/config.yaml",
            "kubelet-arg: image-gc-low-threshold=50",
        )]))
        .unwrap();
        assert_eq!((t.high, t.low), (85, 50));
        assert!(t.from.starts_with("high: kubelet's default"), "{}", t.from);
    }

    #[test]
    fn bad_threshold_files_name_the_file_and_the_key() {
        let err = thresholds(&files(&[(
            "/etc/rancher/k3s/config.yaml",
            "kubelet-arg: [",
        )]))
        .unwrap_err();
        assert!(
            err.contains("/etc/rancher/k3s/config.yaml is not YAML"),
            "{err}"
        );
        let err = thresholds(&files(&[(
            "/etc/rancher/k3s/config.yaml",
            "kubelet-arg: [image-gc-high-threshold=900]",
        )]))
        .unwrap_err();
        assert!(err.contains("image-gc-high-threshold=900"), "{err}");
        let err = thresholds(&files(&[(
            "/x/kubelet.conf.d/9.conf",
            "imageGCLowThresholdPercent: \"eighty\"",
        )]))
        .unwrap_err();
        assert!(
            err.contains("imageGCLowThresholdPercent in /x/kubelet.conf.d/9.conf"),
            "{err}"
        );
    }

    #[test]
    fn shared_blobs_count_once_and_cycles_end() {
        let blob = |size, refs: &[&str]| Blob {
            size,
            refs: refs.iter().map(|r| r.to_string()).collect(),
        };
        let blobs: HashMap<String, Blob> = [
            ("index-a", blob(1, &["manifest-a"])),
            (
                "manifest-a",
                blob(10, &["config-a", "layer-base", "layer-a"]),
            ),
            ("config-a", blob(100, &[])),
            ("layer-base", blob(1_000, &[])),
            ("layer-a", blob(10_000, &["index-a"])),
            ("manifest-b", blob(20, &["layer-base", "missing"])),
            ("unpinned", blob(5, &[])),
        ]
        .into_iter()
        .map(|(d, b)| (d.to_string(), b))
        .collect();
        assert_eq!(image_bytes("index-a", &blobs), 11_111);
        assert_eq!(image_bytes("manifest-b", &blobs), 1_020);
        assert_eq!(unique_bytes(["index-a", "manifest-b"], &blobs), 11_131);
        assert_eq!(unique_bytes(["nothing"], &blobs), 0);
    }

    #[test]
    fn gc_floor_is_what_the_pins_leave_above_the_low_threshold() {
        let t = Thresholds::default();
        let fs = |used| Filesystem { size: 100, used };
        // 90 used, 50 of it images, 40 of those pinned: GC can free 10 -> 80%, not above 80.
        assert_eq!(gc_floor(40, 50, fs(90), &t), None);
        // 45 pinned: GC can free 5 -> 85%.
        assert_eq!(gc_floor(45, 50, fs(90), &t), Some(85.0));
        // Nothing pinned: not the pins' doing.
        assert_eq!(gc_floor(0, 50, fs(99), &t), None);
        // Size unknown.
        assert_eq!(gc_floor(45, 50, Filesystem::default(), &t), None);
    }

    #[test]
    fn bytes_read_as_people_read_them() {
        assert_eq!(human(10), "10 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
