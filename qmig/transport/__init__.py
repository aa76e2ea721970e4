"""Byte transports for migration streams: URI parsing, listening and connecting."""

from qmig.transport.connection import Connection, Listener, connect, limit_buffers, listen
from qmig.transport.uri import Address, FileAddress, TcpAddress, UnixAddress, parse_uri

__all__ = [
    "Address",
    "Connection",
    "FileAddress",
    "Listener",
    "TcpAddress",
    "UnixAddress",
    "connect",
    "limit_buffers",
    "listen",
    "parse_uri",
]
