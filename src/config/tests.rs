//! Unit tests of `config`.

use super::*;

#[test]
fn defaults_when_nothing_given() {
    let s = Settings::resolve(None, Overrides::default()).unwrap();
    assert_eq!(
        s.containerd_socket,
        PathBuf::from(DEFAULT_CONTAINERD_SOCKET)
    );
    assert_eq!(s.namespace, "k8s.io");
    assert_eq!(s.images_dir, PathBuf::from(DEFAULT_IMAGES_DIR));
}

#[test]
fn flags_win_over_the_file() {
    let file: FileConfig =
        toml::from_str("namespace = \"other\"\nstate_dir = \"/srv/pk\"").unwrap();
    let flags = Overrides {
        namespace: Some("k8s.io".into()),
        ..Overrides::default()
    };
    let s =
        Settings::resolve(Some((Path::new("/etc/pinkeeper/config.toml"), file)), flags).unwrap();
    assert_eq!(s.namespace, "k8s.io");
    assert_eq!(s.state_dir, PathBuf::from("/srv/pk"));
}

#[test]
fn bad_values_name_their_source() {
    let file: FileConfig = toml::from_str("namespace = \"bad..ns\"").unwrap();
    let err = Settings::resolve(Some((Path::new("/etc/p.toml"), file)), Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("namespace in /etc/p.toml"), "{err}");
    let flags = Overrides {
        containerd_socket: Some("relative.sock".into()),
        ..Overrides::default()
    };
    let err = Settings::resolve(None, flags).unwrap_err().to_string();
    assert!(err.starts_with("--containerd-socket"), "{err}");
}

#[test]
fn unknown_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "containerd_sockett = \"/x\"\n").unwrap();
    let err = FileConfig::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("containerd_sockett") && err.contains("c.toml"),
        "{err}"
    );
}

fn file(text: &str) -> FileConfig {
    toml::from_str(text).unwrap()
}

fn from_file(text: &str) -> Result<Settings, ConfigError> {
    Settings::resolve(
        Some((Path::new("/etc/pinkeeper/config.toml"), file(text))),
        Overrides::default(),
    )
}

fn error(result: Result<Settings, ConfigError>) -> String {
    result.unwrap_err().to_string()
}

#[test]
fn new_keys_have_their_defaults() {
    let s = Settings::resolve(None, Overrides::default()).unwrap();
    assert_eq!(s.program, Program::K3s);
    assert_eq!(s.program.label(), "io.cattle.k3s.pinned");
    assert_eq!(
        s.program.label(),
        crate::engine::Config::default().program_label
    );
    assert_eq!(s.log_format, LogFormat::Text);
    assert_eq!(s.metrics_textfile, None);
    assert_eq!(s.metrics_address, None);
    assert_eq!(s.settle_ms, DEFAULT_SETTLE_MS);
    assert_eq!(s.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(s.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
}

#[test]
fn rke2_switches_the_label_and_the_images_dir_but_not_the_socket() {
    let s = from_file("program = \"rke2\"").unwrap();
    assert_eq!(s.program, Program::Rke2);
    assert_eq!(s.program.label(), "io.cattle.rke2.pinned");
    assert_eq!(
        s.images_dir,
        PathBuf::from("/var/lib/rancher/rke2/agent/images")
    );
    assert_eq!(
        s.containerd_socket,
        PathBuf::from("/run/k3s/containerd/containerd.sock")
    );
    let flags = Overrides {
        program: Some("rke2".into()),
        ..Overrides::default()
    };
    let s = Settings::resolve(None, flags).unwrap();
    assert_eq!(s.images_dir, PathBuf::from(RKE2_IMAGES_DIR));
    assert_eq!(s.program.as_str(), "rke2");
    assert_eq!(s.program.display_name(), "RKE2");
}

#[test]
fn explicit_paths_win_over_the_programs_defaults() {
    let s = from_file(
        "program = \"rke2\"\nimages_dir = \"/srv/rke2/agent/images\"\n\
             containerd_socket = \"/run/other/containerd.sock\"",
    )
    .unwrap();
    assert_eq!(s.images_dir, PathBuf::from("/srv/rke2/agent/images"));
    assert_eq!(
        s.containerd_socket,
        PathBuf::from("/run/other/containerd.sock")
    );
    // The flag's program gives the default, the file's explicit dir still wins over it.
    let flags = Overrides {
        program: Some("k3s".into()),
        ..Overrides::default()
    };
    let s = Settings::resolve(
        Some((
            Path::new("/etc/p.toml"),
            file("program = \"rke2\"\nimages_dir = \"/srv/images\""),
        )),
        flags,
    )
    .unwrap();
    assert_eq!(s.program, Program::K3s);
    assert_eq!(s.images_dir, PathBuf::from("/srv/images"));
}

#[test]
fn program_flag_wins_and_bad_programs_are_named() {
    let flags = Overrides {
        program: Some("k3s".into()),
        ..Overrides::default()
    };
    let s = Settings::resolve(
        Some((Path::new("/etc/p.toml"), file("program = \"rke2\""))),
        flags,
    )
    .unwrap();
    assert_eq!(s.program, Program::K3s);
    assert_eq!(s.images_dir, PathBuf::from(DEFAULT_IMAGES_DIR));

    let err = error(from_file("program = \"RKE2\""));
    assert!(
        err.starts_with("program in /etc/pinkeeper/config.toml \"RKE2\": expected k3s or rke2"),
        "{err}"
    );
    let flags = Overrides {
        program: Some("k8s".into()),
        ..Overrides::default()
    };
    let err = error(Settings::resolve(None, flags));
    assert!(err.starts_with("--program \"k8s\""), "{err}");
}

#[test]
fn log_format_from_file_and_flag() {
    assert_eq!(
        from_file("log_format = \"json\"").unwrap().log_format,
        LogFormat::Json
    );
    let flags = Overrides {
        log_format: Some("text".into()),
        ..Overrides::default()
    };
    let s = Settings::resolve(
        Some((Path::new("/etc/p.toml"), file("log_format = \"json\""))),
        flags,
    )
    .unwrap();
    assert_eq!(s.log_format, LogFormat::Text);

    let err = error(from_file("log_format = \"logfmt\""));
    assert!(
        err.starts_with(
            "log_format in /etc/pinkeeper/config.toml \"logfmt\": expected text or json"
        ),
        "{err}"
    );
    let flags = Overrides {
        log_format: Some("JSON".into()),
        ..Overrides::default()
    };
    assert!(error(Settings::resolve(None, flags)).starts_with("--log-format \"JSON\""));
}

#[test]
fn metrics_textfile_from_file_and_flag() {
    let s = from_file("metrics_textfile = \"/var/lib/node_exporter/pinkeeper.prom\"").unwrap();
    assert_eq!(
        s.metrics_textfile,
        Some(PathBuf::from("/var/lib/node_exporter/pinkeeper.prom"))
    );
    let flags = Overrides {
        metrics_textfile: Some("/srv/textfile/pk.prom".into()),
        ..Overrides::default()
    };
    let s = Settings::resolve(
        Some((
            Path::new("/etc/p.toml"),
            file("metrics_textfile = \"/var/lib/node_exporter/pinkeeper.prom\""),
        )),
        flags,
    )
    .unwrap();
    assert_eq!(
        s.metrics_textfile,
        Some(PathBuf::from("/srv/textfile/pk.prom"))
    );

    for bad in [
        "pinkeeper.prom",
        "textfile/pinkeeper.prom",
        "/var/lib/node_exporter/pinkeeper.txt",
        "/var/lib/node_exporter/.prom",
        "/var/lib/node_exporter/",
        "",
    ] {
        let err = error(from_file(&format!("metrics_textfile = \"{bad}\"")));
        assert!(
            err.starts_with("metrics_textfile in /etc/pinkeeper/config.toml")
                && err.contains(".prom"),
            "{bad}: {err}"
        );
        let flags = Overrides {
            metrics_textfile: Some(bad.into()),
            ..Overrides::default()
        };
        let err = error(Settings::resolve(None, flags));
        assert!(err.starts_with("--metrics-textfile"), "{bad}: {err}");
    }
    // A directory named like a textfile, and a file where its directory should be.
    let dir = tempfile::tempdir().unwrap();
    let named_dir = dir.path().join("looks.prom");
    std::fs::create_dir(&named_dir).unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"").unwrap();
    for bad in [named_dir, not_a_dir.join("pk.prom")] {
        let flags = Overrides {
            metrics_textfile: Some(bad.clone()),
            ..Overrides::default()
        };
        let err = error(Settings::resolve(None, flags));
        assert!(err.starts_with("--metrics-textfile"), "{err}");
        assert!(err.contains("directory"), "{err}");
    }
}

#[test]
fn metrics_address_is_loopback_only() {
    let s = from_file("metrics_address = \"127.0.0.1:9977\"").unwrap();
    assert_eq!(s.metrics_address, Some("127.0.0.1:9977".parse().unwrap()));
    for good in ["[::1]:9977", "127.0.0.53:1"] {
        let flags = Overrides {
            metrics_address: Some(good.into()),
            ..Overrides::default()
        };
        let s = Settings::resolve(None, flags).unwrap();
        assert_eq!(s.metrics_address, Some(good.parse().unwrap()));
    }
    let flags = Overrides {
        metrics_address: Some("[::1]:9100".into()),
        ..Overrides::default()
    };
    let s = Settings::resolve(
        Some((
            Path::new("/etc/p.toml"),
            file("metrics_address = \"127.0.0.1:9977\""),
        )),
        flags,
    )
    .unwrap();
    assert_eq!(s.metrics_address, Some("[::1]:9100".parse().unwrap()));

    for (bad, says) in [
        ("0.0.0.0:9977", "loopback"),
        ("10.0.0.5:9977", "loopback"),
        ("[::]:9977", "loopback"),
        ("[::ffff:127.0.0.1]:9977", "loopback"),
        ("localhost:9977", "IP:PORT"),
        ("127.0.0.1", "IP:PORT"),
        ("127.0.0.1:99999", "IP:PORT"),
        ("127.0.0.1:0", "port"),
    ] {
        let flags = Overrides {
            metrics_address: Some(bad.into()),
            ..Overrides::default()
        };
        let err = error(Settings::resolve(None, flags));
        assert!(
            err.starts_with(&format!("--metrics-address {bad:?}")) && err.contains(says),
            "{bad}: {err}"
        );
        let err = error(from_file(&format!("metrics_address = \"{bad}\"")));
        assert!(
            err.starts_with("metrics_address in /etc/pinkeeper/config.toml"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn every_key_parses_from_one_file() {
    let s = from_file(
        "containerd_socket = \"/run/k3s/containerd/containerd.sock\"\n\
             namespace = \"k8s.io\"\n\
             images_dir = \"/var/lib/rancher/rke2/agent/images\"\n\
             state_dir = \"/var/lib/pinkeeper\"\n\
             control_socket = \"/run/pinkeeper/pinkeeper.sock\"\n\
             settle_ms = 3000\n\
             program = \"rke2\"\n\
             log_format = \"json\"\n\
             metrics_textfile = \"/var/lib/node_exporter/textfile_collector/pinkeeper.prom\"\n\
             metrics_address = \"127.0.0.1:9977\"\n",
    )
    .unwrap();
    assert_eq!(s.program, Program::Rke2);
    assert_eq!(s.log_format, LogFormat::Json);
    assert!(s.metrics_textfile.is_some() && s.metrics_address.is_some());
}

#[test]
fn unknown_and_mistyped_new_keys_are_named() {
    for (text, names) in [
        ("programme = \"rke2\"", "programme"),
        ("log-format = \"json\"", "log-format"),
        ("metrics_port = 9977", "metrics_port"),
        ("metrics_address = 9977", "metrics_address"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let err = FileConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains(names) && err.contains("c.toml"), "{err}");
    }
}

#[test]
fn the_default_config_file_is_read_only_when_it_exists() {
    let dir = tempfile::tempdir().unwrap();
    let default = dir.path().join("config.toml");
    // None there: the defaults apply.
    assert!(FileConfig::find_with_default(None, &default)
        .unwrap()
        .is_none());
    // There: read.
    std::fs::write(&default, "program = \"rke2\"\n").unwrap();
    let (path, file) = FileConfig::find_with_default(None, &default)
        .unwrap()
        .unwrap();
    assert_eq!(path, default);
    assert_eq!(file.program.as_deref(), Some("rke2"));
    // There and broken: an error naming it, never a silent fallback to the defaults.
    std::fs::write(&default, "program = rke2\n").unwrap();
    let err = FileConfig::find_with_default(None, &default)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.toml"), "{err}");
    std::fs::remove_file(&default).unwrap();
    std::fs::create_dir(&default).unwrap();
    assert!(FileConfig::find_with_default(None, &default).is_err());
    // --config wins over the default file, and must exist.
    let explicit = dir.path().join("explicit.toml");
    std::fs::write(&explicit, "log_format = \"json\"\n").unwrap();
    let (path, file) = FileConfig::find_with_default(Some(&explicit), &default)
        .unwrap()
        .unwrap();
    assert_eq!(path, explicit);
    assert_eq!(file.log_format.as_deref(), Some("json"));
    let missing = dir.path().join("missing.toml");
    let err = FileConfig::find_with_default(Some(&missing), &default)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("cannot read the config file") && err.contains("missing.toml"),
        "{err}"
    );
}

#[cfg(test)]
mod hostile_tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    fn error(result: Result<Settings, ConfigError>) -> String {
        result.unwrap_err().to_string()
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn a_fifo_a_directory_or_a_device_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("config.toml");
        mkfifo(&fifo);
        // No writer ever opens the FIFO: a blocking open would never return.
        let err = FileConfig::load(&fifo).unwrap_err().to_string();
        assert!(
            err.contains("is a FIFO") && err.contains("config.toml"),
            "{err}"
        );
        // The same when it is the default file.
        let err = FileConfig::find_with_default(None, &fifo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a FIFO"), "{err}");
        let err = FileConfig::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
        let err = FileConfig::load(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a device"), "{err}");
    }

    #[test]
    fn a_huge_or_binary_config_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let err = FileConfig::load(&big).unwrap_err().to_string();
        assert!(err.contains("bytes"), "{err}");
        let binary = dir.path().join("bin.toml");
        std::fs::write(&binary, b"program = \"k3s\"\n\xff\xfe").unwrap();
        let err = FileConfig::load(&binary).unwrap_err().to_string();
        assert!(
            err.contains("not UTF-8") && err.contains("bin.toml"),
            "{err}"
        );
    }

    #[test]
    fn a_nul_byte_in_any_path_is_refused_naming_the_key() {
        for key in [
            "state_dir",
            "images_dir",
            "containerd_socket",
            "control_socket",
            "metrics_textfile",
        ] {
            let text = format!("{key} = \"/var/lib/pk\\u0000x.prom\"\n");
            let file: FileConfig = toml::from_str(&text).unwrap();
            let err = error(Settings::resolve(
                Some((Path::new("/etc/pinkeeper/config.toml"), file)),
                Overrides::default(),
            ));
            assert!(
                err.starts_with(&format!("{key} in /etc/pinkeeper/config.toml"))
                    && err.contains("NUL byte"),
                "{key}: {err}"
            );
        }
        // A flag cannot carry one from a shell, but an exec can be given any OsString.
        let flags = Overrides {
            state_dir: Some(PathBuf::from(OsString::from_vec(b"/var/\0lib".to_vec()))),
            ..Overrides::default()
        };
        let err = error(Settings::resolve(None, flags));
        assert!(
            err.starts_with("--state-dir") && err.contains("NUL"),
            "{err}"
        );
    }

    #[test]
    fn other_bad_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "").unwrap();
        let long = format!("/{}", "s".repeat(MAX_SOCKET_PATH));
        let cases: Vec<(Overrides, &str, &str)> = vec![
            (
                Overrides {
                    state_dir: Some("".into()),
                    ..Overrides::default()
                },
                "--state-dir",
                "absolute",
            ),
            (
                Overrides {
                    state_dir: Some("var/lib/pinkeeper".into()),
                    ..Overrides::default()
                },
                "--state-dir",
                "absolute",
            ),
            (
                Overrides {
                    control_socket: Some(long.into()),
                    ..Overrides::default()
                },
                "--control-socket",
                "107 bytes",
            ),
            (
                Overrides {
                    control_socket: Some("/".into()),
                    ..Overrides::default()
                },
                "--control-socket",
                "unix socket",
            ),
            (
                Overrides {
                    control_socket: Some("/run/pinkeeper/".into()),
                    ..Overrides::default()
                },
                "--control-socket",
                "unix socket",
            ),
            (
                Overrides {
                    state_dir: Some(file.join("state")),
                    ..Overrides::default()
                },
                "--state-dir",
                "is not a directory",
            ),
            (
                Overrides {
                    state_dir: Some(PathBuf::from(DEFAULT_IMAGES_DIR).join("pinkeeper")),
                    ..Overrides::default()
                },
                "--state-dir",
                "inside the images directory",
            ),
            (
                Overrides {
                    state_dir: Some(format!("{DEFAULT_IMAGES_DIR}/./").into()),
                    ..Overrides::default()
                },
                "--state-dir",
                "inside the images directory",
            ),
        ];
        for (flags, starts, says) in cases {
            let err = error(Settings::resolve(None, flags));
            assert!(err.starts_with(starts) && err.contains(says), "{err}");
        }
    }
}

#[test]
fn keep_patterns_come_from_the_file_or_the_flags_and_bad_ones_say_what_to_write() {
    let path = Path::new("/etc/pinkeeper/config.toml");
    let s = Settings::resolve(
        Some((
            path,
            file("keep = [\"registry.local/critical/*\", \"*@sha256:*\"]"),
        )),
        Overrides::default(),
    )
    .unwrap();
    assert_eq!(s.keep, ["registry.local/critical/*", "*@sha256:*"]);
    // The flags replace the file's list.
    let flags = Overrides {
        keep: Some(vec!["docker.io/library/nginx:1.27".into()]),
        ..Overrides::default()
    };
    let s = Settings::resolve(Some((path, file("keep = [\"a.io/x\"]"))), flags).unwrap();
    assert_eq!(s.keep, ["docker.io/library/nginx:1.27"]);
    assert!(Settings::resolve(None, Overrides::default())
        .unwrap()
        .keep
        .is_empty());
    let err = Settings::resolve(
        Some((path, file("keep = [\"nginx:1.27\"]"))),
        Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("keep in /etc/pinkeeper/config.toml \"nginx:1.27\"")
            && err.contains("docker.io/library/nginx:1.27"),
        "{err}"
    );
    let flags = Overrides {
        keep: Some(vec!["".into()]),
        ..Overrides::default()
    };
    let err = Settings::resolve(None, flags).unwrap_err().to_string();
    assert!(err.starts_with("--keep"), "{err}");
    // Not a list: the parser names the key.
    let err = toml::from_str::<FileConfig>("keep = \"docker.io/*\"").unwrap_err();
    assert!(err.to_string().contains("keep"), "{err}");
}
