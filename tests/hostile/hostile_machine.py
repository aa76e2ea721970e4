"""Feed a stream file to the sans-IO destination machine, as a process of its own.

``python hostile_machine.py FILE``: the machine alone (no RAM, no socket), fed 64 KiB at a
time, every decision taken and dropped; a QmigError ends it with the CLI's one line and
status 1, so the hostile tests measure and check it like the commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qmig.errors import QmigError
from qmig.protocol.destination import Destination
from qmig.wire.reader import END, NEED_DATA

CHUNK = 1 << 16


def drain(machine: Destination) -> bool:
    """Take every decision; True once the machine is done."""
    while True:
        event = machine.next_event()
        machine.data_to_send()
        if event is END:
            return True
        if event is NEED_DATA:
            return False


def main(path: Path, version: str) -> int:
    machine = Destination(version)
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(CHUNK):
                machine.receive_data(chunk)
                if drain(machine):
                    return 0
        machine.receive_eof()
        drain(machine)
    except QmigError as error:
        print(f"qmig: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
