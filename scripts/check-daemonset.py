#!/usr/bin/env python3
"""Checks packaging/kubernetes/daemonset.yaml: every document against the Kubernetes JSON
schemas (kubernetes-validate, strict: an unknown or misspelt field fails), then what the
README promises about it (the mounts, the security context, the scheduling).

Run by `make test` with the venv that scripts/install-deps.sh makes:
    /var/cache/pinkeeper/python/bin/python scripts/check-daemonset.py [FILE]
kubernetes-validate bundles its schemas: no network is needed.
"""

import os
import sys

import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FILE = os.path.join(HERE, "..", "packaging", "kubernetes", "daemonset.yaml")
# The oldest Kubernetes whose kubelet honours the pin (1.29, FACTS.md section 4), and the newest
# schema the package has.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]

# Values the schemas leave as free strings, which the API server would refuse.
HOST_PATH_TYPES = {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket",
                   "CharDevice", "BlockDevice"}
PROPAGATIONS = {"None", "HostToContainer", "Bidirectional"}

results = []


def check(what, ok, detail=""):
    results.append((what, bool(ok), detail))


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_FILE
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]

    for version in VERSIONS:
        for doc in docs:
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                check(f"schema {version} {name}", True)
            except kubernetes_validate.ValidationError as e:
                check(f"schema {version} {name}", False, f"{'.'.join(map(str, e.path))}: {e.message}")

    kinds = {d["kind"]: d for d in docs}
    check("documents are a Namespace and a DaemonSet", sorted(kinds) == ["DaemonSet", "Namespace"],
          sorted(kinds))
    ns = kinds.get("Namespace", {})
    ds = kinds.get("DaemonSet", {})
    namespace = ns.get("metadata", {}).get("name")
    check("namespace is pinkeeper-system", namespace == "pinkeeper-system", namespace)
    check("DaemonSet lives in that namespace", ds.get("metadata", {}).get("namespace") == namespace)
    check("namespace admits hostPath volumes (Pod Security: privileged)",
          ns.get("metadata", {}).get("labels", {}).get("pod-security.kubernetes.io/enforce")
          == "privileged")

    spec = ds.get("spec", {})
    template = spec.get("template", {})
    pod = template.get("spec", {})
    selector = spec.get("selector", {}).get("matchLabels", {})
    labels = template.get("metadata", {}).get("labels", {})
    check("selector matches the pod's labels",
          selector and all(labels.get(k) == v for k, v in selector.items()), (selector, labels))

    check("priorityClassName is system-node-critical",
          pod.get("priorityClassName") == "system-node-critical")
    check("hostPID is false", pod.get("hostPID") is False)
    check("no host network", not pod.get("hostNetwork"))
    tolerations = pod.get("tolerations", [])

    def tolerates(key, effect):
        for t in tolerations:
            if t.get("effect") not in (None, effect):
                continue
            if t.get("operator") == "Exists" and t.get("key") in (None, key):
                return True
        return False

    check("tolerates control-plane nodes",
          tolerates("node-role.kubernetes.io/control-plane", "NoSchedule")
          and tolerates("CriticalAddonsOnly", "NoExecute"), tolerations)

    containers = pod.get("containers", [])
    check("one container", len(containers) == 1)
    c = containers[0] if containers else {}
    command = c.get("command", []) + c.get("args", [])
    check("runs `pinkeeper run`",
          len(command) >= 2 and os.path.basename(command[0]) == "pinkeeper" and command[1] == "run",
          command)
    check("image is the one `make image` builds, never pulled",
          c.get("image") == "docker.io/pinkeeper/pinkeeper:0.1.0"
          and c.get("imagePullPolicy") == "IfNotPresent", c.get("image"))
    resources = c.get("resources", {})
    for kind in ("requests", "limits"):
        for res in ("cpu", "memory"):
            check(f"resources.{kind}.{res} set", res in resources.get(kind, {}))
    sc = c.get("securityContext", {})
    check("runAsUser 0", sc.get("runAsUser") == 0)
    check("readOnlyRootFilesystem", sc.get("readOnlyRootFilesystem") is True)
    check("allowPrivilegeEscalation false", sc.get("allowPrivilegeEscalation") is False)
    check("not privileged", not sc.get("privileged"))
    check("capabilities: drop ALL, add none",
          sc.get("capabilities", {}).get("drop") == ["ALL"]
          and not sc.get("capabilities", {}).get("add"))

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    check("every mount has a volume", set(mounts) <= set(volumes), set(mounts) - set(volumes))
    check("every volume is mounted", set(volumes) <= set(mounts), set(volumes) - set(mounts))
    for v in volumes.values():
        if "hostPath" in v:
            check(f"volume {v['name']}: hostPath type is valid",
                  v["hostPath"].get("type", "") in HOST_PATH_TYPES, v["hostPath"].get("type"))
    for m in mounts.values():
        check(f"mount {m['name']}: mountPropagation is valid",
              m.get("mountPropagation", "None") in PROPAGATIONS, m.get("mountPropagation"))

    def host_mount(host_path):
        """The (volume, mount) of `host_path`, mounted at the same path."""
        for name, v in volumes.items():
            if v.get("hostPath", {}).get("path") == host_path:
                m = mounts.get(name, {})
                return v, m if m.get("mountPath") == host_path else None
        return None, None

    v, m = host_mount("/run/k3s/containerd")
    check("containerd's socket directory is mounted (the directory: it survives restarts)",
          v and m and v["hostPath"].get("type") == "Directory", (v, m))
    check("containerd's directory follows the host's mounts (HostToContainer)",
          m and m.get("mountPropagation") == "HostToContainer", m)
    check("no socket file is mounted by itself",
          not any(str(x.get("hostPath", {}).get("path", "")).endswith(".sock")
                  or x.get("hostPath", {}).get("type") == "Socket" for x in volumes.values()))
    v, m = host_mount("/var/lib/rancher/k3s/agent/images")
    check("the images directory is mounted read-only",
          v and m and m.get("readOnly") is True and v["hostPath"].get("type") == "Directory",
          (v, m))
    v, m = host_mount("/var/lib/pinkeeper")
    check("the state directory is a hostPath, DirectoryOrCreate, writable",
          v and m and v["hostPath"].get("type") == "DirectoryOrCreate" and not m.get("readOnly"),
          (v, m))
    control = [m for m in mounts.values() if m.get("mountPath") == "/run/pinkeeper"]
    check("the control socket's directory /run/pinkeeper is mounted writable (emptyDir or hostPath)",
          len(control) == 1 and not control[0].get("readOnly")
          and ({"emptyDir", "hostPath"} & set(volumes[control[0]["name"]])), control)

    failed = [r for r in results if not r[1]]
    for what, ok, detail in results:
        if not ok:
            print(f"FAIL {what}: {detail}")
    print(f"daemonset: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
