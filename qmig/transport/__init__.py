"""Byte transports for migration streams: URI parsing, listening and connecting."""

from qmig.transport.connection import (
    Connection,
    ConnectionProxy,
    Listener,
    connect,
    limit_buffers,
    listen,
)
from qmig.transport.incoming import (
    Acceptor,
    ChannelRule,
    accept_channels,
    accept_migration,
    accept_multifd,
)
from qmig.transport.limits import LimitExceeded, Limits
from qmig.transport.uri import Address, FileAddress, TcpAddress, UnixAddress, parse_uri

__all__ = [
    "Acceptor",
    "Address",
    "ChannelRule",
    "Connection",
    "ConnectionProxy",
    "FileAddress",
    "LimitExceeded",
    "Limits",
    "Listener",
    "TcpAddress",
    "UnixAddress",
    "accept_channels",
    "accept_migration",
    "accept_multifd",
    "connect",
    "limit_buffers",
    "listen",
    "parse_uri",
]
