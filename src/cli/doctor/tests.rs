//! Unit tests of the checks, on a temp dir as the host.

use super::report::wrap_into;
use super::*;
use crate::config::{DEFAULT_IMAGES_DIR, RKE2_IMAGES_DIR, RKE2_PIN};
use crate::engine::{Origin, K3S_PIN};

fn v(major: u64, minor: u64, patch: u64, prerelease: bool) -> Option<ContainerdVersion> {
    Some(ContainerdVersion {
        major,
        minor,
        patch,
        prerelease,
    })
}

#[test]
fn versions_parse_as_containerd_and_distributions_write_them() {
    let cases = [
        ("v1.7.24", v(1, 7, 24, false)),
        ("1.7.24", v(1, 7, 24, false)),
        ("1.6.20~ds1", v(1, 6, 20, false)),
        ("1.7.24~ds1", v(1, 7, 24, false)),
        ("2.1.9+unknown", v(2, 1, 9, false)),
        ("v2.0.0-rc.1", v(2, 0, 0, true)),
        ("v2.0.0-beta.2", v(2, 0, 0, true)),
        ("v1.7.0-alpha.1", v(1, 7, 0, true)),
        ("1.7.10-RC.0", v(1, 7, 10, true)),
        ("v2.1.0-dev", v(2, 1, 0, true)),
        ("v1.7.23-k3s2", v(1, 7, 23, false)),
        ("v1.6.8-k3s1", v(1, 6, 8, false)),
        ("v1.7.24-15-g1a2b3c4", v(1, 7, 24, false)),
        ("1.7.12-0ubuntu2~22.04.1", v(1, 7, 12, false)),
        ("  v1.6.25\n", v(1, 6, 25, false)),
        ("1.7", v(1, 7, 0, false)),
        ("2", v(2, 0, 0, false)),
        ("V1.6.22", v(1, 6, 22, false)),
        (
            "containerd github.com/containerd/containerd v1.7.24 88bf19b2",
            v(1, 7, 24, false),
        ),
        (
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3",
            v(1, 6, 20, false),
        ),
        (
            "containerd github.com/containerd/containerd/v2 2.1.9+unknown ",
            v(2, 1, 9, false),
        ),
        ("", None),
        ("unknown", None),
        ("v", None),
        ("1..2", None),
        ("1.6.", None),
        ("1.6x", None),
        ("1.2.3.4", None),
        ("-1.6.20", None),
        ("99999999999999999999999.1", None),
    ];
    for (text, expected) in cases {
        assert_eq!(parse_version(text), expected, "{text:?}");
    }
}

#[test]
fn gates_follow_facts_section_4() {
    use PinSupport::*;
    let cases = [
        ("1.5.18", Ignored),
        ("0.9.0", Ignored),
        ("1.6.0", Ignored),
        ("1.6.20~ds1", Ignored),
        ("1.6.21", Ignored),
        ("1.6.22-rc.0", Ignored),
        ("1.6.22", AfterRestart),
        ("1.6.24", AfterRestart),
        ("1.6.25-rc.1", AfterRestart),
        ("1.6.25", Full),
        ("1.6.38", Full),
        ("1.7.0", Ignored),
        ("1.7.2", Ignored),
        ("v1.7.3-beta.0", Ignored),
        ("v1.7.3", AfterRestart),
        ("1.7.9-k3s1", AfterRestart),
        ("1.7.10-rc.0", AfterRestart),
        ("1.7.10", Full),
        ("v1.7.23-k3s2", Full),
        ("1.7.24~ds1", Full),
        ("1.8.0", Full),
        ("v2.0.0-rc.1", Full),
        ("2.0.0", Full),
        ("2.1.9+unknown", Full),
        ("3.0.0", Full),
    ];
    for (text, expected) in cases {
        let parsed = parse_version(text).unwrap();
        assert_eq!(pin_support(&parsed), expected, "{text}");
    }
}

#[test]
fn verdicts_say_what_each_gate_means() {
    let (status, detail, fix) = version_verdict("1.6.20~ds1", "containerd at /s");
    assert_eq!(status, Status::Fail);
    assert!(detail.contains("does not honour") && detail.contains("1.29"));
    assert!(detail.contains("1.6.20~ds1"), "{detail}");
    assert!(fix.contains("upgrade"));

    let (status, detail, fix) = version_verdict("v1.7.5", "containerd at /s");
    assert_eq!(status, Status::Warn);
    assert!(
        detail.contains("a pin pinkeeper restores only takes effect after containerd restarts"),
        "{detail}"
    );
    assert!(detail.contains("1.29") && fix.contains("restart K3s"));

    let (status, detail, fix) = version_verdict("2.1.9+unknown", "containerd at /s");
    assert_eq!(status, Status::Ok);
    assert!(detail.contains("2.1.9+unknown") && detail.contains("1.29"));
    assert!(fix.is_empty());

    let (status, detail, _) = version_verdict("weird", "containerd at /s");
    assert_eq!(status, Status::Warn);
    assert!(detail.contains("\"weird\""));
}

fn touch(root: &Path, node_path: &str) {
    let path = root.join(node_path.trim_start_matches('/'));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"").unwrap();
}

fn mkdir(root: &Path, node_path: &str) {
    std::fs::create_dir_all(root.join(node_path.trim_start_matches('/'))).unwrap();
}

#[test]
fn programs_are_found_under_a_root() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    assert_eq!(detect_programs(r, None), Programs::default());

    mkdir(r, "/var/lib/rancher/k3s/agent/images");
    touch(r, "/etc/systemd/system/k3s.service");
    touch(r, "/usr/local/bin/k3s");
    let found = detect_programs(r, Some(OsStr::new("/usr/local/bin:/usr/bin:relative")));
    assert_eq!(
        found.k3s,
        vec![
            "/var/lib/rancher/k3s",
            "/usr/local/bin/k3s",
            "/etc/systemd/system/k3s.service"
        ]
    );
    assert!(found.rke2.is_empty());

    // RKE2 from PATH and a packaged unit; /lib is a link to /usr/lib (merged /usr):
    // the unit is listed once.
    touch(r, "/opt/tools/rke2");
    touch(r, "/usr/lib/systemd/system/rke2-agent.service");
    std::os::unix::fs::symlink(r.join("usr/lib"), r.join("lib")).unwrap();
    let found = detect_programs(r, Some(OsStr::new("/opt/tools")));
    assert_eq!(
        found.rke2,
        vec!["/opt/tools/rke2", "/lib/systemd/system/rke2-agent.service"]
    );
    assert_eq!(found.k3s.len(), 3);
    // not a file: a directory named like the binary does not count
    let other = tempfile::tempdir().unwrap();
    mkdir(other.path(), "/usr/local/bin/k3s");
    assert_eq!(detect_programs(other.path(), None), Programs::default());
}

fn settings(dir: &Path) -> DoctorSettings {
    DoctorSettings {
        containerd_socket: dir.join("containerd.sock"),
        namespace: "k8s.io".into(),
        images_dir: dir.join("images"),
        state_dir: dir.join("state"),
        control_socket: dir.join("pk.sock"),
        program: Program::K3s,
    }
}

fn k3s_defaults() -> DoctorSettings {
    DoctorSettings {
        containerd_socket: K3S_SOCKET.into(),
        namespace: "k8s.io".into(),
        images_dir: DEFAULT_IMAGES_DIR.into(),
        state_dir: "/var/lib/pinkeeper".into(),
        control_socket: "/run/pinkeeper/pinkeeper.sock".into(),
        program: Program::K3s,
    }
}

fn rke2_defaults() -> DoctorSettings {
    DoctorSettings {
        images_dir: RKE2_IMAGES_DIR.into(),
        program: Program::Rke2,
        ..k3s_defaults()
    }
}

#[test]
fn program_check_compares_with_pinkeepers_settings() {
    let k3s = Programs {
        k3s: vec!["/var/lib/rancher/k3s".into()],
        rke2: vec![],
    };
    let rke2 = Programs {
        k3s: vec![],
        rke2: vec!["/usr/local/bin/rke2".into()],
    };
    let both = Programs {
        k3s: k3s.k3s.clone(),
        rke2: rke2.rke2.clone(),
    };
    let check = check_program(&k3s_defaults(), &k3s);
    assert_eq!(check.status, Status::Ok, "{check:?}");
    assert!(check.detail.contains(K3S_PIN) && check.fix.is_empty());

    let mut custom = k3s_defaults();
    custom.images_dir = "/srv/k3s/agent/images".into();
    let check = check_program(&custom, &k3s);
    assert_eq!(check.status, Status::Warn);
    assert!(check.detail.contains("--data-dir"), "{check:?}");

    let check = check_program(&k3s_defaults(), &rke2);
    assert_eq!(check.status, Status::Fail);
    assert!(check.detail.contains(RKE2_PIN) && check.detail.contains(RKE2_IMAGES_DIR));
    assert!(check.detail.contains("/usr/local/bin/rke2"));
    assert!(check.fix.contains("--program rke2"), "{check:?}");
    assert!(check.fix.contains(RKE2_IMAGES_DIR), "{check:?}");

    assert_eq!(check_program(&k3s_defaults(), &both).status, Status::Warn);
    let check = check_program(&k3s_defaults(), &Programs::default());
    assert_eq!(check.status, Status::Warn);
    assert!(check.detail.contains("neither"));
    assert!(check.detail.contains("--program k3s"), "{check:?}");
}

#[test]
fn program_check_follows_the_configured_program() {
    let k3s = Programs {
        k3s: vec!["/var/lib/rancher/k3s".into()],
        rke2: vec![],
    };
    let rke2 = Programs {
        k3s: vec![],
        rke2: vec!["/var/lib/rancher/rke2".into()],
    };
    // RKE2 set and installed: fine.
    let check = check_program(&rke2_defaults(), &rke2);
    assert_eq!(check.status, Status::Ok, "{check:?}");
    assert!(check.detail.contains(RKE2_PIN) && check.detail.contains("--program rke2"));
    assert!(check.fix.is_empty());
    // RKE2 set with K3s's images dir: the dir is compared with RKE2's default.
    let mut k3s_dir = rke2_defaults();
    k3s_dir.images_dir = DEFAULT_IMAGES_DIR.into();
    let check = check_program(&k3s_dir, &rke2);
    assert_eq!(check.status, Status::Warn);
    assert!(check.detail.contains(RKE2_IMAGES_DIR), "{check:?}");
    // RKE2 set, K3s installed: fails, says to switch back.
    let check = check_program(&rke2_defaults(), &k3s);
    assert_eq!(check.status, Status::Fail, "{check:?}");
    assert!(check.detail.contains("K3s is installed") && check.detail.contains(K3S_PIN));
    assert!(check.fix.contains("--program k3s"), "{check:?}");
    // An explicit images dir is the operator's: the fix does not claim to change it.
    let mut custom = rke2_defaults();
    custom.images_dir = "/srv/images".into();
    let check = check_program(&custom, &k3s);
    assert!(!check.fix.contains("images directory"), "{check:?}");
    // Both: a warning naming the one set.
    let both = Programs {
        k3s: k3s.k3s.clone(),
        rke2: rke2.rke2.clone(),
    };
    let check = check_program(&rke2_defaults(), &both);
    assert_eq!(check.status, Status::Warn);
    assert!(check.fix.contains("running one is RKE2") && check.fix.contains("--program k3s"));
}

fn intent(name: &str, state: IntentState) -> Intent {
    Intent {
        name: name.into(),
        digest: Some("sha256:abc".into()),
        source: None,
        pins: Default::default(),
        legacy_labels: None,
        state,
        origin: Origin::SeenPinned,
        since: 1,
        restores: 0,
        last_restored: None,
        released_because: None,
        k3s_pinned: false,
    }
}

fn record(name: &str, labels: &[(&str, &str)]) -> ImageRecord {
    ImageRecord {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        digest: Some("sha256:abc".into()),
    }
}

#[test]
fn at_risk_is_held_or_swept_and_unpinned_or_gone() {
    let intents = [
        intent("pinned", IntentState::Held),
        intent("swept", IntentState::Swept),
        intent("held-unpinned", IntentState::Held),
        intent("released", IntentState::Released),
        intent("gone", IntentState::Held),
        intent("lookalike", IntentState::Held),
    ];
    let images = [
        record("pinned", &[(CRI_PIN, PINNED)]),
        record("swept", &[("io.cri-containerd.image", "managed")]),
        record("held-unpinned", &[(K3S_PIN, PINNED)]),
        record("released", &[]),
        // the look-alike label does nothing (FACTS.md section 1)
        record("lookalike", &[("io.cri.containerd.pinned", PINNED)]),
    ];
    let risk = at_risk(&intents, &images);
    assert_eq!(risk.held, 5);
    assert_eq!(risk.unpinned, vec!["held-unpinned", "lookalike", "swept"]);
    assert_eq!(risk.gone, vec!["gone"]);
}

#[test]
fn report_json_shape_and_exit_code() {
    let mut report = Report {
        checks: vec![
            Check::new("containerd", Status::Ok, "fine"),
            Check::new("ledger", Status::Warn, "no ledger").fix("start it"),
        ],
    };
    assert_eq!(report.exit_code(), 0);
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "version": 1,
            "status": "warn",
            "checks": [
                {"name": "containerd", "status": "ok", "detail": "fine", "fix": ""},
                {"name": "ledger", "status": "warn", "detail": "no ledger", "fix": "start it"}
            ]
        })
    );
    report
        .checks
        .push(Check::new("at-risk", Status::Fail, "a:\n  - x").fix("reconcile"));
    assert_eq!(report.exit_code(), 1);
    assert_eq!(report.status(), Status::Fail);
    let text = report.to_table();
    assert!(
        text.starts_with("ok     containerd\n       fine\n"),
        "{text}"
    );
    assert!(text.contains("WARN   ledger\n       no ledger\n       fix: start it\n"));
    assert!(
        text.contains("FAIL   at-risk\n       a:\n         - x\n"),
        "{text}"
    );
    assert!(text.ends_with("1 failed, 1 warning(s), 1 ok\n"), "{text}");
    assert_eq!(Report::default().exit_code(), 0);
}

#[test]
fn text_wraps_and_keeps_list_items_indented() {
    let long = "word ".repeat(60);
    let detail = format!("{long}\n  - {long}");
    let mut out = String::new();
    wrap_into(&mut out, "       ", "fix: ", &detail);
    for line in out.lines() {
        assert!(line.chars().count() <= TEXT_WIDTH, "{line:?}");
        assert!(line.starts_with("       "), "{line:?}");
    }
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("       fix: word"));
    assert!(lines[1].starts_with("            word"));
    let item = lines.iter().position(|l| l.contains("- word")).unwrap();
    assert!(lines[item].starts_with("              - word"), "{out}");
    assert!(lines[item + 1].starts_with("                word"), "{out}");
    // a word longer than the width stays whole on its own line
    let mut out = String::new();
    wrap_into(&mut out, "", "", &format!("a {} b", "x".repeat(200)));
    assert_eq!(out.lines().count(), 3);
    // nor is a list item split from its marker
    let mut out = String::new();
    let long = "x".repeat(200);
    wrap_into(&mut out, "   ", "", &format!("names:\n  - {long}"));
    assert_eq!(out, format!("   names:\n     - {long}\n"));
}

fn host(root: &Path) -> Host {
    Host {
        root: root.to_path_buf(),
        path_var: None,
    }
}

fn status_of(report: &Report, name: &str) -> Status {
    report
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name} check in {report:?}"))
        .status
}

fn check<'a>(report: &'a Report, name: &str) -> &'a Check {
    report.checks.iter().find(|c| c.name == name).unwrap()
}

#[tokio::test]
async fn a_bare_node_without_daemon_or_containerd() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let report = examine_on(&s, Err("not wired".into()), &host(dir.path())).await;
    let names: Vec<_> = report.checks.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            "control-socket",
            "containerd",
            "images-dir",
            "ledger",
            "program",
            "at-risk",
            "kubelet",
            "disk"
        ]
    );
    assert_eq!(status_of(&report, "control-socket"), Status::Warn);
    assert!(check(&report, "control-socket")
        .detail
        .contains("not wired"));
    assert_eq!(status_of(&report, "kubelet"), Status::Warn);
    let containerd = check(&report, "containerd");
    assert_eq!(containerd.status, Status::Fail);
    assert!(
        containerd.detail.contains("does not exist"),
        "{containerd:?}"
    );
    assert!(containerd.fix.contains("systemctl status k3s"));
    assert_eq!(status_of(&report, "images-dir"), Status::Warn);
    assert_eq!(status_of(&report, "ledger"), Status::Warn);
    assert_eq!(status_of(&report, "program"), Status::Warn);
    assert_eq!(status_of(&report, "at-risk"), Status::Warn);
    assert_eq!(report.exit_code(), 1);
    // The doctor creates nothing.
    assert!(!s.state_dir.exists());
    for check in &report.checks {
        assert_eq!(
            check.fix.is_empty(),
            check.status == Status::Ok,
            "{check:?}"
        );
    }
}

#[tokio::test]
async fn a_refusing_socket_and_a_broken_archive() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    // A socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&s.containerd_socket).unwrap());
    std::fs::create_dir_all(&s.images_dir).unwrap();
    std::fs::write(s.images_dir.join("broken.tar.gz"), b"not gzip").unwrap();
    std::fs::write(s.images_dir.join("notes.md"), b"ignored").unwrap();
    let report = examine_on(&s, Err("x".into()), &host(dir.path())).await;
    let containerd = check(&report, "containerd");
    assert!(containerd.detail.contains("refuses"), "{containerd:?}");
    let images = check(&report, "images-dir");
    assert_eq!(images.status, Status::Warn);
    assert!(images.detail.contains("broken.tar.gz"), "{images:?}");
    assert!(
        images.detail.contains("1 file(s) K3s imports"),
        "{images:?}"
    );

    std::fs::remove_dir_all(&s.images_dir).unwrap();
    std::fs::write(&s.images_dir, b"a file").unwrap();
    let report = examine_on(&s, Err("x".into()), &host(dir.path())).await;
    assert_eq!(status_of(&report, "images-dir"), Status::Fail);
}

#[tokio::test]
async fn the_ledger_read_busy_and_broken() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    {
        let mut ledger = Ledger::open(&s.state_dir).unwrap();
        let a = intent("a", IntentState::Held);
        let b = intent("b", IntentState::Swept);
        let c = intent("c", IntentState::Released);
        ledger
            .apply(&[
                crate::ledger::Change::Save(&a),
                crate::ledger::Change::Save(&b),
                crate::ledger::Change::Save(&c),
            ])
            .unwrap();
    }
    let report = examine_on(&s, Err("x".into()), &host(dir.path())).await;
    let ledger = check(&report, "ledger");
    assert_eq!(ledger.status, Status::Ok);
    assert!(
        ledger
            .detail
            .contains("1 intent(s) held, 1 swept by K3s and not restored yet, 1 released"),
        "{ledger:?}"
    );
    // containerd is not there: the at-risk check cannot be made
    let risk = check(&report, "at-risk");
    assert_eq!(risk.status, Status::Warn);
    assert!(risk.detail.contains("containerd cannot be reached"));

    {
        let _held = Ledger::open(&s.state_dir).unwrap();
        let report = examine_on(&s, Err("x".into()), &host(dir.path())).await;
        let ledger = check(&report, "ledger");
        assert_eq!(ledger.status, Status::Ok);
        assert!(ledger.detail.contains("in use by a running pinkeeper"));
        assert!(check(&report, "at-risk")
            .detail
            .contains("holds the ledger"));
    }

    std::fs::write(s.state_dir.join(FILE_NAME), b"garbage, not a database").unwrap();
    let report = examine_on(&s, Err("x".into()), &host(dir.path())).await;
    let ledger = check(&report, "ledger");
    assert_eq!(ledger.status, Status::Fail);
    assert!(ledger.detail.contains("ledger.redb"), "{ledger:?}");
    assert!(ledger.fix.contains("move the file aside"), "{ledger:?}");
    assert_eq!(report.exit_code(), 1);
}

#[tokio::test]
async fn the_daemons_view_is_used_when_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let view = DaemonView {
        connected: true,
        containerd_version: "1.7.5".into(),
        ledger_path: "/var/lib/pinkeeper/ledger.redb".into(),
        intents_held: 4,
        at_risk: vec!["docker.io/library/db:2".into()],
        ledger_problem: String::new(),
        ledger_recovered: String::new(),
        cri: Default::default(),
    };
    let report = examine_on(&s, Ok(view.clone()), &host(dir.path())).await;
    assert_eq!(status_of(&report, "control-socket"), Status::Ok);
    let ledger = check(&report, "ledger");
    assert_eq!(ledger.status, Status::Ok);
    assert!(ledger.detail.contains("/var/lib/pinkeeper/ledger.redb"));
    assert!(ledger.detail.contains("4 intent(s)"));
    let risk = check(&report, "at-risk");
    assert_eq!(risk.status, Status::Fail);
    assert!(risk.detail.contains("docker.io/library/db:2"));
    assert!(risk.fix.contains("pinkeeper reconcile"));
    // The doctor cannot reach containerd, the daemon can: its version's gate applies.
    let containerd = check(&report, "containerd");
    assert_eq!(containerd.status, Status::Fail);
    assert!(containerd.detail.contains("1.7.5") && containerd.detail.contains("restarts"));

    let quiet = DaemonView {
        connected: false,
        at_risk: vec![],
        ..view
    };
    let report = examine_on(&s, Ok(quiet), &host(dir.path())).await;
    assert_eq!(status_of(&report, "control-socket"), Status::Warn);
    assert!(check(&report, "control-socket")
        .detail
        .contains("not connected to containerd"));
    assert_eq!(status_of(&report, "at-risk"), Status::Ok);
}

#[test]
fn many_names_are_cut_at_twenty() {
    let names: Vec<String> = (0..25).map(|i| format!("img{i:02}")).collect();
    let list = name_list(&names);
    assert_eq!(
        list.lines().filter(|l| l.starts_with("  - img")).count(),
        20
    );
    assert!(list.ends_with("\n  - and 5 more"));
}

#[test]
fn settings_come_from_the_config_file_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "state_dir = \"/srv/pk\"\nnamespace = \"other\"\n").unwrap();
    let args = DoctorArgs {
        node: NodeArgs {
            config: Some(config.clone()),
            namespace: Some("k8s.io".into()),
            ..NodeArgs::default()
        },
        control_socket: None,
        json: false,
    };
    let s = args.settings().unwrap();
    assert_eq!(s.state_dir, PathBuf::from("/srv/pk"));
    assert_eq!(s.namespace, "k8s.io");
    assert_eq!(s.containerd_socket, PathBuf::from(K3S_SOCKET));
    assert_eq!(s.program, Program::K3s);
    assert_eq!(s.images_dir, PathBuf::from(DEFAULT_IMAGES_DIR));
    let mut rke2 = args.clone();
    rke2.node.program = Some("rke2".into());
    let s = rke2.settings().unwrap();
    assert_eq!(s.program, Program::Rke2);
    assert_eq!(s.images_dir, PathBuf::from(RKE2_IMAGES_DIR));
    std::fs::write(&config, "program = \"rke2\"\n").unwrap();
    assert_eq!(args.settings().unwrap().program, Program::Rke2);
    let mut missing = args.clone();
    missing.node.config = Some(dir.path().join("missing.toml"));
    assert!(missing.settings().is_err());
    let mut bad = args;
    bad.node.containerd_socket = Some("relative".into());
    assert!(bad.settings().is_err());
}
