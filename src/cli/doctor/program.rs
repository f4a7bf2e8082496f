//! Which program runs this node (K3s or RKE2, found on disk) and whether pinkeeper is set to it.

use super::*;

// ---------------------------------------------------------------------------------------------
// K3s or RKE2 on this node

/// What was found of each program on the node, as paths of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Programs {
    pub(super) k3s: Vec<String>,
    pub(super) rke2: Vec<String>,
}

/// Looks for K3s and RKE2 installs under `root` (`/` on a node, a temp dir in tests): data
/// dirs, config dirs, binaries (also on `path_var`, a `PATH` value whose dirs are read under
/// `root`) and systemd units.
pub(super) fn detect_programs(root: &Path, path_var: Option<&OsStr>) -> Programs {
    let under = |node_path: &Path| root.join(node_path.strip_prefix("/").unwrap_or(node_path));
    let mut found = Programs::default();
    // The same file may be reachable by two paths (/lib is /usr/lib on merged-usr systems):
    // it is listed once.
    let mut seen = std::collections::HashSet::new();
    let mut note = |list: &mut Vec<String>, node_path: PathBuf, exists: bool| {
        if !exists {
            return;
        }
        let real = std::fs::canonicalize(under(&node_path)).unwrap_or_else(|_| node_path.clone());
        if seen.insert(real) {
            list.push(node_path.display().to_string());
        }
    };
    for (program, names) in [
        ("k3s", ["k3s.service", "k3s-agent.service"]),
        ("rke2", ["rke2-server.service", "rke2-agent.service"]),
    ] {
        let mut list = Vec::new();
        for dir in ["/var/lib/rancher", "/etc/rancher"] {
            let path = Path::new(dir).join(program);
            let exists = under(&path).is_dir();
            note(&mut list, path, exists);
        }
        let mut bin_dirs: Vec<PathBuf> = vec!["/usr/local/bin".into(), "/opt/rke2/bin".into()];
        if let Some(path_var) = path_var {
            bin_dirs.extend(std::env::split_paths(path_var).filter(|d| d.is_absolute()));
        }
        for dir in bin_dirs {
            let path = dir.join(program);
            let exists = under(&path).is_file();
            note(&mut list, path, exists);
        }
        for dir in [
            "/etc/systemd/system",
            "/usr/local/lib/systemd/system",
            "/lib/systemd/system",
            "/usr/lib/systemd/system",
        ] {
            for unit in names {
                let path = Path::new(dir).join(unit);
                let exists = under(&path).is_file();
                note(&mut list, path, exists);
            }
        }
        match program {
            "k3s" => found.k3s = list,
            _ => found.rke2 = list,
        }
    }
    found
}

pub(super) fn check_program(settings: &DoctorSettings, programs: &Programs) -> Check {
    const NAME: &str = "program";
    let evidence = |list: &[String]| list.join(", ");
    let set = settings.program;
    let other = match set {
        Program::K3s => Program::Rke2,
        Program::Rke2 => Program::K3s,
    };
    let found = |program: Program| match program {
        Program::K3s => &programs.k3s,
        Program::Rke2 => &programs.rke2,
    };
    let name = set.display_name();
    let (label, flag) = (set.label(), set.as_str());
    let (default_dir, default_socket) = (set.default_images_dir(), set.default_containerd_socket());
    let (other_name, other_label, other_dir) = (
        other.display_name(),
        other.label(),
        other.default_images_dir(),
    );
    let socket_note = if settings.containerd_socket == Path::new(default_socket) {
        String::new()
    } else {
        format!(
            " pinkeeper is set to containerd at {}, not {default_socket} (K3s's and RKE2's own \
             containerd): right only if {name} runs with --container-runtime-endpoint or a \
             different containerd.",
            settings.containerd_socket.display()
        )
    };
    let dir_differs = settings.images_dir != Path::new(default_dir);
    match (found(set).is_empty(), found(other).is_empty()) {
        (false, true) => {
            let mut detail = format!(
                "{name} is installed ({}). pinkeeper follows {name}'s sweep of {label}, the label \
                 {name} pins with (--program {flag}).",
                evidence(found(set))
            );
            detail.push_str(&socket_note);
            if dir_differs {
                detail.push_str(&format!(
                    " pinkeeper reads the images directory {}, not {name}'s default \
                     {default_dir}: right only if {name} runs with --data-dir DIR and this is \
                     DIR/agent/images.",
                    settings.images_dir.display()
                ));
            }
            if dir_differs || !socket_note.is_empty() {
                Check::new(NAME, Status::Warn, detail).fix(format!(
                    "make --images-dir and --containerd-socket (images_dir, containerd_socket in \
                     the config) match what {name} uses: <data-dir>/agent/images and \
                     {default_socket} by default"
                ))
            } else {
                Check::new(NAME, Status::Ok, detail)
            }
        }
        (true, false) => {
            let mut fix = format!(
                "run pinkeeper with --program {} (program = \"{}\" in the config file)",
                other.as_str(),
                other.as_str()
            );
            if !dir_differs {
                fix.push_str(&format!(
                    ", which also makes {other_dir} its images directory"
                ));
            }
            Check::new(
                NAME,
                Status::Fail,
                format!(
                    "{other_name} is installed ({}), not {name}, but pinkeeper is set to follow \
                     {name} (--program {flag}). {other_name} pins with {other_label} and imports \
                     from {other_dir}; pinkeeper follows {label} only, so it would take \
                     {other_name}'s startup sweep for an operator's unpin and release its \
                     intents instead of restoring the pins. (Both use the containerd socket \
                     {K3S_SOCKET}.)",
                    evidence(found(other))
                ),
            )
            .fix(fix)
        }
        (false, false) => Check::new(
            NAME,
            Status::Warn,
            format!(
                "both K3s ({}) and RKE2 ({}) are installed. pinkeeper is set to follow {name} \
                 (--program {flag}) and its label {label}; {other_name} pins with {other_label} \
                 and imports from {other_dir}.",
                evidence(&programs.k3s),
                evidence(&programs.rke2)
            ),
        )
        .fix(format!(
            "make sure the running one is {name} (`systemctl status k3s k3s-agent rke2-server \
             rke2-agent`); if it is {other_name}, run pinkeeper with --program {}",
            other.as_str()
        )),
        (true, true) => Check::new(
            NAME,
            Status::Warn,
            format!(
                "neither K3s nor RKE2 is installed in the usual places (/var/lib/rancher/k3s, \
                 /etc/rancher/k3s, /usr/local/bin/k3s or k3s on PATH, k3s.service or \
                 k3s-agent.service, and the same for rke2). pinkeeper is set to follow {name} \
                 (--program {flag}): its label {label}, the images directory {} and the \
                 containerd socket {}.",
                settings.images_dir.display(),
                settings.containerd_socket.display()
            ),
        )
        .fix(
            "run pinkeeper on a K3s or RKE2 node with --program set to it; if it is installed \
             elsewhere, make --images-dir and --containerd-socket match what it uses",
        ),
    }
}
