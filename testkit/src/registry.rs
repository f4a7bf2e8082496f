//! A private image registry for the tests: Debian's `docker-registry` (distribution 2.8) on a
//! loopback port, and a push of a [`TestImage`] through the registry's HTTP API (no docker, no
//! client library: a few HTTP/1.1 requests over a TCP stream). CRI pulls from `localhost:PORT`
//! over plain HTTP (FACTS.md section 3a).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::archive::TestImage;

/// Debian's registry binary (`scripts/install-deps.sh` installs the package).
pub const REGISTRY: &str = "/usr/bin/docker-registry";

/// How long the registry may take to answer after it starts.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// An HTTP answer: status, headers (names in lower case), body as text.
type Answer = (u16, Vec<(String, String)>, String);

/// A running registry; stopped (killed) when dropped.
pub struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts one on a free loopback port, storing under a temp dir, and waits until it
    /// answers `GET /v2/`.
    pub fn start() -> Result<Registry> {
        ensure!(
            std::path::Path::new(REGISTRY).exists(),
            "{REGISTRY} is missing: run scripts/install-deps.sh as root (Debian's docker-registry)"
        );
        let mut last = None;
        // A port found free may be taken before the registry binds it: try another.
        for _ in 0..3 {
            match Registry::start_once() {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("the registry did not start")))
    }

    fn start_once() -> Result<Registry> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let dir = tempfile::Builder::new()
            .prefix("pkreg")
            .tempdir_in("/tmp")?;
        let config = dir.path().join("config.yml");
        let storage: PathBuf = dir.path().join("storage");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )?;
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {REGISTRY}"))?;
        let mut registry = Registry {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok((200, _, _)) = registry.request("GET", "/v2/", &[], &[]) {
                return Ok(registry);
            }
            if let Some(status) = registry.child.try_wait()? {
                bail!("{REGISTRY} exited at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("{REGISTRY} did not answer on 127.0.0.1:{port} within {START_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `localhost:PORT`, the host part of the references to pull.
    pub fn host(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// Pushes `image` as `repository:tag` (its layers, config and OCI manifest); returns the
    /// manifest's digest.
    pub fn push(&self, repository: &str, tag: &str, image: &TestImage) -> Result<String> {
        let blobs = image.blobs()?;
        for blob in blobs.layers.iter().chain([&blobs.config]) {
            let (status, headers, body) = self.request(
                "POST",
                &format!("/v2/{repository}/blobs/uploads/"),
                &[],
                &[],
            )?;
            ensure!(status == 202, "start of an upload: {status} {body}");
            let location = header(&headers, "location").context("an upload's location")?;
            let path = location
                .split_once("://")
                .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_string()))
                .unwrap_or(location);
            let sep = if path.contains('?') { '&' } else { '?' };
            let (status, _, body) = self.request(
                "PUT",
                &format!("{path}{sep}digest={}", blob.digest),
                &[("Content-Type", "application/octet-stream")],
                &blob.data,
            )?;
            ensure!(status == 201, "upload of {}: {status} {body}", blob.digest);
        }
        let (status, _, body) = self.request(
            "PUT",
            &format!("/v2/{repository}/manifests/{tag}"),
            &[("Content-Type", blobs.manifest.media_type.as_str())],
            &blobs.manifest.data,
        )?;
        ensure!(
            status == 201,
            "manifest of {repository}:{tag}: {status} {body}"
        );
        Ok(blobs.manifest.digest)
    }

    /// One HTTP/1.1 request: (status, headers, body as text).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Answer> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.port,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP status line: {line:?}"))?;
        let mut found = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                found.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest)?;
        Ok((status, found, String::from_utf8_lossy(&rest).into_owned()))
    }
}

fn header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
