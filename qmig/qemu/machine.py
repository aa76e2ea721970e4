"""One QEMU process under QMP control: start, configure migration, inspect, always clean up.

A :class:`Machine` is a context manager. Leaving the ``with`` block (normally or by an
exception) asks QEMU to quit and kills it if it does not, so a failed test leaves no process
behind. As a last resort QEMU is started through util-linux ``setpriv --pdeathsig KILL``, so
the kernel kills it if the thread that started it dies (say, pytest killed by a timeout): keep
a Machine in the thread that created it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmig.qemu.guest import GuestSpec, write_disk_image
from qmig.qemu.qmp import QemuError, QmpConnection

QEMU_BINARY = "qemu-system-x86_64"
UNIX_PATH_MAX = 108
# Where scripts/fetch-qemu-VERSION unpacks a QEMU other than the system's, and the variables
# that point qmig at one: QMIG_QEMU_10_0=<binary or wrapper>, QMIG_QEMU_10_0_DIR=<folder>.
PRIVATE_QEMU_DIR = "/opt/qmig-qemu-{version}"
# Inside such a folder (Debian's packages unpacked with dpkg-deb -x): the binary, the firmware
# folders QEMU must search before its built-in /usr/share/qemu (the system QEMU's), and its
# modules (accelerators, devices) that must not be the system QEMU's either.
PRIVATE_BINARY = "usr/bin/qemu-system-x86_64"
PRIVATE_FIRMWARE = ("usr/share/qemu", "usr/share/seabios")
PRIVATE_MODULES = "usr/lib/x86_64-linux-gnu/qemu"
PRIVATE_LIBS = "lib"

# Migration states after which query-migrate will not change any more.
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class QemuInstall:
    """How to run one QEMU: its binary, the arguments that come first, its environment."""

    binary: str
    prefix_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, *args: str) -> list[str]:
        return [self.binary, *self.prefix_args, *args]

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def _variable(version: str) -> str:
    return "QMIG_QEMU_" + version.replace(".", "_")


def qemu_install(version: str | None = None) -> QemuInstall:
    """The QEMU of ``version`` (such as "10.0"): ``$QMIG_QEMU_10_0``, else the folder that
    scripts/fetch-qemu-10.0 fills, else the system's ``qemu-system-x86_64`` if it is that
    version (Debian 12's is 7.2). ``None``: the system's, whatever its version."""
    if version is None:
        return QemuInstall(_system_binary())
    variable = _variable(version)
    if explicit := os.environ.get(variable):
        if not os.access(explicit, os.X_OK):
            raise QemuError(variable, f"{explicit} is not an executable QEMU")
        return QemuInstall(explicit)
    folder = Path(os.environ.get(f"{variable}_DIR") or PRIVATE_QEMU_DIR.format(version=version))
    if (folder / PRIVATE_BINARY).is_file():
        return _private_install(folder)
    system = _system_binary()
    if _reported_version(system).startswith(f"{version}."):
        return QemuInstall(system)
    raise QemuError(
        f"QEMU {version}",
        f"not found: {system} is {_reported_version(system)}, {folder} holds none "
        f"(scripts/fetch-qemu-{version} fetches it; {variable}=BINARY names one)",
    )


def _system_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise QemuError(QEMU_BINARY, "not found on PATH (Debian: apt-get install qemu-system-x86)")
    return path


@functools.cache
def _reported_version(binary: str) -> str:
    """ "7.2.22" from a binary's ``--version`` ("QEMU emulator version 7.2.22 (Debian ...)")."""
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    words = result.stdout.split()
    return words[3] if words[:3] == ["QEMU", "emulator", "version"] and len(words) > 3 else "?"


def _private_install(folder: Path) -> QemuInstall:
    prefix: list[str] = []
    for firmware in PRIVATE_FIRMWARE:
        prefix += ["-L", str(folder / firmware)]
    env = {"QEMU_MODULE_DIR": str(folder / PRIVATE_MODULES)}
    if (folder / PRIVATE_LIBS).is_dir():  # libraries this machine lacked, fetched beside it
        env["LD_LIBRARY_PATH"] = ":".join(
            filter(None, [str(folder / PRIVATE_LIBS), os.environ.get("LD_LIBRARY_PATH")])
        )
    return QemuInstall(str(folder / PRIVATE_BINARY), tuple(prefix), env)


def qemu_binary(version: str | None = None) -> str:
    return qemu_install(version).binary


def qemu_version(version: str | None = None) -> str:
    """First line of ``qemu-system-x86_64 --version`` for the QEMU :func:`qemu_install` picks."""
    install = qemu_install(version)
    result = subprocess.run(
        install.argv("--version"), capture_output=True, text=True, check=True, env=install.environ()
    )
    return result.stdout.splitlines()[0]


def _short_socket_path(wanted: Path) -> Path:
    # A UNIX socket path must fit in sun_path (108 bytes); deep test folders do not.
    if len(os.fsencode(wanted)) < UNIX_PATH_MAX:
        return wanted
    return Path(tempfile.mkdtemp(prefix="qmig-qmp-")) / wanted.name


def _die_with_parent_prefix() -> list[str]:
    # setpriv sets the parent-death signal and then execs QEMU (same PID); the setting
    # survives exec. Doing it in a preexec_fn instead would run Python code between fork
    # and exec, which is unsafe with the QMP threads around.
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


@dataclass
class MachineConfig:
    """How to start one QEMU. ``guest`` boots qmig's test guest; ``None`` boots nothing."""

    name: str
    memory_mib: int = 128
    guest: GuestSpec | None = field(default_factory=GuestSpec)
    paused: bool = False
    incoming: str | None = None
    extra_args: Sequence[str] = ()
    qemu_version: str | None = None  # which QEMU (qemu_install); None: the system's
    machine_type: str = "pc"


class Machine:
    """A running QEMU (TCG, pc machine, no display) with QMP on a UNIX socket in ``workdir``."""

    def __init__(self, config: MachineConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.name = config.name
        self.qmp_socket = _short_socket_path(workdir / f"{config.name}.qmp")
        self.serial_path = workdir / f"{config.name}.serial"
        self.log_path = workdir / f"{config.name}.log"
        self.disk_path = workdir / f"{config.name}.img"
        self.process: subprocess.Popen[bytes] | None = None
        self._qmp: QmpConnection | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def command_line(self) -> list[str]:
        config = self.config
        args = qemu_install(config.qemu_version).argv(
            "-name", config.name,
            "-machine", f"{config.machine_type},accel=tcg",
            "-m", f"{config.memory_mib}M",
            "-display", "none",
            "-nodefaults",
            "-no-user-config",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-serial", f"file:{self.serial_path}",
        )  # fmt: skip
        if config.guest is not None:
            args += ["-drive", f"file={self.disk_path},format=raw,if=ide"]
        if config.paused:
            args.append("-S")
        if config.incoming is not None:
            args += ["-incoming", config.incoming]
        args += list(config.extra_args)
        return args

    def start(self, timeout: float = 30.0) -> Machine:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_socket.unlink(missing_ok=True)
        if self.config.guest is not None:
            write_disk_image(self.disk_path, self.config.guest)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                _die_with_parent_prefix() + self.command_line(),
                env=qemu_install(self.config.qemu_version).environ(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._qmp = self._connect_qmp(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _connect_qmp(self, timeout: float) -> QmpConnection:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("start")
            if self.qmp_socket.exists():
                try:
                    return QmpConnection(self.qmp_socket, self.name)
                except (OSError, QemuError) as error:
                    last_error: Exception = error
                except Exception as error:  # qemu.qmp wraps connection failures its own way
                    last_error = error
            else:
                last_error = FileNotFoundError(str(self.qmp_socket))
            if time.monotonic() > deadline:
                raise QemuError(self.name, f"QMP did not come up: {last_error}")
            time.sleep(0.02)

    def _check_alive(self, doing: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise QemuError(
                f"{self.name}: {doing}",
                f"QEMU exited with status {self.process.returncode}: {self.log_tail()}",
            )

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask QEMU to quit, then kill it if it is still there; safe to call more than once."""
        if self.process is None:
            return
        try:
            if self._qmp is not None and self.process.poll() is None:
                with contextlib.suppress(QemuError, OSError):
                    self._qmp.execute("quit", timeout=min(timeout, 5.0))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        # The process goes first: closing QMP to a hung QEMU would wait for its answer.
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
        if self._qmp is not None:
            qmp, self._qmp = self._qmp, None
            qmp.close()
        self.qmp_socket.unlink(missing_ok=True)
        if self.qmp_socket.parent.name.startswith("qmig-qmp-"):
            with contextlib.suppress(OSError):
                self.qmp_socket.parent.rmdir()

    def __enter__(self) -> Machine:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.shutdown()

    # --- QMP -------------------------------------------------------------------------------

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command; argument names use ``_`` for QAPI's ``-``."""
        if self._qmp is None:
            raise QemuError(f"{self.name}: {command}", "QEMU is not running")
        self._check_alive(command)
        args = {key.replace("_", "-"): value for key, value in arguments.items()}
        return self._qmp.execute(command, args or None)

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def stop(self) -> None:
        self.qmp("stop")

    def cont(self) -> None:
        self.qmp("cont")

    def set_capabilities(self, **capabilities: bool) -> None:
        """e.g. ``set_capabilities(postcopy_ram=True, postcopy_blocktime=True)``."""
        self.qmp(
            "migrate-set-capabilities",
            capabilities=[
                {"capability": name.replace("_", "-"), "state": state}
                for name, state in capabilities.items()
            ],
        )

    def set_parameters(self, **parameters: Any) -> None:
        """e.g. ``set_parameters(max_bandwidth=16 << 20, max_postcopy_bandwidth=16 << 20)``."""
        self.qmp("migrate-set-parameters", **parameters)

    def migrate(self, uri: str) -> None:
        self.qmp("migrate", uri=uri)

    def migrate_incoming(self, uri: str) -> None:
        """Start listening (QEMU must have been started with ``incoming="defer"``)."""
        self.qmp("migrate-incoming", uri=uri)

    def start_postcopy(self) -> None:
        self.qmp("migrate-start-postcopy")

    def query_migrate(self) -> dict[str, Any]:
        return dict(self.qmp("query-migrate"))

    def incoming_port(self) -> int:
        """The TCP port a deferred ``migrate-incoming tcp:HOST:0`` actually listens on."""
        for address in self.query_migrate().get("socket-address", []):
            if address.get("type") in ("inet", "tcp"):
                return int(address["port"])
        raise QemuError(f"{self.name}: query-migrate", "not listening on a TCP socket")

    def wait_migration(
        self,
        until: Iterable[str] = ("completed",),
        timeout: float = 120.0,
        poll: float = 0.05,
    ) -> dict[str, Any]:
        """Poll query-migrate until its status is in ``until``; a failure raises QemuError."""
        wanted = frozenset(until)
        deadline = time.monotonic() + timeout
        while True:
            info = self.query_migrate()
            status = info.get("status", "none")
            if status in wanted:
                return info
            if status in FINAL_STATES:
                detail = info.get("error-desc", "no error description")
                raise QemuError(f"{self.name}: migration", f"{status}: {detail}")
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: migration", f"still {status} after {timeout:.0f} s")
            time.sleep(poll)

    def wait_runstate(self, wanted: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (status := self.status()) != wanted:
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: query-status", f"{status}, wanted {wanted}")
            time.sleep(0.05)

    def pmemsave(self, address: int, size: int, path: Path) -> bytes:
        """Guest-physical memory ``[address, address+size)``, via a file QEMU writes."""
        path.unlink(missing_ok=True)
        self.qmp("pmemsave", val=address, size=size, filename=str(path))
        return path.read_bytes()

    # --- serial ----------------------------------------------------------------------------

    def serial_output(self) -> bytes:
        try:
            return self.serial_path.read_bytes()
        except FileNotFoundError:
            return b""

    def wait_serial(self, count: int, marker: bytes = b"*", timeout: float = 30.0) -> bytes:
        """Wait until the serial output holds ``count`` markers; return the whole output."""
        deadline = time.monotonic() + timeout
        while (output := self.serial_output()).count(marker) < count:
            self._check_alive("serial")
            if time.monotonic() > deadline:
                raise QemuError(
                    f"{self.name}: serial",
                    f"{output.count(marker)} of {count} markers after {timeout:.0f} s",
                )
            time.sleep(0.05)
        return output


def running_qemu_pids(parent: int | None = None) -> list[int]:
    """PIDs of running qemu-system-x86_64 processes, only the children of ``parent`` if given.

    Tests pass their own PID: other QEMUs on the host (another test run) are not theirs.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "exe")).name != QEMU_BINARY:
                continue
            # The field after the parenthesised command name: state, then the parent's PID.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue  # exited, only waiting to be reaped
            if parent is None or int(fields[1]) == parent:
                pids.append(int(entry.name))
    return pids
