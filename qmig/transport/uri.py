"""Migration URIs in QEMU's syntax: ``tcp:HOST:PORT``, ``unix:PATH`` and ``file:PATH``.

One deliberate difference from QEMU: an empty host (``tcp::4444``) means 127.0.0.1, not every
interface, so a test relay is never reachable from outside by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qmig.errors import TransportError

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class FileAddress:
    path: Path

    def __str__(self) -> str:
        return f"file:{self.path}"


Address = TcpAddress | UnixAddress | FileAddress


def parse_uri(uri: str) -> Address:
    """Parse a migration URI; anything else raises TransportError naming the URI."""
    scheme, sep, rest = uri.partition(":")
    if not sep or not scheme.isalpha():
        raise TransportError(uri, "not a migration URI (want tcp:, unix: or file:)")
    if scheme == "tcp":
        return _parse_tcp(uri, rest)
    if scheme in ("unix", "file"):
        if not rest:
            raise TransportError(uri, "missing path")
        return UnixAddress(Path(rest)) if scheme == "unix" else FileAddress(Path(rest))
    raise TransportError(uri, f"unsupported transport '{scheme}' (want tcp, unix or file)")


def _parse_tcp(uri: str, rest: str) -> TcpAddress:
    if rest.startswith("["):  # [v6-address]:port
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise TransportError(uri, "bad IPv6 address, want tcp:[ADDR]:PORT")
        port_text = port_text[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise TransportError(uri, "missing port, want tcp:HOST:PORT")
    # QEMU accepts options after a comma (e.g. ",ipv4"); qmig does not need them.
    port_text = port_text.split(",", 1)[0]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise TransportError(uri, f"bad port '{port_text}'")
    return TcpAddress(host or LOOPBACK, int(port_text))
