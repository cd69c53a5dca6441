"""The container image builds and runs here, with no registry: a Debian 12 base made with
debootstrap, imported into podman, the multi-stage Containerfile built on it (build isolation
chroot: this machine's OCI runtime cannot create cgroups), then `userproxy --help` and
`userproxy demo` run inside the image's file system (chroot into a container's mount, for
the same reason). Skipped where podman or debootstrap is missing or not root."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE, IMAGE = "localhost/userproxy-test-base:12", "localhost/userproxy:test"
CA = Path("/etc/ssl/certs/ca-certificates.crt")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("podman") and shutil.which("debootstrap")),
    reason="needs root, podman and debootstrap",
)


def run(*argv: str, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True, **kw)  # type: ignore[call-overload,no-any-return]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    rootfs = tmp_path_factory.mktemp("rootfs")
    try:
        run("debootstrap", "--variant=minbase", "bookworm", str(rootfs),
            "http://deb.debian.org/debian")  # fmt: skip
        # What a base image does not need: downloaded packages, indexes, docs, translations.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                     "usr/share/man", "usr/share/locale"):  # fmt: skip
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        with tar.stdout:
            run("podman", "import", "-", BASE, stdin=tar.stdout)
        tar.wait(60)
        build = ["podman", "build", "--isolation=chroot", "--build-arg", f"BASE={BASE}",
                 "-f", "examples/kind/Containerfile", "-t", IMAGE]  # fmt: skip
        if CA.exists():  # a TLS-intercepting proxy's CA, for pip inside the build
            build += ["-v", f"{CA}:/run/build-ca.crt:ro"]
        run(*build, ".", timeout=900, cwd=ROOT)
        yield IMAGE
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(["podman", "rmi", "-f", IMAGE, BASE], capture_output=True, check=False)
        subprocess.run(["podman", "image", "prune", "-f"], capture_output=True, check=False)


def inside(image: str, *argv: str) -> str:
    """Run a command in the image's file system (a container's writable mount, with /proc)."""
    container = run("podman", "create", image).stdout.strip()
    try:
        mount = run("podman", "mount", container).stdout.strip()
        try:
            script = f"mount -t proc proc {mount}/proc && exec chroot {mount} " + " ".join(argv)
            return run("unshare", "-m", "sh", "-c", script, timeout=120).stdout
        finally:
            run("podman", "umount", container)
    finally:
        run("podman", "rm", container)


def test_the_image_runs_the_cli_and_the_demo(image: str) -> None:
    assert "userproxy [OPTIONS] COMMAND" in inside(image, "/opt/userproxy/bin/userproxy", "--help")
    demo = inside(image, "/opt/userproxy/bin/userproxy", "demo")
    assert "backend-1: 3, backend-2: 3, backend-3: 3" in demo


def test_the_image_is_small_and_has_no_compiler(image: str) -> None:
    size = int(run("podman", "image", "inspect", image, "--format", "{{.Size}}").stdout)
    assert size < 220 * 1024 * 1024, f"the image is {size / 2**20:.0f} MiB"
    assert "gcc" not in inside(image, "sh", "-c", "'ls /usr/bin | grep -x gcc || true'")
    tools = inside(image, "sh", "-c", "'for t in iptables nft conntrack; do command -v $t; done'")
    assert len(tools.split()) == 3
