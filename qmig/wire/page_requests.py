"""The fast path for REQ_PAGES and REQ_PAGES_ID, beside the schema it mirrors.

In postcopy every page fault the destination cannot wait out becomes one of these two
messages on the return path, and the fault lasts until the source has read it and sent the
page. construct takes some 30 us to build one and as long again to parse it, several times
what the rest of the request's way costs. :class:`PageRequests` builds and reads them with
one ``struct`` call each.

It builds exactly what ``Schema.build_rp`` builds for them and reads exactly what
``Schema.rp_payloads`` reads, declining everything else (another message, a length that is
not the message's, a message not complete yet): the schema then reads it and reports what
is wrong. ``tests/wire/test_page_requests.py`` proves the two agree.
"""

from __future__ import annotations

import struct
from typing import Any

from qmig.wire import messages as m
from qmig.wire.fields import NAME_ENCODING
from qmig.wire.schema import Schema

_REQ_PAGES = struct.Struct(">HHQI")  # type, len; start, length
_REQ_PAGES_ID = struct.Struct(">HHQIB")  # type, len; start, length, name length; the name
_TYPE_LENGTH = struct.Struct(">HH")


class PageRequests:
    """Builds and reads the two page-request messages of one schema's return path."""

    def __init__(self, schema: Schema) -> None:
        profile = schema.profile
        self._schema = schema
        self.enabled = True  # off: every message goes to the schema (the tests compare both)
        self.max_length = profile.rp_max_length
        self.req_pages = self._number(schema, "REQ_PAGES")
        self.req_pages_id = self._number(schema, "REQ_PAGES_ID")
        self._id_rule = profile.rp_lengths.get("REQ_PAGES_ID")
        rule = profile.rp_lengths.get("REQ_PAGES")
        if rule is None or not rule.allows(12) or self.max_length < 12:
            self.req_pages = None  # a profile whose REQ_PAGES is not 12 bytes: schema only

    @staticmethod
    def _number(schema: Schema, name: str) -> int | None:
        if name not in schema.rp_payloads:
            return None
        return schema.profile.rp_messages[name]

    def build(self, message: m.ReqPages | m.ReqPagesId) -> bytes:
        """The message's bytes, as ``Schema.build_rp`` gives them."""
        if isinstance(message, m.ReqPagesId) and self.req_pages_id is not None:
            name = message.block.encode(NAME_ENCODING)
            head = _REQ_PAGES_ID.pack(
                self.req_pages_id, 13 + len(name), message.start, message.length, len(name)
            )
            return head + name
        if isinstance(message, m.ReqPages) and self.req_pages is not None:
            return _REQ_PAGES.pack(self.req_pages, 12, message.start, message.length)
        return self._schema.build_rp(message)  # what the schema refuses, it says why

    def read(self, buf: Any, pos: int, limit: int) -> tuple[m.ReqPages | m.ReqPagesId, int] | None:
        """The request at ``buf[pos:limit]`` and its size, or None: the schema's to read."""
        if not self.enabled or pos + _REQ_PAGES.size > limit:
            return None
        kind, length = _TYPE_LENGTH.unpack_from(buf, pos)
        if kind == self.req_pages and length == 12:
            _, _, start, size = _REQ_PAGES.unpack_from(buf, pos)
            return m.ReqPages(start, size), _REQ_PAGES.size
        if kind != self.req_pages_id or pos + _REQ_PAGES_ID.size > limit:
            return None
        _, _, start, size, name_length = _REQ_PAGES_ID.unpack_from(buf, pos)
        end = pos + 4 + length
        if (
            length != 13 + name_length
            or length > self.max_length
            or self._id_rule is None
            or not self._id_rule.allows(length)
            or end > limit
        ):
            return None
        block = bytes(buf[pos + _REQ_PAGES_ID.size : end]).decode(NAME_ENCODING)
        return m.ReqPagesId(start, size, block), 4 + length
