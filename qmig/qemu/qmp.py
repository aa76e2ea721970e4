"""A synchronous face on ``qemu.qmp.QMPClient``: the client lives on a private event-loop thread.

Tests, fixture scripts and the relay are plain blocking code; running one asyncio loop per
connection in a daemon thread lets them call ``execute()`` like a function without an async
runtime of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from qmig.errors import QmigError

T = TypeVar("T")


class QemuError(QmigError):
    """QEMU refused a command, failed a migration or could not be started."""


class QmpConnection:
    """One QMP session over a UNIX socket, usable from any thread."""

    def __init__(self, socket_path: Path, name: str, timeout: float = 30.0) -> None:
        self.name = name
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        try:
            self._client = self._run(self._connect(socket_path))
        except BaseException:
            self._stop_loop()
            raise

    async def _connect(self, socket_path: Path) -> QMPClient:
        # Created on the loop thread so its asyncio primitives bind to this loop.
        client = QMPClient(self.name)
        await client.connect(str(socket_path))
        return client

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(self.timeout if timeout is None else timeout)

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run one QMP command and return its ``return`` value; QEMU's refusal becomes QemuError."""
        try:
            return self._run(self._client.execute(command, arguments), timeout)
        except ExecuteError as error:
            raise QemuError(f"{self.name}: {command}", str(error)) from None
        except QMPError as error:
            raise QemuError(f"{self.name}: {command}", str(error) or type(error).__name__) from None
        except TimeoutError:
            raise QemuError(f"{self.name}: {command}", "no answer from QEMU") from None

    def close(self) -> None:
        try:
            # The peer may already be gone (QEMU quit or was killed): closing is best effort.
            with contextlib.suppress(Exception):
                self._run(self._client.disconnect(), timeout=5.0)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._loop.close()
