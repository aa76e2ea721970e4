"""qmig's error types.

Every error qmig raises on purpose derives from :class:`QmigError` and renders as one line in
one grammar, used by every command::

    qmig: error: WHAT: detail at byte N

WHAT names the command, return-path message or section as QEMU names it, without its prefix
(``POSTCOPY_RAM_DISCARD``, ``REQ_PAGES``, ``SECTION_START``), or ``RAM`` for a page record.
N is an absolute offset in the outer stream, also inside PACKAGED.

The split follows h11: :class:`RemoteProtocolError` means the bytes or messages that came in
broke the format or QEMU's rules; :class:`LocalProtocolError` means qmig itself was asked to
send something illegal. Anything else is an environment problem (host support, transport).
"""

from __future__ import annotations


class QmigError(Exception):
    """Base of every error qmig raises on purpose; ``str()`` is the one-line message."""

    def __init__(self, what: str, detail: str, offset: int | None = None) -> None:
        self.what = what
        self.detail = detail
        self.offset = offset
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = "" if self.offset is None else f" at byte {self.offset}"
        return f"{self.what}: {self.detail}{where}"

    def at(self, offset: int) -> QmigError:
        """Return the same error anchored at ``offset`` (used when an inner parse is relocated)."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.offset = offset
        Exception.__init__(clone, clone.one_line())
        return clone


class ProtocolError(QmigError):
    """A migration-protocol violation, in one direction or the other."""


class RemoteProtocolError(ProtocolError):
    """The incoming bytes or messages break the wire format or QEMU's rules."""

    def __init__(
        self, what: str, detail: str, offset: int | None = None, *, state: str | None = None
    ) -> None:
        self.state = state
        super().__init__(what, detail, offset)


class MalformedError(RemoteProtocolError):
    """Bytes that cannot be parsed: bad magic, wrong length, bad terminator, unknown number."""


class TruncatedError(MalformedError):
    """The input ended in the middle of a record."""

    def __init__(self, what: str, offset: int | None = None, *, during: str | None = None) -> None:
        detail = "unexpected end of stream" + (f" during {during}" if during else "")
        super().__init__(what, detail, offset)


class IllegalStateError(RemoteProtocolError):
    """A well-formed message that is not legal in the receiver's current state."""


class LocalProtocolError(ProtocolError):
    """qmig was asked to send something the protocol does not allow."""


class HostSupportError(QmigError):
    """The host cannot do what was asked (userfaultfd, huge pages, permissions)."""


class TransportError(QmigError):
    """The connection failed: refused, address in use, or the peer went away."""


class VerificationError(QmigError):
    """Migrated memory does not match what the source held."""
