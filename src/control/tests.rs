//! Unit tests of `control`.

use super::*;
use pinkeeper_proto::prost::Message as _;

#[test]
fn patterns() {
    assert!(matches("", "docker.io/library/a:1"));
    assert!(matches("library/a", "docker.io/library/a:1"));
    assert!(!matches("library/b", "docker.io/library/a:1"));
    assert!(matches("*/a:*", "docker.io/library/a:1"));
    assert!(matches("docker.io/*", "docker.io/library/a:1"));
    assert!(!matches("docker.io/*:2", "docker.io/library/a:1"));
    assert!(matches("*a:?", "docker.io/library/a:1"));
    assert!(!matches("a:?", "docker.io/library/a:1"));
    assert!(matches("**", ""));
}

#[test]
fn stale_socket_is_replaced_and_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/pk.sock");
    let first = bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Live: refused, and the socket is left alone.
    match bind(&path) {
        Err(ControlError::InUse { peer, .. }) => assert!(peer.contains("pid")),
        other => panic!("expected InUse, got {other:?}"),
    }
    // Stale: the listener is gone, the file stays (as after kill -9).
    drop(first);
    assert!(path.exists());
    bind(&path).unwrap();
    // Not a socket.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(bind(&file), Err(ControlError::NotASocket { .. })));
}

fn header(len: u32) -> Vec<u8> {
    let mut h = len.to_be_bytes().to_vec();
    h.extend_from_slice(&[0, 0, 0, 1, 1, 0]);
    h
}

#[test]
fn frames_over_the_limit_are_found_at_their_header_in_any_chunking() {
    // Two small frames, then one announcing 4 MiB: fed whole, and a byte at a time.
    let mut wire = header(3);
    wire.extend_from_slice(b"abc");
    wire.extend(header(MAX_FRAME));
    wire.extend(std::iter::repeat_n(7u8, MAX_FRAME as usize));
    let small = wire.len();
    wire.extend(header(4 << 20));
    wire.extend_from_slice(b"junk");
    let mut whole = FrameCheck::default();
    assert_eq!(whole.feed(&wire[..small]), Ok(()));
    assert_eq!(whole.feed(&wire[small..]), Err(4 << 20));
    assert_eq!(whole.feed(b"more"), Err(4 << 20), "stays refused");
    let mut bytewise = FrameCheck::default();
    let mut refused_at = None;
    for (at, b) in wire.iter().enumerate() {
        if bytewise.feed(std::slice::from_ref(b)).is_err() {
            refused_at = Some(at);
            break;
        }
    }
    assert_eq!(
        refused_at,
        Some(small + ttrpc::proto::MESSAGE_HEADER_LENGTH - 1)
    );
}

#[test]
fn a_throttle_logs_once_per_interval_with_a_count() {
    let mut t = Throttle::default();
    let start = Instant::now();
    assert_eq!(t.tick(start), Some(0));
    for ms in 1..1000 {
        assert_eq!(t.tick(start + Duration::from_millis(ms)), None);
    }
    assert_eq!(t.tick(start + LOG_INTERVAL), Some(999));
    assert_eq!(t.tick(start + LOG_INTERVAL), None);
}

fn info(name: &str) -> pb::IntentInfo {
    pb::IntentInfo {
        name: name.to_string(),
        digest: format!("sha256:{:064}", 7),
        state: "held".into(),
        archive: "present".into(),
        source: format!("/var/lib/rancher/k3s/agent/images/{name}.tar"),
        why: "seen pinned; imported by K3s from a file".into(),
        ..Default::default()
    }
}

/// What the daemon does with a ListPage, over a name-ordered map like the engine's.
fn page_of(
    intents: &std::collections::BTreeMap<String, pb::IntentInfo>,
    req: &pb::ListRequest,
) -> pb::ListResponse {
    let page = ListPage::new(req);
    let taken = intents
        .values()
        .filter(|i| matches(&req.pattern, &i.name) && page.takes(&i.name))
        .cloned()
        .collect();
    page.answer(taken)
}

#[test]
fn list_pages_cover_100000_intents_once_each_in_order_under_the_frame_limit() {
    let mut intents: std::collections::BTreeMap<String, pb::IntentInfo> = (0..100_000)
        .map(|n| format!("registry.example/team/app-{n:06}:1"))
        .map(|n| (n.clone(), info(&n)))
        .collect();
    // Unpaged (a client from before paging): everything at once, as before.
    let all = page_of(&intents, &pb::ListRequest::default());
    assert_eq!(all.intents.len(), 100_000);
    assert!(all.next_page_token.is_empty());

    let mut req = pb::ListRequest {
        page_size: LIST_PAGE,
        ..Default::default()
    };
    let mut listed = Vec::new();
    let mut pages = 0;
    loop {
        let page = page_of(&intents, &req);
        pages += 1;
        assert!(page.intents.len() <= LIST_PAGE as usize);
        assert!(page.encoded_len() < ttrpc::proto::MESSAGE_LENGTH_MAX / 2);
        listed.extend(page.intents.iter().map(|i| i.name.clone()));
        if pages == 50 {
            // Between pages: one added before the cursor, one after, one removed ahead.
            for n in [
                "registry.example/team/app-000000:0",
                "registry.example/zzz:1",
            ] {
                intents.insert(n.into(), info(n));
            }
            intents.remove("registry.example/team/app-099999:1");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    assert_eq!(pages, 100);
    let mut want: Vec<String> = (0..99_999)
        .map(|n| format!("registry.example/team/app-{n:06}:1"))
        .collect();
    want.push("registry.example/zzz:1".into());
    assert_eq!(listed, want, "every name once, in order");
}

#[test]
fn list_pages_are_capped_in_count_and_bytes() {
    let big = "x".repeat(100_000);
    let intents: std::collections::BTreeMap<String, pb::IntentInfo> = (0..40)
        .map(|n| format!("{n:02}"))
        .map(|n| {
            let mut i = info(&n);
            i.why = big.clone();
            (n, i)
        })
        .collect();
    let req = pb::ListRequest {
        page_size: 1_000_000,
        ..Default::default()
    };
    let page = page_of(&intents, &req);
    assert!(page.encoded_len() <= LIST_PAGE_BYTES + 200_000);
    assert!(page.intents.len() < 40 && !page.intents.is_empty());
    assert_eq!(page.next_page_token, page.intents.last().unwrap().name);
    // A pattern pages the same way.
    let req = pb::ListRequest {
        pattern: "1".into(),
        page_size: 3,
        ..Default::default()
    };
    let page = page_of(&intents, &req);
    let names: Vec<&str> = page.intents.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["01", "10", "11"]);
    assert_eq!(page.next_page_token, "11");
}
