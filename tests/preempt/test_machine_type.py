"""The machine type qmig's own source announces follows its profile, as a real QEMU's
``-machine pc`` does (QEMU 10.0 names ``pc-i440fx-10.0`` in CONFIGURATION): detection of a
qmig-made stream then names the version that made it, and the preempt variant follows the
machine type as it does for real QEMU."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from qmig.protocol.preempt import PreemptVariant
from qmig.protocol.source import Source, SourceBlock
from qmig.protocol.states import SourceState
from qmig.simulate import SimulationConfig
from qmig.wire.detect import PREFIX_BYTES, detect, read_prefix
from qmig.wire.profiles import available_versions, load_profile

PAGE = 4096


def stream(version: str, machine_type: str | None = None) -> bytes:
    """A whole precopy migration, as a qmig source of ``version`` sends it."""
    rng = random.Random(5)
    ram = bytearray(rng.randbytes(256 * PAGE))
    source = Source([SourceBlock("pc.ram", len(ram), ram)], version=version,
                    machine_type=machine_type, postcopy_ram=False)  # fmt: skip
    source.start()
    data = bytearray()
    while source.state is not SourceState.COMPLETING:
        data += source.data_to_send(PREFIX_BYTES)
        if source.state is SourceState.PASS_COMPLETE:
            source.complete_precopy()
    return bytes(data + source.data_to_send(PREFIX_BYTES))


def configured_machine(data: bytes, version: str) -> str | None:
    """The machine type the stream's CONFIGURATION names, as ``version`` reads it."""
    return read_prefix(version, data, False).machine_type


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_a_qmig_stream_names_its_versions_machine_type_and_is_detected_as_that_version(
    version: str,
) -> None:
    data = stream(version)
    assert configured_machine(data, version) == f"pc-i440fx-{version}"
    detection = detect(data[:PREFIX_BYTES])
    assert detection.version == version
    assert f"machine type pc-i440fx-{version}" in detection.evidence


def test_inspect_auto_says_10_0_for_a_qmig_made_10_0_stream(tmp_path: Path) -> None:
    path = tmp_path / "stream.bin"
    path.write_bytes(stream("10.0"))
    done = subprocess.run(
        [sys.executable, "-m", "qmig", "inspect", str(path), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["qemu_version"] == "10.0"
    assert "machine type pc-i440fx-10.0" in report["qemu_version_evidence"]


def test_an_explicit_machine_type_is_still_announced() -> None:
    data = stream("10.0", "pc-q35-9.2")
    assert configured_machine(data, "10.0") == "pc-q35-9.2"


@pytest.mark.parametrize("version", available_versions())
def test_every_profile_names_a_machine_type_of_its_own_version(version: str) -> None:
    assert load_profile(version).default_machine_type.endswith(f"-{version}")


@pytest.mark.parametrize(
    ("version", "machine_type", "variant"),
    [
        ("10.0", None, PreemptVariant.V8_0),  # pc-i440fx-10.0: the current variant
        ("10.0", "pc-i440fx-7.2", PreemptVariant.PRE_7_2),  # hw_compat_7_2
        ("7.2", None, PreemptVariant.PRE_7_2),
    ],
)
def test_the_preempt_variant_follows_the_announced_machine_type(
    version: str, machine_type: str | None, variant: PreemptVariant
) -> None:
    config = SimulationConfig(version=version, preempt=True, machine_type=machine_type)
    assert config.variant() is variant
