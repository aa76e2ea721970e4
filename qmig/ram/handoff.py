"""Serving faults from another process: a userfaultfd handed over a UNIX socket.

vhost-user back ends and Firecracker's page-fault handlers work this way. The process that
owns guest memory opens the userfaultfd, registers its blocks, and sends the descriptor
(SCM_RIGHTS) with the blocks' layout to a handler process. The handler reads the faults and
places pages with UFFDIO_COPY: the ioctls act on the address space that registered the
descriptor, not the caller's, so the destination addresses are the owner's and the sources
the handler's own. The handler keeps the received bitmap; the owner's stays empty, so the
owner must not read its memory from Python unless it learns what is in place some other way
(here: its vCPUs check the pages they read, and the handler reports what it placed).

Only the in-process rule changes with the split: the GIL trap is gone (a Python thread of the
owner touching a missing page blocks only the owner), which is why this form exists.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from qmig.ram.blocks import BlockSpec, RamBlock, RamBlocks
from qmig.ram.errors import RamError
from qmig.ram.faults import SPIN_US, FaultThread
from qmig.ram.uffd import Userfaultfd

_MAX_LAYOUT = 1 << 16


def send_userfaultfd(sock: socket.socket, uffd: Userfaultfd, blocks: Iterable[RamBlock]) -> None:
    """Hand ``uffd`` over ``sock`` (AF_UNIX), with where and how big each block is."""
    layout = [
        {
            "idstr": block.idstr,
            "address": block.host_address,
            "used_length": block.used_length,
            "page_size": block.page_size,
        }
        for block in blocks
    ]
    message = json.dumps({"features": uffd.enabled_features, "blocks": layout}).encode()
    if len(message) > _MAX_LAYOUT:
        raise RamError(f"block layout of {len(message)} bytes is too large to hand over")
    socket.send_fds(sock, [message], [uffd.fd])


class HandedOver:
    """The handler's side: the owner's descriptor and its blocks, placed into from here."""

    def __init__(self, uffd: Userfaultfd, blocks: RamBlocks) -> None:
        self.uffd = uffd
        self.blocks = blocks
        for block in blocks:
            block.attach_handed_over(uffd)

    @classmethod
    def receive(cls, sock: socket.socket) -> HandedOver:
        """Wait on ``sock`` for a descriptor sent by :func:`send_userfaultfd`."""
        message, fds, flags, _ = socket.recv_fds(sock, _MAX_LAYOUT, 1)
        if not fds:
            raise RamError("no userfaultfd came with the block layout (peer closed?)")
        if flags & socket.MSG_CTRUNC or len(fds) != 1:
            for fd in fds:
                socket.close(fd)
            raise RamError("the userfaultfd hand-over was truncated")
        try:
            found = json.loads(message)
            specs = [
                BlockSpec(item["idstr"], item["used_length"], item["page_size"])
                for item in found["blocks"]
            ]
            addresses = {item["idstr"]: item["address"] for item in found["blocks"]}
            blocks = RamBlocks(specs, remote_addresses=addresses)
        except (ValueError, KeyError, TypeError) as error:
            socket.close(fds[0])
            raise RamError(f"bad block layout in the userfaultfd hand-over: {error}") from None
        return cls(Userfaultfd.adopt(fds[0], int(found.get("features", 0))), blocks)

    def serve(self, sources: Mapping[str, Any], spin_us: float = SPIN_US) -> FaultThread:
        """Serve every fault from ``sources`` (per block, a buffer laid out like it), in C."""
        return FaultThread(self.uffd, self.blocks, spin_us=spin_us, sources=sources).start()

    def close(self) -> None:
        self.blocks.close()
        self.uffd.close()
