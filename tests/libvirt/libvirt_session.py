"""A private libvirt for one test: Debian's ``libvirtd`` in session mode, in its own folder.

Session mode (an unprivileged libvirtd) reads its qemu.conf from ``$XDG_CONFIG_HOME/libvirt``
and keeps its sockets, state and logs under the XDG folders given to it, so a test can set
``save_image_format`` and leave the host's libvirt alone. As root, the daemon and ``virsh``
run as ``nobody`` (root's libvirtd would be the system daemon, with system paths). QEMU
processes libvirt starts are not its children: teardown ends them by the pid files libvirt
writes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

NOBODY = 65534
TIMEOUT = 60.0


class LibvirtSession:
    def __init__(self, save_image_format: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="qmig-libvirt-"))
        self.config = self.root / "config"
        self.runtime = self.root / "run"
        for folder in (self.config / "libvirt", self.runtime, self.root / "cache",
                       self.root / "data", self.root / "home"):  # fmt: skip
            folder.mkdir(parents=True)
        (self.config / "libvirt" / "qemu.conf").write_text(
            f'save_image_format = "{save_image_format}"\n'
        )
        self.as_nobody = os.geteuid() == 0
        if self.as_nobody:
            for path in [self.root, *self.root.rglob("*")]:
                os.chown(path, NOBODY, NOBODY)
        self.log = self.root / "libvirtd.log"
        self.daemon: subprocess.Popen[bytes] | None = None

    def environ(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin") + ":/usr/sbin:/sbin",
            "HOME": str(self.root / "home"),
            "XDG_CONFIG_HOME": str(self.config),
            "XDG_RUNTIME_DIR": str(self.runtime),
            "XDG_CACHE_HOME": str(self.root / "cache"),
            "XDG_DATA_HOME": str(self.root / "data"),
            "LANG": "C",
        }

    def _argv(self, *argv: str) -> list[str]:
        if not self.as_nobody:
            return list(argv)
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        return [*drop, *argv]

    def start(self) -> LibvirtSession:
        binary = shutil.which("libvirtd", path="/usr/sbin:/usr/bin:/sbin")
        assert binary, "libvirtd is not installed (scripts/setup installs Debian's libvirt)"
        with self.log.open("wb") as log:
            self.daemon = subprocess.Popen(
                self._argv(binary), env=self.environ(), stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, cwd=self.root,
            )  # fmt: skip
        socket = self.runtime / "libvirt" / "libvirt-sock"
        deadline = time.monotonic() + TIMEOUT
        while not socket.exists():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"libvirtd did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        return self

    def virsh(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            self._argv("virsh", "--quiet", "-c", "qemu:///session", *args),
            env=self.environ(), capture_output=True, text=True, timeout=TIMEOUT, cwd=self.root,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def give(self, path: Path) -> Path:
        """Let the daemon's user (and its QEMU) read and write ``path``."""
        if self.as_nobody:
            os.chown(path, NOBODY, NOBODY)
        return path

    def qemu_pid_files(self) -> list[Path]:
        return list((self.runtime / "libvirt" / "qemu" / "run").glob("*.pid"))

    def close(self) -> None:
        for pid_file in self.qemu_pid_files():
            self.virsh("destroy", pid_file.stem, check=False)
        for pid_file in self.qemu_pid_files():  # still there: libvirt could not end it
            with contextlib.suppress(ValueError, OSError):
                pid = int(pid_file.read_text().strip())
                # Only the QEMU this session started for that domain, never a reused pid.
                if f"guest={pid_file.stem}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(10)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        shutil.rmtree(self.root, ignore_errors=True)
