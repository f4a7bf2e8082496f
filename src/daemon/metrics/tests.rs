//! Unit tests of `daemon/metrics`.

use super::*;
use std::os::unix::fs::MetadataExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn ask(request: &[u8], metrics: &Metrics) -> String {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let limits = HttpLimits {
        max_request: 256,
        ..HttpLimits::default()
    };
    let serving = respond(server, metrics, limits);
    let asking = async {
        client.write_all(request).await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        answer
    };
    let (served, answer) = tokio::join!(serving, asking);
    served.unwrap();
    answer
}

fn split(answer: &str) -> (&str, &str) {
    answer.split_once("\r\n\r\n").unwrap()
}

#[tokio::test]
async fn http_answers_metrics_in_both_formats_and_404_otherwise() {
    let metrics = Metrics::new();
    metrics.pinned(RestoreReason::ArchiveGone);
    let answer = ask(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
            &metrics,
        )
        .await;
    let (head, body) = split(&answer);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains(OPENMETRICS_CONTENT_TYPE), "{head}");
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(
        body.contains("pinkeeper_pins_restored_total{reason=\"archive-gone\"} 1"),
        "{body}"
    );

    let answer = ask(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", &metrics).await;
    let (head, body) = split(&answer);
    assert!(head.contains(TEXT_CONTENT_TYPE), "{head}");
    assert!(!body.contains("# EOF"), "{body}");
    assert!(
        body.contains("# TYPE pinkeeper_pins_restored_total counter"),
        "{body}"
    );

    let answer = ask(b"HEAD /metrics HTTP/1.1\r\n\r\n", &metrics).await;
    let (head, body) = split(&answer);
    assert!(
        head.starts_with("HTTP/1.1 200 OK\r\n") && body.is_empty(),
        "{answer}"
    );

    for (request, status) in [
        (&b"GET / HTTP/1.1\r\n\r\n"[..], "404"),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", "404"),
        (
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "405",
        ),
        (b"GET /metrics\r\n\r\n", "400"),
        (b"hello\r\n\r\n", "400"),
    ] {
        let answer = ask(request, &metrics).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{}: {answer}",
            String::from_utf8_lossy(request)
        );
    }
    // A head that never ends within the limit is refused, not read on.
    let mut long = b"GET /metrics HTTP/1.1\r\n".to_vec();
    long.extend(std::iter::repeat_n(b'a', 1000));
    let answer = ask(&long, &metrics).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
}

#[tokio::test]
async fn a_slow_client_is_dropped_and_others_are_served() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let limits = HttpLimits {
        timeout: Duration::from_millis(200),
        connections: 2,
        ..HttpLimits::default()
    };
    let server = tokio::spawn(serve_http(listener, Arc::new(Metrics::new()), limits));
    // Two clients that send half a request and stall take every slot...
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(address).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        slow.push(s);
    }
    // ... until the timeout closes them; then a real request is answered.
    let started = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(address).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
        .await
        .expect("answered once the slow clients timed out")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(150));
    for mut s in slow {
        let mut rest = Vec::new();
        // Closed by the server: end of stream, nothing answered.
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    server.abort();
}

#[test]
fn the_textfile_is_replaced_whole_with_mode_0644() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pinkeeper.prom");
    write_atomically(&path, b"a 1\n").unwrap();
    let first = std::fs::metadata(&path).unwrap();
    assert_eq!(first.mode() & 0o777, 0o644);
    // A reader that opened the old file keeps reading it whole.
    let mut reader = std::fs::File::open(&path).unwrap();
    write_atomically(&path, b"a 2\nb 3\n").unwrap();
    let mut old = String::new();
    std::io::Read::read_to_string(&mut reader, &mut old).unwrap();
    assert_eq!(old, "a 1\n");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\nb 3\n");
    let second = std::fs::metadata(&path).unwrap();
    assert_ne!(first.ino(), second.ino(), "replaced by a rename");
    assert_eq!(second.mode() & 0o777, 0o644);
    // Nothing left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("pinkeeper.prom")]);
    // A directory that does not exist is named in the error.
    let missing = dir.path().join("nope/pinkeeper.prom");
    let err = write_atomically(&missing, b"x").unwrap_err().to_string();
    assert!(
        err.contains("nope/pinkeeper.prom") && err.contains("--metrics-textfile"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_exporter_writes_on_change_at_most_once_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pinkeeper.prom");
    let metrics = Arc::new(Metrics::new());
    let mut exporter = Exporter::new(metrics.clone(), Some(path.clone()), false);
    exporter.publish(Tally::default);
    let published = tokio::time::Instant::now();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("pinkeeper_containerd_connected 0"), "{text}");
    let ino = std::fs::metadata(&path).unwrap().ino();
    // A change right after: due one second after the last publication.
    metrics.subscribed();
    assert!(!exporter.is_due());
    exporter.due().await;
    assert!(tokio::time::Instant::now() - published >= MIN_INTERVAL);
    assert!(exporter.is_due());
    exporter.publish(Tally::default);
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .contains("pinkeeper_containerd_connected 1"));
    let ino2 = std::fs::metadata(&path).unwrap().ino();
    assert_ne!(ino, ino2);
    // Nothing changed since: never due, no timer.
    assert!(!exporter.is_due());
    assert!(
        tokio::time::timeout(Duration::from_secs(3600), exporter.due())
            .await
            .is_err()
    );
    // A change long after the last publication is due at once.
    metrics.touch();
    let touched = tokio::time::Instant::now();
    exporter.due().await;
    assert_eq!(tokio::time::Instant::now(), touched);
    // A touch that changed no value does not rewrite the file.
    exporter.publish(Tally::default);
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino2);
    // Disabled: never due.
    let off = Exporter::new(Arc::new(Metrics::new()), None, false);
    off.metrics().touch();
    assert!(!off.is_due());
    assert!(tokio::time::timeout(Duration::from_secs(3600), off.due())
        .await
        .is_err());
}

#[test]
fn the_tally_counts_what_the_views_say() {
    use crate::engine::{
        Config, Engine, EventKind, ImageEvent, Input, Intent, IntentState, Labels, Origin, CRI_PIN,
        K3S_PIN, PINNED,
    };
    let intent = |name: &str, state, pins: &[&str]| Intent {
        name: name.into(),
        digest: Some(format!("sha256:{name}").into()),
        source: None,
        // Written as a ledger before 0.x wrote it: read into pins by the engine.
        pins: Default::default(),
        legacy_labels: Some(Box::new(
            pins.iter()
                .map(|k| (k.to_string(), PINNED.to_string()))
                .collect(),
        )),
        state,
        origin: Origin::SeenPinned,
        since: 1,
        restores: 0,
        last_restored: None,
        released_because: None,
        k3s_pinned: false,
    };
    let mut engine = Engine::new(
        Config::default(),
        [
            intent("held-pinned", IntentState::Held, &[CRI_PIN, K3S_PIN]),
            intent("held-unpinned", IntentState::Held, &[K3S_PIN]),
            intent("swept", IntentState::Swept, &[]),
            intent("released", IntentState::Released, &[]),
            intent("deleted", IntentState::Held, &[CRI_PIN]),
        ],
    );
    engine.handle(
        5,
        Input::Event(ImageEvent {
            kind: EventKind::Delete,
            name: "deleted".into(),
            labels: Labels::new(),
        }),
    );
    let views = engine.views();
    let state = |s| views.iter().filter(|v| v.intent.state == s).count();
    let expected = Tally {
        held: state(IntentState::Held),
        swept: state(IntentState::Swept),
        released: state(IntentState::Released),
        at_risk: views.iter().filter(|v| v.at_risk()).count(),
    };
    assert_eq!(engine.tally(), expected);
    // held-unpinned, swept and deleted (still in alias churn's window).
    assert_eq!(expected.at_risk, 3, "{views:#?}");
    let metrics = Metrics::new();
    metrics.count(expected);
    let text = metrics.openmetrics();
    assert!(text.contains("pinkeeper_images_at_risk 3\n"), "{text}");
}

#[test]
fn every_metric_is_there_from_the_start() {
    let metrics = Metrics::new();
    metrics.ledger_observer()(Duration::from_millis(3));
    let text = metrics.openmetrics();
    for line in [
        "pinkeeper_intents{state=\"held\"} 0",
        "pinkeeper_intents{state=\"swept\"} 0",
        "pinkeeper_intents{state=\"released\"} 0",
        "pinkeeper_pins_restored_total{reason=\"archive-gone\"} 0",
        "pinkeeper_pins_restored_total{reason=\"not-repinned\"} 0",
        "pinkeeper_operator_pins_total 0",
        "pinkeeper_sweeps_seen_total{seen=\"live\"} 0",
        "pinkeeper_sweeps_seen_total{seen=\"after-reconnect\"} 0",
        "pinkeeper_images_at_risk 0",
        "pinkeeper_containerd_connected 0",
        "pinkeeper_reconnects_total 0",
        "pinkeeper_last_reconcile_timestamp_seconds 0",
        "pinkeeper_ledger_write_seconds_count 1",
        &format!(
            "pinkeeper_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

/// Every pinkeeper metric the shipped alert rules and the dashboard name is one pinkeeper
/// exports (a renamed metric would leave its alert silent, or its panel empty, for good).
#[test]
fn the_alert_rules_and_the_dashboard_name_only_metrics_pinkeeper_exports() {
    names_only_exported_metrics(include_str!(
        "../../../packaging/prometheus/pinkeeper.rules.yaml"
    ));
    names_only_exported_metrics(include_str!("../../../packaging/grafana/pinkeeper.json"));
}

fn names_only_exported_metrics(rules: &str) {
    let text = Metrics::new().prometheus_text();
    let mut named = 0;
    for (i, _) in rules.match_indices("pinkeeper_") {
        let name: String = rules[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.ends_with('_') {
            continue;
        }
        named += 1;
        assert!(
            text.contains(&format!("\n{name} ")) || text.contains(&format!("\n{name}{{")),
            "{name} is not in pinkeeper's metrics:\n{text}"
        );
    }
    assert!(named >= 3, "{named}");
}

/// An unchanged textfile is rewritten by the watchdog's ping once it is a minute old, never
/// sooner: its age tells a stopped pinkeeper from an idle one (alert PinkeeperTextfileStale).
#[tokio::test(start_paused = true)]
async fn the_heartbeat_rewrites_an_unchanged_textfile_once_a_minute() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pinkeeper.prom");
    let mut exporter = Exporter::new(Arc::new(Metrics::new()), Some(path.clone()), false);
    // Nothing written yet: nothing to keep fresh.
    exporter.heartbeat();
    assert!(!path.exists());
    exporter.publish(Tally::default);
    let ino = std::fs::metadata(&path).unwrap().ino();
    tokio::time::advance(HEARTBEAT - Duration::from_secs(1)).await;
    exporter.heartbeat();
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino, "too soon");
    tokio::time::advance(Duration::from_secs(1)).await;
    exporter.heartbeat();
    let rewritten = std::fs::metadata(&path).unwrap().ino();
    assert_ne!(rewritten, ino, "a minute old: rewritten");
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .contains("pinkeeper_containerd_connected 0"));
    // Idle without a textfile: nothing to do.
    let mut off = Exporter::new(Arc::new(Metrics::new()), None, true);
    off.heartbeat();
}
