//! How long pinkeeper takes to list the image names of a ~1 GiB archive, against the plain tool
//! pipeline that lists the same tar (`zstd -dc FILE | tar -t`, `gzip -dc FILE | tar -t`), both
//! timed as whole processes, start-up included, taking medians.
//!
//! ```text
//! cargo bench --bench inventory                 generate the archives (once), compare, print a table
//! cargo bench --bench inventory -- generate     only generate; prints the directory
//! <this bench's executable> scan DIR            one Scanner::scan() of DIR; prints what it found
//! cargo bench --bench inventory -- hostile DIR  write the hostile directories (see below) into DIR
//! ```
//!
//! `retained IMAGES_DIR` does what the daemon does with a scan (scan keeping the broken files
//! only, hand the cache changes to the ledger, observe the problems, keep the name index the
//! engine keeps, drop the rest, give freed memory back) twice, and prints what the scanner
//! keeps and the process's RSS after each (`PINKEEPER_BENCH_NO_TRIM=1`: without giving the
//! memory back).
//!
//! `hostile DIR` writes what issue 9 measured pinkeeper against, one images directory each, for
//! timing `pinkeeper inventory --images-dir DIR/CASE` by hand (`scripts/bench-inventory.sh
//! hostile` does): `list` (a 4.2 MB `pull.txt` of 100,000 distinct names), `list-dup` (100,000
//! lines naming 1,000 images), `manifest` (a docker-save `.tar` whose `manifest.json` holds
//! 450,000 `RepoTags`, 19.7 MB) and `junk` (100,000 empty `.tar` files).
//!
//! `scripts/bench-inventory.sh` runs it (and cross-checks with hyperfine and `/usr/bin/time`).
//!
//! The archives are generated once into `$PINKEEPER_BENCH_DIR` (default `/tmp/pinkeeper-bench`),
//! one images directory per case: docker-save (pre-25 layout, `manifest.json` last) and OCI
//! (`oci-layout` and `index.json` first), each as `.tar.zst` (`zstd -3`), `.tar.gz` (`gzip -6`)
//! and plain `.tar`, and docker-save as `.tar.zst` with the largest window K3s accepts
//! (`zstd -3 --long=25`). The tar holds `$PINKEEPER_BENCH_MIB` MiB (default 1024) of layer data:
//! layer sizes spread from 16 KiB to 192 MiB, and a realistic mix of content, 40% incompressible
//! (already compressed files) and 60% text-like (compresses about 2.5x), so decompression is real
//! work: the archive compresses to about 65% of the tar.
//!
//! Other settings: `PINKEEPER_BENCH_RUNS` (timed runs per command, default 5, after one warm-up),
//! `PINKEEPER_BENCH_ONLY` (run only the cases whose name contains it), `PINKEEPER_BENCH_CMD`
//! (time this command with the images directory appended instead of this executable's `scan`,
//! e.g. `target/release/pinkeeper inventory --images-dir`).

use std::env;
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use pinkeeper::inventory::Scanner;

/// Bump when the generated content changes, so stale caches are not reused.
const GENERATOR_VERSION: u32 = 1;
const IMAGES: usize = 8;

fn main() {
    let args: Vec<String> = env::args().skip(1).filter(|a| a != "--bench").collect();
    let result = match args.first().map(String::as_str) {
        Some("scan") if args.len() == 2 => scan(Path::new(&args[1])),
        Some("generate") => generate().map(|dir| println!("{}", dir.display())),
        Some("hostile") if args.len() == 2 => hostile(Path::new(&args[1])),
        Some("retained") if args.len() == 2 => retained(Path::new(&args[1])),
        None => compare(),
        _ => Err(io::Error::other(
            "usage: inventory [generate | scan IMAGES_DIR | hostile DIR | retained IMAGES_DIR] \
             (no argument: compare)",
        )),
    };
    if let Err(e) = result {
        eprintln!("inventory bench: {e}");
        std::process::exit(1);
    }
}

/// One scan of `dir`, as `pinkeeper inventory` does it.
fn scan(dir: &Path) -> io::Result<()> {
    let inventory = Scanner::new(dir).scan().map_err(io::Error::other)?;
    let mut failed = false;
    for file in &inventory.files {
        println!("{}: {} names", file.path.display(), file.names.len());
        if let Some(error) = &file.error {
            eprintln!("{error}");
            failed = true;
        }
    }
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        if let Some(hwm) = status.lines().find(|l| l.starts_with("VmHWM:")) {
            println!("{hwm}");
        }
    }
    if failed {
        return Err(io::Error::other("an archive failed to read"));
    }
    Ok(())
}

/// What the daemon keeps of a scan of `dir` (see the module's comment).
fn retained(dir: &Path) -> io::Result<()> {
    let mut scanner = Scanner::new(dir);
    let mut problems = pinkeeper::inventory::Problems::new();
    // What the engine holds: the last scan's name index.
    let mut provided;
    for round in 1..=2 {
        let started = Instant::now();
        let inventory = scanner.scan_problems().map_err(io::Error::other)?;
        let changes = scanner.cache_changes();
        let report = problems.observe(&inventory);
        provided = scanner.provided();
        let elapsed = started.elapsed();
        let (broken, lines) = (inventory.files.len(), report.lines().len());
        drop((inventory, report));
        let stored = changes.updated.len();
        drop(changes);
        if env::var_os("PINKEEPER_BENCH_NO_TRIM").is_none() {
            pinkeeper::memory::release_freed();
        }
        let status = fs::read_to_string("/proc/self/status")?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
                .unwrap_or_default()
        };
        println!(
            "scan {round}: {} names and {broken} broken files in {:.2} s, {} read so far, {stored} \
             stored, {lines} log lines; kept {:?}; VmRSS {} KiB, VmHWM {} KiB",
            provided.len(),
            elapsed.as_secs_f64(),
            scanner.files_read(),
            scanner.cache_stats(),
            field("VmRSS:"),
            field("VmHWM:"),
        );
    }
    Ok(())
}

/// Writes the hostile images directories into `base` (see the module's comment).
fn hostile(base: &Path) -> io::Result<()> {
    let dir = |name: &str| -> io::Result<PathBuf> {
        let dir = base.join(name);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    };
    let name = |i: usize| format!("registry.example.com/t{:03}/app-{i:07}:v1", i % 997);
    let mut list = BufWriter::new(fs::File::create(dir("list")?.join("pull.txt"))?);
    for i in 0..100_000 {
        writeln!(list, "{}", name(i))?;
    }
    list.flush()?;
    let mut list = BufWriter::new(fs::File::create(dir("list-dup")?.join("pull.txt"))?);
    for i in 0..100_000 {
        writeln!(list, "{}", name(i % 1_000))?;
    }
    list.flush()?;
    let tags: Vec<String> = (0..450_000).map(name).collect();
    let manifest = format!(
        "[{{\"Config\":\"c.json\",\"RepoTags\":{},\"Layers\":[]}}]",
        serde_json::to_string(&tags).map_err(io::Error::other)?
    );
    let file = fs::File::create(dir("manifest")?.join("big.tar"))?;
    let mut builder = tar::Builder::new(BufWriter::new(file));
    append_bytes(&mut builder, "c.json", b"{}")?;
    append_bytes(&mut builder, "manifest.json", manifest.as_bytes())?;
    builder.into_inner()?.flush()?;
    let junk = dir("junk")?;
    for i in 0..100_000 {
        fs::File::create(junk.join(format!("junk-{i:06}.tar")))?;
    }
    println!(
        "{}: list, list-dup, manifest ({} bytes of manifest.json), junk",
        base.display(),
        manifest.len()
    );
    Ok(())
}

struct Case {
    name: &'static str,
    layout: Layout,
    suffix: &'static str,
    /// `zstd`'s options when compressing (`.tar.zst` only)
    zstd: &'static [&'static str],
    /// the pipeline that lists the tar, `{}` standing for the file
    pipeline: &'static str,
    /// the decompressor alone, the floor for a reader that must see the whole tar
    /// (docker-save only: an OCI reader stops early)
    decompress: Option<&'static str>,
}

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    DockerSave,
    Oci,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::DockerSave => "docker-save",
            Layout::Oci => "oci",
        }
    }
}

const ZSTD: &str = "zstd -dc '{}' | tar -t >/dev/null";
const GZIP: &str = "gzip -dc '{}' | tar -t >/dev/null";
const TAR: &str = "tar -tf '{}' >/dev/null";

const CASES: [Case; 7] = [
    Case {
        name: "docker-save.tar.zst",
        layout: Layout::DockerSave,
        suffix: "tar.zst",
        zstd: &["-3"],
        pipeline: ZSTD,
        decompress: Some("zstd -dc '{}' >/dev/null"),
    },
    Case {
        name: "docker-save.tar.gz",
        layout: Layout::DockerSave,
        suffix: "tar.gz",
        zstd: &[],
        pipeline: GZIP,
        decompress: Some("gzip -dc '{}' >/dev/null"),
    },
    Case {
        name: "docker-save.tar",
        layout: Layout::DockerSave,
        suffix: "tar",
        zstd: &[],
        pipeline: TAR,
        decompress: None,
    },
    // The largest window K3s accepts (2^25): the decoder's memory is at its bound.
    Case {
        name: "docker-save-long25.tar.zst",
        layout: Layout::DockerSave,
        suffix: "tar.zst",
        zstd: &["-3", "--long=25"],
        pipeline: ZSTD,
        decompress: Some("zstd -dc '{}' >/dev/null"),
    },
    Case {
        name: "oci.tar.zst",
        layout: Layout::Oci,
        suffix: "tar.zst",
        zstd: &["-3"],
        pipeline: ZSTD,
        decompress: None,
    },
    Case {
        name: "oci.tar.gz",
        layout: Layout::Oci,
        suffix: "tar.gz",
        zstd: &[],
        pipeline: GZIP,
        decompress: None,
    },
    Case {
        name: "oci.tar",
        layout: Layout::Oci,
        suffix: "tar",
        zstd: &[],
        pipeline: TAR,
        decompress: None,
    },
];

fn setting(name: &str, default: u64) -> io::Result<u64> {
    match env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| io::Error::other(format!("{name}={v:?} is not a number"))),
        Err(_) => Ok(default),
    }
}

fn base_dir() -> io::Result<PathBuf> {
    let root = env::var_os("PINKEEPER_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/pinkeeper-bench"));
    let mib = setting("PINKEEPER_BENCH_MIB", 1024)?;
    Ok(root.join(format!("v{GENERATOR_VERSION}-{mib}mib")))
}

fn case_dir(base: &Path, case: &Case) -> PathBuf {
    base.join(case.name.replace('.', "-"))
}

fn case_file(base: &Path, case: &Case) -> PathBuf {
    case_dir(base, case).join(format!("airgap-images.{}", case.suffix))
}

// ---- generation ----

fn generate() -> io::Result<PathBuf> {
    let base = base_dir()?;
    let total = setting("PINKEEPER_BENCH_MIB", 1024)? << 20;
    fs::create_dir_all(base.join("src"))?;
    fs::create_dir_all(base.join("empty"))?;
    for layout in [Layout::DockerSave, Layout::Oci] {
        let tar = base.join("src").join(format!("{}.tar", layout.name()));
        if !tar.exists() {
            eprintln!("generating {} ...", tar.display());
            let tmp = tar.with_extension("tmp");
            write_tar(&tmp, layout, total)?;
            fs::rename(&tmp, &tar)?;
        }
        for case in CASES.iter().filter(|c| c.layout == layout) {
            let file = case_file(&base, case);
            if file.exists() {
                continue;
            }
            eprintln!("generating {} ...", file.display());
            fs::create_dir_all(case_dir(&base, case))?;
            let tmp = file.with_extension("tmp");
            let status = match case.suffix {
                "tar" => {
                    fs::copy(&tar, &tmp)?;
                    None
                }
                "tar.zst" => Some(
                    Command::new("zstd")
                        .args(case.zstd)
                        .args(["-q", "-T0", "-f", "-o"])
                        .arg(&tmp)
                        .arg(&tar)
                        .status()?,
                ),
                _ => Some(
                    Command::new("gzip")
                        .args(["-6", "-c"])
                        .arg(&tar)
                        .stdout(fs::File::create(&tmp)?)
                        .status()?,
                ),
            };
            if let Some(status) = status.filter(|s| !s.success()) {
                return Err(io::Error::other(format!(
                    "compressing {}: {status}",
                    file.display()
                )));
            }
            fs::rename(&tmp, &file)?;
        }
    }
    Ok(base)
}

/// xorshift64*: deterministic, fast, good enough for filler.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn hex(&mut self) -> String {
        (0..4).map(|_| format!("{:016x}", self.next())).collect()
    }
}

/// Layer content: 256 KiB segments, each either random bytes (40%) or text-like tokens drawn
/// with a skewed distribution from a 4096-word vocabulary (60%).
struct Filler {
    rng: Rng,
    words: Vec<Vec<u8>>,
    segment: Vec<u8>,
    pos: usize,
    left: u64,
}

impl Filler {
    fn new(seed: u64, len: u64) -> Filler {
        let mut rng = Rng(seed | 1);
        const ALPHABET: &[u8] =
            b"abcdefghijklmnopqrstuvwxyz_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\x00\x01\x7f\xff";
        let words = (0..4096)
            .map(|_| {
                let len = 2 + (rng.next() % 11) as usize;
                (0..len)
                    .map(|_| ALPHABET[(rng.next() % ALPHABET.len() as u64) as usize])
                    .collect()
            })
            .collect();
        Filler {
            rng,
            words,
            segment: Vec::with_capacity(256 << 10),
            pos: 0,
            left: len,
        }
    }

    fn refill(&mut self) {
        const SEGMENT: usize = 256 << 10;
        self.segment.clear();
        self.pos = 0;
        if self.rng.next() % 10 < 4 {
            while self.segment.len() < SEGMENT {
                let r = self.rng.next();
                self.segment.extend_from_slice(&r.to_le_bytes());
            }
        } else {
            const SEPARATORS: &[u8; 8] = b" \n\0/._=\t";
            while self.segment.len() < SEGMENT {
                let r = self.rng.next();
                let index = ((r & 0xfff) * ((r >> 12) & 0xfff)) >> 12;
                self.segment.extend_from_slice(&self.words[index as usize]);
                self.segment.push(SEPARATORS[((r >> 24) & 7) as usize]);
            }
        }
        self.segment.truncate(SEGMENT);
    }
}

impl Read for Filler {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        if self.pos == self.segment.len() {
            self.refill();
        }
        let n = buf
            .len()
            .min(self.segment.len() - self.pos)
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        buf[..n].copy_from_slice(&self.segment[self.pos..self.pos + n]);
        self.pos += n;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Layer sizes, log-uniform between 16 KiB and 192 MiB, adding up to `total`.
fn layer_sizes(rng: &mut Rng, total: u64) -> Vec<u64> {
    let (low, high) = ((16u64 << 10) as f64, (192u64 << 20) as f64);
    let mut sizes = Vec::new();
    let mut sum = 0;
    while sum < total {
        let unit = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        let size = (low * (high / low).powf(unit)) as u64;
        let size = size.min(total - sum);
        sizes.push(size);
        sum += size;
    }
    sizes
}

fn append(
    builder: &mut tar::Builder<impl Write>,
    path: &str,
    len: u64,
    data: impl Read,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(len);
    header.set_mode(0o644);
    header.set_mtime(1_700_000_000);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, path, data)
}

fn append_bytes(builder: &mut tar::Builder<impl Write>, path: &str, data: &[u8]) -> io::Result<()> {
    append(builder, path, data.len() as u64, data)
}

fn write_tar(path: &Path, layout: Layout, total: u64) -> io::Result<()> {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let sizes = layer_sizes(&mut rng, total);
    let layers: Vec<(String, u64)> = sizes.iter().map(|&s| (rng.hex(), s)).collect();
    let image_name = |i: usize| format!("rancher/bench-image-{i}:v1.{i}");
    let image_layers = |i: usize| layers.iter().skip(i).step_by(IMAGES);
    let configs: Vec<(String, Vec<u8>)> = (0..IMAGES)
        .map(|i| {
            let diff_ids: Vec<String> = image_layers(i)
                .map(|(h, _)| format!("sha256:{h}"))
                .collect();
            let config = serde_json::json!({
                "architecture": "amd64", "os": "linux",
                "config": {"Cmd": ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            });
            (rng.hex(), serde_json::to_vec(&config).expect("json"))
        })
        .collect();
    let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, fs::File::create(path)?));
    let mut seed = 1;
    let mut layer = |builder: &mut tar::Builder<_>, path: &str, len: u64| {
        seed += 1;
        append(
            builder,
            path,
            len,
            Filler::new(seed * 0x9e37_79b9_7f4a_7c15, len),
        )
    };
    match layout {
        Layout::DockerSave => {
            for (hex, size) in &layers {
                append_bytes(&mut builder, &format!("{hex}/VERSION"), b"1.0")?;
                append_bytes(
                    &mut builder,
                    &format!("{hex}/json"),
                    format!("{{\"id\":\"{hex}\"}}").as_bytes(),
                )?;
                layer(&mut builder, &format!("{hex}/layer.tar"), *size)?;
            }
            for (hex, config) in &configs {
                append_bytes(&mut builder, &format!("{hex}.json"), config)?;
            }
            let mut repositories = serde_json::Map::new();
            let manifest: Vec<_> = (0..IMAGES)
                .map(|i| {
                    let (repo, tag) = image_name(i).split_once(':').map(|(r, t)| (r.to_owned(), t.to_owned())).expect("tag");
                    repositories.insert(repo, serde_json::json!({ tag: configs[i].0 }));
                    serde_json::json!({
                        "Config": format!("{}.json", configs[i].0),
                        "RepoTags": [image_name(i)],
                        "Layers": image_layers(i).map(|(h, _)| format!("{h}/layer.tar")).collect::<Vec<_>>(),
                    })
                })
                .collect();
            append_bytes(
                &mut builder,
                "repositories",
                &serde_json::to_vec(&repositories)?,
            )?;
            append_bytes(
                &mut builder,
                "manifest.json",
                &serde_json::to_vec(&manifest)?,
            )?;
        }
        Layout::Oci => {
            let manifests: Vec<(String, Vec<u8>)> = (0..IMAGES)
                .map(|i| {
                    let manifest = serde_json::json!({
                        "schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                   "digest": format!("sha256:{}", configs[i].0), "size": configs[i].1.len()},
                        "layers": image_layers(i).map(|(h, s)| serde_json::json!({
                            "mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": format!("sha256:{h}"), "size": s,
                        })).collect::<Vec<_>>(),
                    });
                    (rng.hex(), serde_json::to_vec(&manifest).expect("json"))
                })
                .collect();
            let index = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": manifests.iter().enumerate().map(|(i, (hex, m))| serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{hex}"), "size": m.len(),
                    "annotations": {
                        "io.containerd.image.name": format!("docker.io/{}", image_name(i)),
                        "org.opencontainers.image.ref.name": format!("v1.{i}"),
                    },
                })).collect::<Vec<_>>(),
            });
            append_bytes(
                &mut builder,
                "oci-layout",
                br#"{"imageLayoutVersion":"1.0.0"}"#,
            )?;
            append_bytes(&mut builder, "index.json", &serde_json::to_vec(&index)?)?;
            for (hex, manifest) in &manifests {
                append_bytes(&mut builder, &format!("blobs/sha256/{hex}"), manifest)?;
            }
            for (hex, config) in &configs {
                append_bytes(&mut builder, &format!("blobs/sha256/{hex}"), config)?;
            }
            for (hex, size) in &layers {
                layer(&mut builder, &format!("blobs/sha256/{hex}"), *size)?;
            }
        }
    }
    builder
        .into_inner()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
}

// ---- comparison ----

fn pinkeeper_command(dir: &Path) -> io::Result<Command> {
    let mut words: Vec<String> = match env::var("PINKEEPER_BENCH_CMD") {
        Ok(cmd) => cmd.split_whitespace().map(str::to_owned).collect(),
        Err(_) => vec![
            env::current_exe()?.to_string_lossy().into_owned(),
            "scan".to_owned(),
        ],
    };
    words.push(dir.to_string_lossy().into_owned());
    let mut command = Command::new(&words[0]);
    command.args(&words[1..]);
    Ok(command)
}

fn time_run(mut command: Command) -> io::Result<f64> {
    let start = Instant::now();
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()?;
    let seconds = start.elapsed().as_secs_f64();
    if !status.success() {
        return Err(io::Error::other(format!("{command:?} failed: {status}")));
    }
    Ok(seconds)
}

/// Peak RSS in KiB of one run, from `/usr/bin/time -f %M`.
fn peak_rss_kib(command: &Command) -> Option<u64> {
    let output = Command::new("/usr/bin/time")
        .args(["-f", "%M"])
        .arg(command.get_program())
        .args(command.get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .ok()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    stderr.lines().last()?.trim().parse().ok()
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn shell(script: &str, file: &Path) -> Command {
    let mut command = Command::new("sh");
    command.args(["-c", &script.replace("{}", &file.to_string_lossy())]);
    command
}

fn compare() -> io::Result<()> {
    let base = generate()?;
    let runs = setting("PINKEEPER_BENCH_RUNS", 5)?.max(1) as usize;
    let only = env::var("PINKEEPER_BENCH_ONLY").unwrap_or_default();
    let empty = base.join("empty");
    let idle = peak_rss_kib(&pinkeeper_command(&empty)?);
    println!(
        "archives in {} ({} MiB of tar each)",
        base.display(),
        setting("PINKEEPER_BENCH_MIB", 1024)?
    );
    println!("pinkeeper: {:?}", pinkeeper_command(Path::new("DIR"))?);
    println!(
        "{runs} runs each after one warm-up, the commands alternating; times as median (min-max), \
         ratio = pinkeeper / pipeline, the median of the runs' ratios"
    );
    println!(
        "pinkeeper idle (empty images directory) peak RSS: {}",
        rss(idle, None)
    );
    println!();
    println!("| archive | file | tool pipeline | decompressor alone | pinkeeper | ratio | pinkeeper peak RSS |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for case in CASES.iter().filter(|c| c.name.contains(&only)) {
        let dir = case_dir(&base, case);
        let file = case_file(&base, case);
        time_run(pinkeeper_command(&dir)?)?;
        time_run(shell(case.pipeline, &file))?;
        let (mut ours, mut theirs, mut ratios, mut alone) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let a = time_run(pinkeeper_command(&dir)?)?;
            let b = time_run(shell(case.pipeline, &file))?;
            ours.push(a);
            theirs.push(b);
            ratios.push(a / b);
            if let Some(decompress) = case.decompress {
                alone.push(time_run(shell(decompress, &file))?);
            }
        }
        let peak = peak_rss_kib(&pinkeeper_command(&dir)?);
        println!(
            "| {} | {:.0} MiB | {} | {} | {} | {} | {} |",
            case.name,
            fs::metadata(&file)?.len() as f64 / f64::from(1 << 20),
            summary(&theirs),
            if alone.is_empty() {
                "-".to_owned()
            } else {
                summary(&alone)
            },
            summary(&ours),
            ratio(&ratios),
            rss(peak, idle),
        );
    }
    Ok(())
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

/// `0.92x (0.85-1.01)`, with more digits for small ratios.
fn ratio(ratios: &[f64]) -> String {
    let (m, lo, hi) = (median(ratios), min(ratios), max(ratios));
    let digits = if m < 0.1 { 4 } else { 2 };
    format!("{m:.digits$}x ({lo:.digits$}-{hi:.digits$})")
}

/// `1.23 s (1.20-1.31)`, or in milliseconds under a second.
fn summary(seconds: &[f64]) -> String {
    let (m, lo, hi) = (median(seconds), min(seconds), max(seconds));
    if m >= 1.0 {
        format!("{m:.2} s ({lo:.2}-{hi:.2})")
    } else {
        format!("{:.0} ms ({:.0}-{:.0})", m * 1e3, lo * 1e3, hi * 1e3)
    }
}

fn rss(kib: Option<u64>, idle: Option<u64>) -> String {
    match (kib, idle) {
        (None, _) => "n/a (no /usr/bin/time)".to_owned(),
        (Some(k), None) => format!("{:.1} MiB", k as f64 / 1024.0),
        (Some(k), Some(i)) => format!(
            "{:.1} MiB (+{:.1} MiB)",
            k as f64 / 1024.0,
            k.saturating_sub(i) as f64 / 1024.0
        ),
    }
}
