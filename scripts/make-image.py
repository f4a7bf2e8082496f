#!/usr/bin/env python3
"""Builds pinkeeper's own container image offline (`make image`): an OCI image layout archive
that K3s imports from its images directory like any air-gap image, with no docker daemon and
no registry. Python's standard library only; `zstd` (Debian's) for the .tar.zst.

    scripts/make-image.py BINARY OUT_DIR VERSION REVISION

The one layer holds the binary and exactly the shared libraries it loads (as `ldd` lists them,
from the build host), with an /etc/passwd for root; the entrypoint is `pinkeeper`, its command
`run`. Everything is written byte for byte reproducibly (mtime 0, sorted, uid 0): the same
binary gives the same image digest. Writes OUT_DIR/pinkeeper-VERSION-amd64.tar and .tar.zst and
prints the image name and the archive sizes.
"""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

NAME = "docker.io/pinkeeper/pinkeeper"
SOURCE = "https://github.com/pinkeeper/pinkeeper"


def libraries(binary):
    """The shared objects `binary` loads, as (path in the image, path on this host)."""
    out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            host = parts[parts.index("=>") + 1]
        elif parts and parts[0].startswith("/"):
            host = parts[0]
        else:
            continue  # linux-vdso.so.1: the kernel's
        if not host.startswith("/"):
            sys.exit(f"make-image: ldd cannot find a library of {binary}: {line.strip()}")
        found.append((host, os.path.realpath(host)))
    return found


def add_file(tar, name, data, mode=0o644):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar, name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.mtime = 0
    tar.addfile(info)


def layer(binary):
    """The layer's tar (uncompressed)."""
    files = {"usr/bin/pinkeeper": (open(binary, "rb").read(), 0o755)}
    for in_image, host in libraries(binary):
        files[in_image.lstrip("/")] = (open(host, "rb").read(), 0o755)
    files["etc/passwd"] = (b"root:x:0:0:root:/root:/usr/sbin/nologin\n", 0o644)
    files["etc/group"] = (b"root:x:0:\n", 0o644)
    dirs = set()
    for name in files:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    # Where the daemon's state and sockets go (mounted from the host in the DaemonSet).
    dirs.update({"run", "tmp", "var", "var/lib", "var/lib/pinkeeper"})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for d in sorted(dirs):
            add_dir(tar, d)
        for name in sorted(files):
            data, mode = files[name]
            add_file(tar, name, data, mode)
    return buf.getvalue()


def blob(blobs, media_type, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    binary, out_dir, version, revision = sys.argv[1:]
    if not os.path.isfile(binary):
        sys.exit(f"make-image: {binary} does not exist; run `cargo build --release` first")
    # PINKEEPER_IMAGE_FAST=1 (the tests, with a debug binary of 150 MB): quicker, larger.
    fast = os.environ.get("PINKEEPER_IMAGE_FAST") == "1"
    raw = layer(binary)
    gz = gzip.compress(raw, compresslevel=1 if fast else 9, mtime=0)
    blobs = {}
    layer_desc = blob(blobs, "application/vnd.oci.image.layer.v1.tar+gzip", gz)
    annotations = {
        "org.opencontainers.image.title": "pinkeeper",
        "org.opencontainers.image.description":
            "Keeps K3s's air-gap images pinned after their archives are deleted",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.source": SOURCE,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/usr/bin/pinkeeper"],
            "Cmd": ["run"],
            "Labels": annotations,
        },
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
        "history": [{"created_by": "scripts/make-image.py"}],
    }
    config_desc = blob(blobs, "application/vnd.oci.image.config.v1+json",
                       json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
        "annotations": annotations,
    }
    manifest_desc = blob(blobs, "application/vnd.oci.image.manifest.v1+json",
                         json.dumps(manifest, sort_keys=True).encode())
    reference = f"{NAME}:{version}"
    # containerd's importer (K3s's) names the image by io.containerd.image.name; other tools
    # read the OCI tag.
    manifest_desc["annotations"] = {
        "io.containerd.image.name": reference,
        "org.opencontainers.image.ref.name": version,
    }
    manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [manifest_desc]}

    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"pinkeeper-{version}-amd64.tar")
    with tarfile.open(out + ".part", mode="w", format=tarfile.USTAR_FORMAT) as tar:
        add_file(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add_file(tar, "index.json", json.dumps(index, sort_keys=True).encode())
        add_dir(tar, "blobs")
        add_dir(tar, "blobs/sha256")
        for digest in sorted(blobs):
            add_file(tar, "blobs/sha256/" + digest.split(":", 1)[1], blobs[digest])
    os.replace(out + ".part", out)
    level = "-3" if fast else "-19"
    subprocess.run(["zstd", "-q", "-f", level, out, "-o", out + ".zst"], check=True)
    print(f"image {reference} ({manifest_desc['digest']})")
    for path in (out, out + ".zst"):
        print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
