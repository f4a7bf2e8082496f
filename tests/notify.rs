//! systemd's notify protocol, with a test socket standing in for systemd: READY=1 only once
//! the control socket listens (and before containerd answers), STATUS= following containerd,
//! WATCHDOG=1 at half of `WATCHDOG_USEC`, STOPPING=1 at SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use pinkeeper_testkit::{Containerd, Version};

/// Receives datagrams until one contains `needle`; returns it.
fn expect(socket: &UnixDatagram, needle: &str, within: Duration) -> Result<String> {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no notification with {needle:?} within {within:?}");
        }
        socket.set_read_timeout(Some(left))?;
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.contains(needle) {
            return Ok(text);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_systemd_ready_status_watchdog_and_stopping() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("pknotify")
        .tempdir_in("/tmp")?;
    let notify = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify)?;
    let mut containerd = Containerd::start(Version::V1_6).await?;
    containerd.stop()?;
    let control = dir.path().join("pk.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pinkeeper"))
        .arg("run")
        .arg("--containerd-socket")
        .arg(containerd.socket())
        .arg("--images-dir")
        .arg(dir.path().join("images"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--control-socket")
        .arg(&control)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("pinkeeper.log"))?)
        .spawn()
        .context("starting pinkeeper")?;

    // READY while containerd is still down, and only once the control socket answers.
    let ready = expect(&socket, "READY=1", Duration::from_secs(10))?;
    ensure!(
        std::os::unix::net::UnixStream::connect(&control).is_ok(),
        "READY=1 before the control socket listens"
    );
    ensure!(ready.contains("STATUS=waiting for containerd"), "{ready}");
    // WATCHDOG=1 every 100 ms: at least 3 within half a second more.
    let started = Instant::now();
    for _ in 0..3 {
        expect(&socket, "WATCHDOG=1", Duration::from_millis(600))?;
    }
    ensure!(started.elapsed() < Duration::from_secs(2));

    containerd.resume().await?;
    let connected = expect(
        &socket,
        "STATUS=connected to containerd",
        Duration::from_secs(10),
    )?;
    ensure!(connected.contains("1.6"), "{connected}");
    containerd.stop()?;
    expect(&socket, "is away", Duration::from_secs(10))?;

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()?;
    ensure!(status.success());
    expect(&socket, "STOPPING=1", Duration::from_secs(10))?;
    ensure!(child.wait()?.success());
    Ok(())
}
