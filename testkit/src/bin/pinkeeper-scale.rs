//! `pinkeeper-scale`: two DESIGN.md section 6 targets at N = 10,000 images.
//!
//! 1. Reconcile after a missed sweep: N records in `k8s.io` carry both pins (one real target,
//!    imported once by the K3s emulator; no archive in the images directory). pinkeeper records
//!    them and is stopped; the sweep happens while it is away (whole-map updates removing both
//!    pins, like K3s's `clearLabels`); pinkeeper is started again and timed from its spawn until
//!    containerd has committed the CRI pin on every record (containerd's own event timestamps,
//!    cross-checked by a listing). Baseline on the same swept state: one `Images.List` plus N
//!    per-key updates `labels.io.cri-containerd.pinned=pinned`: sequential, 32 in flight
//!    (pinkeeper's concurrency), and 4 in flight (the target's own baseline). Target: within
//!    1.25x.
//! 2. Idle cost with N intents: `VmRSS`/`VmHWM` once reconciled and settled (target: RSS under
//!    16 MiB), against a start with an empty ledger; wake-ups over 20 s of idle (voluntary
//!    context switches of every thread).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use containerd_client::types::Descriptor;
use pinkeeper_testkit::archive::{write_archive, Layout, TestImage};
use pinkeeper_testkit::{
    Client, Containerd, Cri, K3s, K3sConfig, Options, Version, CRI_MANAGED_LABEL, CRI_PIN_LABEL,
    K3S_PIN_LABEL, K8S_NAMESPACE, PINNED,
};

#[derive(Parser)]
#[command(about = "Measures pinkeeper's reconcile time and idle cost with 10,000 intents")]
struct Cli {
    /// The pinkeeper binary.
    #[arg(long, default_value = "target/release/pinkeeper")]
    pinkeeper: PathBuf,
    /// containerd version: 1.6, 1.7 or 2.x.
    #[arg(long, default_value = "1.7")]
    containerd: String,
    /// Image records (each carries both pins before the sweep).
    #[arg(long, default_value_t = 10_000)]
    images: usize,
    /// Rounds of (record, sweep, reconcile, baselines); idle cost is measured in the first.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of idle over which wake-ups are counted.
    #[arg(long, default_value_t = 20)]
    idle_secs: u64,
    /// containerd's CRI plugin: `on` as under K3s, or `off` so that its own labelling of every
    /// record (minutes at 10,000) neither delays the run nor competes with the measurements.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    cri: String,
    /// Valid archives written to the images directory first (each a small docker-save `.tar`
    /// providing a name of its own, not in containerd): the 30,000-file directory.
    #[arg(long, default_value_t = 0)]
    archives: usize,
    /// Keep the temp dir (pinkeeper's logs and ledgers) after a complete run.
    #[arg(long)]
    keep: bool,
}

/// Pins written at once by pinkeeper (`RPC_CONCURRENCY` in src/daemon/executor.rs).
const PINKEEPER_CONCURRENCY: usize = 32;
/// The writers of the target's own baseline (issue 12: "one List plus N per-key updates by 4
/// writers").
const WRITERS: usize = 4;
const PREFIX: &str = "docker.io/scale/img";
const BARRIER: &str = "docker.io/scale/barrier:1";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("pinkeeper-scale: {e:#}");
        std::process::exit(1);
    }
}

/// A running pinkeeper process, killed on drop.
struct Pinkeeper {
    child: Child,
    log: PathBuf,
}

impl Pinkeeper {
    fn start(bin: &Path, socket: &Path, dir: &Path, state: &str, log: &str) -> Result<Pinkeeper> {
        let log = dir.join(log);
        let child = Command::new(bin)
            .args(["run", "--containerd-socket"])
            .arg(socket)
            .arg("--images-dir")
            .arg(dir.join("images"))
            .arg("--state-dir")
            .arg(dir.join(state))
            .arg("--control-socket")
            .arg(dir.join("pk.sock"))
            .env("PINKEEPER_LOG", "info,pinkeeper=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Pinkeeper { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_count(&self, needle: &str) -> Result<usize> {
        let text = std::fs::read_to_string(&self.log)?;
        Ok(text.lines().filter(|l| l.contains(needle)).count())
    }

    /// Waits until the log has `count` lines containing `needle`.
    async fn wait_log(&mut self, needle: &str, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_count(needle)? >= count {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("pinkeeper exited ({status}); see {}", self.log.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {count} log lines with {needle:?} (have {}); see {}",
                    self.log_count(needle)?,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then waits for the exit.
    fn stop(mut self) -> Result<()> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        let status = self.child.wait()?;
        if !status.success() {
            bail!("pinkeeper exited with {status}; see {}", self.log.display());
        }
        Ok(())
    }
}

impl Drop for Pinkeeper {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `VmRSS` and `VmHWM` in KiB, and the thread count.
fn memory(pid: u32) -> Result<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?, field("Threads:")?))
}

/// The split of `VmRSS`: the heap and stacks (`RssAnon`) against the binary's and libraries'
/// pages (`RssFile`), in MiB.
fn rss_parts(pid: u32) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(f64::NAN, mib)
    };
    Ok(format!(
        "anon {:.1} + file {:.1} MiB",
        field("RssAnon:"),
        field("RssFile:")
    ))
}

/// Per thread: (tid, name, voluntary, nonvoluntary context switches).
fn switches(pid: u32) -> Result<BTreeMap<u32, (String, u64, u64)>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let get = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.insert(
            tid,
            (
                get("Name:"),
                get("voluntary_ctxt_switches:").parse().unwrap_or(0),
                get("nonvoluntary_ctxt_switches:").parse().unwrap_or(0),
            ),
        );
    }
    Ok(out)
}

/// utime + stime of the process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("bad /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3 (index 0 here); utime 14, stime 15.
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

fn names(n: usize) -> Vec<String> {
    // The number last: containerd lists more than about 50,000 records only in parts, split
    // by the name's last character.
    (0..n).map(|i| format!("{PREFIX}:{i}")).collect()
}

fn both_pins() -> BTreeMap<String, String> {
    BTreeMap::from([
        (K3S_PIN_LABEL.to_string(), PINNED.to_string()),
        (CRI_PIN_LABEL.to_string(), PINNED.to_string()),
    ])
}

/// Runs `op` on every name with `concurrency` calls in flight; the first error fails.
async fn for_all<F, Fut>(names: &[String], concurrency: usize, op: F) -> Result<()>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    let mut iter = names.iter();
    loop {
        while running.len() < concurrency {
            let Some(name) = iter.next() else { break };
            running.spawn(op(name.clone()));
        }
        let Some(done) = running.join_next().await else {
            return Ok(());
        };
        done??;
    }
}

/// The sweep, done while pinkeeper is away: like K3s's `clearLabels`, the listed label map
/// without both pins, written back whole (`paths = ["labels"]`); other labels (CRI's
/// `io.cri-containerd.image=managed`) stay. 32 in flight: only the resulting state matters.
async fn sweep(client: &Client) -> Result<()> {
    relabel(client, |labels| {
        labels.remove(K3S_PIN_LABEL);
        labels.remove(CRI_PIN_LABEL);
    })
    .await?;
    let pinned = count(client, |i| i.has(CRI_PIN_LABEL) || i.has(K3S_PIN_LABEL)).await?;
    if pinned != 0 {
        bail!("{pinned} images still pinned after the sweep");
    }
    Ok(())
}

/// Puts both pins back (whole map, other labels kept), as K3s's import would.
async fn pin_both(client: &Client) -> Result<()> {
    relabel(client, |labels| labels.extend(both_pins())).await
}

/// Lists the bench images and writes each one's label map back changed by `change`.
async fn relabel(client: &Client, change: fn(&mut BTreeMap<String, String>)) -> Result<()> {
    let images = client.images_by_name().await?;
    let mut work = Vec::new();
    for (name, info) in images {
        if name.starts_with(PREFIX) {
            let mut labels = info.labels;
            change(&mut labels);
            work.push((name, labels));
        }
    }
    let work = Arc::new(work);
    let index: Vec<String> = (0..work.len()).map(|i| i.to_string()).collect();
    for_all(&index, 32, |i| {
        let client = client.clone();
        let work = work.clone();
        async move {
            let (name, labels) = &work[i.parse::<usize>()?];
            client.replace_labels(name, labels).await?;
            Ok(())
        }
    })
    .await
}

async fn count(
    client: &Client,
    f: impl Fn(&pinkeeper_testkit::ImageInfo) -> bool,
) -> Result<usize> {
    Ok(client
        .images_by_name()
        .await?
        .values()
        .filter(|i| i.name.starts_with(PREFIX) && f(i))
        .count())
}

/// The baseline: one `Images.List`, then a per-key CRI pin on every bench image it shows that
/// lacks one, `concurrency` in flight. Returns the elapsed time.
async fn baseline(client: &Client, concurrency: usize) -> Result<Duration> {
    let started = Instant::now();
    let listed = client.list_all().await?;
    let todo: Vec<String> = listed
        .into_iter()
        .filter(|i| {
            i.name.starts_with(PREFIX)
                && i.labels.get(CRI_PIN_LABEL).map(String::as_str) != Some(PINNED)
        })
        .map(|i| i.name)
        .collect();
    if concurrency <= 1 {
        for name in &todo {
            client.set_label(name, CRI_PIN_LABEL, PINNED).await?;
        }
    } else {
        for_all(&todo, concurrency, |name| {
            let client = client.clone();
            async move {
                client.set_label(&name, CRI_PIN_LABEL, PINNED).await?;
                Ok(())
            }
        })
        .await?;
    }
    Ok(started.elapsed())
}

/// What the event watcher saw: bench names with the CRI pin, the newest such event's
/// containerd timestamp (ns since the epoch), whether the barrier came through.
#[derive(Default)]
struct Seen {
    pinned: HashSet<String>,
    last_pin_ns: i128,
    first_pin_ns: i128,
    barrier: bool,
}

async fn watch(socket: PathBuf, seen: Arc<Mutex<Seen>>) -> Result<()> {
    pinkeeper_testkit::client::watch_image_updates(&socket, K8S_NAMESPACE, |name, ts, labels| {
        let mut seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        if name == BARRIER {
            seen.barrier = true;
        } else if name.starts_with(PREFIX)
            && labels.get(CRI_PIN_LABEL).map(String::as_str) == Some(PINNED)
            && seen.pinned.insert(name.to_string())
        {
            seen.last_pin_ns = seen.last_pin_ns.max(ts);
            if seen.first_pin_ns == 0 || ts < seen.first_pin_ns {
                seen.first_pin_ns = ts;
            }
        }
        Ok(())
    })
    .await
}

fn epoch_ns(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Result of one timed reconcile.
struct Reconcile {
    /// Spawn -> containerd committed the last CRI pin (containerd's timestamp).
    total: Duration,
    /// Spawn -> first CRI pin committed.
    first_pin: Duration,
    /// Spawn -> this tool saw every pin (event delivery and polling included).
    observed: Duration,
}

async fn timed_reconcile(
    cli: &Cli,
    containerd: &Containerd,
    client: &Client,
    dir: &Path,
    state: &str,
    log: &str,
) -> Result<(Pinkeeper, Reconcile)> {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let watcher = tokio::spawn(watch(containerd.socket().to_path_buf(), seen.clone()));
    // The subscription is live once an event of ours comes through it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0u64;
    loop {
        client.set_label(BARRIER, "bench", &i.to_string()).await?;
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if seen
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .barrier
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the event subscription did not come up");
        }
    }
    let spawned_wall = SystemTime::now();
    let spawned = Instant::now();
    let mut pk = Pinkeeper::start(&cli.pinkeeper, containerd.socket(), dir, state, log)?;
    let deadline = spawned + Duration::from_secs(300);
    let mut last_list = Instant::now();
    let observed = loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let done = seen
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .pinned
            .len()
            >= cli.images;
        if done {
            break spawned.elapsed();
        }
        if let Some(status) = pk.child.try_wait()? {
            bail!("pinkeeper exited ({status}); see {}", pk.log.display());
        }
        // A fallback in case the subscription missed an event: a listing every 5 s.
        if last_list.elapsed() > Duration::from_secs(5) {
            last_list = Instant::now();
            if count(client, |i| i.has(CRI_PIN_LABEL)).await? >= cli.images {
                eprintln!("  (completion seen by listing, not by events)");
                break spawned.elapsed();
            }
        }
        if Instant::now() > deadline {
            bail!("pinkeeper did not restore every pin within 300 s");
        }
    };
    watcher.abort();
    let pinned = count(client, |i| i.has(CRI_PIN_LABEL)).await?;
    if pinned != cli.images {
        bail!("only {pinned} of {} images carry the CRI pin", cli.images);
    }
    let seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let start_ns = epoch_ns(spawned_wall);
    let ns = |t: i128| Duration::from_nanos((t - start_ns).max(0) as u64);
    let result = Reconcile {
        total: if seen.pinned.len() >= cli.images {
            ns(seen.last_pin_ns)
        } else {
            observed
        },
        first_pin: ns(seen.first_pin_ns),
        observed,
    };
    Ok((pk, result))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn run(cli: Cli) -> Result<()> {
    let version = Version::parse(&cli.containerd)?;
    // Kept on failure (the logs tell why); removed after a complete run.
    let tmp = tempfile::Builder::new()
        .prefix("pkscale")
        .tempdir_in("/tmp")?
        .keep();
    let dir = tmp.as_path();
    std::fs::create_dir_all(dir.join("images"))?;
    std::fs::create_dir_all(dir.join("archive"))?;
    let cri = if cli.cri == "off" { Cri::Off } else { Cri::On };
    let options = Options {
        cri,
        ..Options::default()
    };
    let containerd = Containerd::start_with(version, options).await?;
    let client = containerd.client(K8S_NAMESPACE).await?;
    println!(
        "containerd {} (CRI {}), {} images, pinkeeper {}; load average at start {}",
        containerd.reported_version(),
        cli.cri,
        cli.images,
        cli.pinkeeper.display(),
        loadavg()
    );

    if cli.archives > 0 {
        let t = Instant::now();
        let bytes = write_archives(&dir.join("images"), cli.archives)?;
        println!(
            "wrote {} archives ({:.1} MiB) to the images directory in {:.1} s",
            cli.archives,
            mib(bytes / 1024),
            t.elapsed().as_secs_f64()
        );
    }

    // Idle with an empty ledger and an empty namespace, for comparison.
    let empty = {
        let mut pk = Pinkeeper::start(
            &cli.pinkeeper,
            containerd.socket(),
            dir,
            "state-empty",
            "pinkeeper-empty.log",
        )?;
        pk.wait_log("reconciled after connecting", 1, Duration::from_secs(30))
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The images directory read (a 30,000-file one takes a while).
        cpu_quiet(pk.pid()).await?;
        let m = (memory(pk.pid())?, rss_parts(pk.pid())?);
        pk.stop()?;
        m
    };

    // One real target: a tiny archive imported like K3s does, kept out of the images dir.
    let archive = dir.join("archive/seed.tar");
    write_archive(
        &archive,
        Layout::DockerSave,
        &[TestImage::new("docker.io/scale/seed:1")],
    )?;
    let k3s = K3s::new(K3sConfig::new(containerd.socket(), dir.join("images")));
    let report = k3s.import_file(&archive).await?;
    let seed = report
        .images
        .first()
        .context("the import created no image")?;
    let target: Descriptor = client.get(seed).await?.target.context("no target")?;
    let all = names(cli.images);
    let created = Instant::now();
    for_all(&all, 32, |name| {
        let client = client.clone();
        let target = target.clone();
        async move {
            client.create_image(&name, target, &both_pins()).await?;
            Ok(())
        }
    })
    .await?;
    let created = created.elapsed();
    // The seed's own records (name and alias) go: only the bench images remain pinned.
    for name in report.images.iter().chain(&report.aliases) {
        client.delete_image(name).await?;
    }
    client
        .create_image(BARRIER, target.clone(), &BTreeMap::new())
        .await?;
    // containerd's CRI plugin labels every new record `io.cri-containerd.image=managed` (one
    // update each, from its event loop): wait for it, or its updates overlap the measurements.
    let cri = Instant::now();
    let mut managed = 0;
    while cri.elapsed() < Duration::from_secs(600) {
        managed = count(&client, |i| {
            i.labels.get(CRI_MANAGED_LABEL).map(String::as_str) == Some("managed")
        })
        .await?;
        if managed == cli.images || (managed == 0 && cri.elapsed() > Duration::from_secs(5)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "CRI labelled {managed} of them io.cri-containerd.image=managed within {:.1} s",
        cri.elapsed().as_secs_f64()
    );
    println!(
        "created {} records with both pins in {:.1} s ({:.2} ms each, 32 in flight)",
        cli.images,
        created.as_secs_f64(),
        ms(created) / cli.images as f64
    );

    let mut pk_times = Vec::new();
    let mut seq_times = Vec::new();
    let mut conc_times = Vec::new();
    let mut four_times = Vec::new();
    let mut idle_report = Vec::new();
    for round in 0..cli.rounds {
        let state = format!("state-{round}");
        if round > 0 {
            // K3s's import pins them again (pinkeeper away: it records them at its start).
            pin_both(&client).await?;
        }
        // pinkeeper records every intent, then stops.
        let recorded = {
            let t = Instant::now();
            let mut pk = Pinkeeper::start(
                &cli.pinkeeper,
                containerd.socket(),
                dir,
                &state,
                &format!("pinkeeper-{round}-record.log"),
            )?;
            pk.wait_log("action=recorded", cli.images, Duration::from_secs(300))
                .await?;
            let took = t.elapsed();
            let m = memory(pk.pid())?;
            pk.stop()?;
            (took, m)
        };
        // The missed sweep.
        sweep(&client).await?;
        let load = loadavg();
        let (pk, r) = timed_reconcile(
            &cli,
            &containerd,
            &client,
            dir,
            &state,
            &format!("pinkeeper-{round}-reconcile.log"),
        )
        .await?;
        let reconciled_at = pk.log_count("reconciled after connecting")?;
        println!(
            "round {round}: recorded {} intents in {:.2} s (VmHWM {:.1} MiB); after the missed sweep: first pin {:.0} ms, all {} pinned {:.0} ms after spawn (seen by this tool at {:.0} ms); load {load}",
            cli.images,
            recorded.0.as_secs_f64(),
            mib(recorded.1 .1),
            ms(r.first_pin),
            cli.images,
            ms(r.total),
            ms(r.observed),
        );
        if reconciled_at == 0 {
            eprintln!("  (no 'reconciled after connecting' line yet)");
        }
        pk_times.push(ms(r.total));

        if round == 0 {
            let mut pk = pk;
            // Settled: the verification after the start-up burst has run.
            let t = Instant::now();
            if let Err(e) = pk
                .wait_log("K3s startup sweep:", 1, Duration::from_secs(120))
                .await
            {
                eprintln!("  warning: {e:#}");
            }
            println!(
                "round {round}: sweep summary logged {:.1} s after all pins; pinkeeper CPU so far {:.2} s",
                t.elapsed().as_secs_f64(),
                cpu_ticks(pk.pid())? as f64 / 100.0
            );
            tokio::time::sleep(Duration::from_secs(3)).await;
            cpu_quiet(pk.pid()).await?;
            let settled = memory(pk.pid())?;
            let settled_parts = rss_parts(pk.pid())?;
            let before = switches(pk.pid())?;
            let cpu_before = cpu_ticks(pk.pid())?;
            tokio::time::sleep(Duration::from_secs(cli.idle_secs)).await;
            let after = switches(pk.pid())?;
            let cpu_after = cpu_ticks(pk.pid())?;
            let end = memory(pk.pid())?;
            let mut total = (0, 0);
            let mut threads = Vec::new();
            for (tid, (name, v, n)) in &after {
                let (v0, n0) = before.get(tid).map_or((0, 0), |(_, v, n)| (*v, *n));
                total.0 += v - v0;
                total.1 += n - n0;
                threads.push(format!("{name}[{tid}] +{}v/+{}n", v - v0, n - n0));
            }
            idle_report.push(format!(
                "idle, {} intents, reconciled and settled: VmRSS {:.1} MiB ({settled_parts}), VmHWM {:.1} MiB, {} threads (after {} s idle: VmRSS {:.1} MiB); empty ledger at start: VmRSS {:.1} MiB ({}), VmHWM {:.1} MiB, {} threads",
                cli.images,
                mib(settled.0),
                mib(settled.1),
                settled.2,
                cli.idle_secs,
                mib(end.0),
                mib(empty.0 .0),
                empty.1,
                mib(empty.0 .1),
                empty.0 .2,
            ));
            idle_report.push(format!(
                "wake-ups over {} s idle: {} voluntary + {} involuntary context switches over {} threads, {} CPU ticks ({})",
                cli.idle_secs,
                total.0,
                total.1,
                after.len(),
                cpu_after - cpu_before,
                threads.join(", ")
            ));
            pk.stop()?;
        } else {
            pk.stop()?;
        }

        // Baselines on the same swept state (the CRI pin removed with a whole-map update).
        sweep(&client).await?;
        let seq = baseline(&client, 1).await?;
        let pinned = count(&client, |i| i.has(CRI_PIN_LABEL)).await?;
        if pinned != cli.images {
            bail!("sequential baseline pinned {pinned} of {}", cli.images);
        }
        sweep(&client).await?;
        let conc = baseline(&client, PINKEEPER_CONCURRENCY).await?;
        let pinned = count(&client, |i| i.has(CRI_PIN_LABEL)).await?;
        if pinned != cli.images {
            bail!("concurrent baseline pinned {pinned} of {}", cli.images);
        }
        sweep(&client).await?;
        let four = baseline(&client, WRITERS).await?;
        let pinned = count(&client, |i| i.has(CRI_PIN_LABEL)).await?;
        if pinned != cli.images {
            bail!(
                "{WRITERS}-writer baseline pinned {pinned} of {}",
                cli.images
            );
        }
        println!(
            "round {round}: baseline List + {} per-key updates: sequential {:.0} ms ({:.2} ms each), {} in flight {:.0} ms, {} in flight {:.0} ms; pinkeeper/sequential {:.2}x, pinkeeper/concurrent {:.2}x, pinkeeper/{}-writers {:.2}x",
            cli.images,
            ms(seq),
            ms(seq) / cli.images as f64,
            PINKEEPER_CONCURRENCY,
            ms(conc),
            WRITERS,
            ms(four),
            ms(r.total) / ms(seq),
            ms(r.total) / ms(conc),
            WRITERS,
            ms(r.total) / ms(four),
        );
        seq_times.push(ms(seq));
        conc_times.push(ms(conc));
        four_times.push(ms(four));
    }

    let (pk_m, seq_m, conc_m) = (median(pk_times), median(seq_times), median(conc_times));
    let four_m = median(four_times);
    println!(
        "summary (containerd {}, {} images, medians of {} rounds):",
        containerd.reported_version(),
        cli.images,
        cli.rounds
    );
    println!(
        "  reconcile after a missed sweep: pinkeeper {:.0} ms (spawn -> last pin committed); baseline List + N updates: sequential {:.0} ms, {} in flight {:.0} ms, {} in flight {:.0} ms; ratio {:.2}x (sequential), {:.2}x (concurrent), {:.2}x ({} writers); target 1.25x",
        pk_m,
        seq_m,
        PINKEEPER_CONCURRENCY,
        conc_m,
        WRITERS,
        four_m,
        pk_m / seq_m,
        pk_m / conc_m,
        pk_m / four_m,
        WRITERS
    );
    for line in idle_report {
        println!("  {line}");
    }
    println!("  load average at the end: {}", loadavg());
    if cli.keep {
        println!("  logs and ledgers kept in {}", dir.display());
    } else {
        std::fs::remove_dir_all(dir)?;
    }
    Ok(())
}

/// Waits (up to 20 s) until `pid` used no CPU for a second.
async fn cpu_quiet(pid: u32) -> Result<()> {
    let mut ticks = cpu_ticks(pid)?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_ticks(pid)?;
        if now == ticks {
            break;
        }
        ticks = now;
    }
    Ok(())
}

/// Writes `count` small docker-save archives into `dir`, each providing its own name; returns
/// their bytes.
fn write_archives(dir: &Path, count: usize) -> Result<u64> {
    let mut bytes = 0;
    for i in 0..count {
        let path = dir.join(format!("archived-{i:06}.tar"));
        let image = TestImage::new(format!("docker.io/scale/archived-{i:06}:1"));
        write_archive(&path, Layout::DockerSave, &[image])?;
        bytes += std::fs::metadata(&path)?.len();
    }
    Ok(bytes)
}
