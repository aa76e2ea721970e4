"""Migration URI parsing (QEMU's syntax, with an empty TCP host meaning loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmig.errors import TransportError
from qmig.transport import FileAddress, TcpAddress, UnixAddress, parse_uri


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("tcp:127.0.0.1:4444", TcpAddress("127.0.0.1", 4444)),
        ("tcp::4444", TcpAddress("127.0.0.1", 4444)),  # not every interface, unlike QEMU
        ("tcp:localhost:0", TcpAddress("localhost", 0)),
        ("tcp:[::1]:5555", TcpAddress("::1", 5555)),
        ("tcp:127.0.0.1:4444,ipv4", TcpAddress("127.0.0.1", 4444)),
        ("unix:/tmp/mig.sock", UnixAddress(Path("/tmp/mig.sock"))),
        ("file:/tmp/stream.bin", FileAddress(Path("/tmp/stream.bin"))),
    ],
)
def test_parse_uri(uri: str, address: object) -> None:
    assert parse_uri(uri) == address


@pytest.mark.parametrize(
    ("uri", "detail"),
    [
        ("127.0.0.1:4444", "not a migration URI"),
        ("tcp:127.0.0.1", "missing port"),
        ("tcp:127.0.0.1:http", "bad port 'http'"),
        ("tcp:127.0.0.1:65536", "bad port '65536'"),
        ("tcp:[::1:5555", "bad IPv6 address"),
        ("unix:", "missing path"),
        ("exec:cat > x", "unsupported transport 'exec'"),
    ],
)
def test_bad_uris_name_the_uri_and_the_problem(uri: str, detail: str) -> None:
    with pytest.raises(TransportError) as error:
        parse_uri(uri)
    assert error.value.what == uri
    assert detail in error.value.detail


def test_addresses_print_back_as_uris() -> None:
    for uri in ("tcp:127.0.0.1:4444", "tcp:[::1]:5", "unix:/tmp/s", "file:/tmp/f"):
        assert str(parse_uri(uri)) == uri
