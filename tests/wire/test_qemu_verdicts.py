"""Hostile inputs where qmig's verdict once differed from QEMU's, and now agrees.

* A PACKAGED inside a PACKAGED: QEMU's ``loadvm_handle_cmd_packaged`` reads the length and
  the blob from the outer stream (``mis->from_src_file``), whichever stream the command came
  from, so from inside a package it takes the bytes after the enclosing blob and fails.
* A return path whose first page request is REQ_PAGES: the source has no previous block to
  refer it to (``ram_save_queue_pages``: "no previous block") and fails.

Both are refused by the readers with one line naming the record's offset, and so by
``qmig inspect`` with a non-zero exit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qmig.cli import main
from qmig.errors import MalformedError
from qmig.wire import messages as m
from qmig.wire.reader import Record, ReturnPathReader, StreamReader
from qmig.wire.schema import schema_for

VERSIONS = ["2.9", "7.2", "10.0"]


def _opening(version: str) -> bytes:
    schema = schema_for(version)
    return schema.build_opening(m.Configuration("pc-i440fx-7.2"))


def nested_package(version: str) -> tuple[bytes, int]:
    """A stream with PACKAGED(LISTEN, PACKAGED(PING)); and the inner PACKAGED's offset."""
    schema = schema_for(version)
    opening = _opening(version)
    listen = schema.build_command(m.PostcopyListen())
    inner = schema.build_packaged(schema.build_command(m.Ping(1)))
    outer = schema.build_packaged(listen + inner)
    at = len(opening) + len(outer) - len(listen + inner) + len(listen)
    trailer = schema.build_command(m.Ping(4)) + bytes(schema.eof.build(m.Eof()))
    return opening + outer + trailer, at


def orphan_request(version: str) -> tuple[bytes, int]:
    """A return path PONG, REQ_PAGES (no REQ_PAGES_ID before it); and the request's offset."""
    schema = schema_for(version)
    pong = schema.build_rp(m.Pong(1))
    return pong + schema.build_rp(m.ReqPages(0x2000, 0x1000)), len(pong)


def read_all(reader: StreamReader | ReturnPathReader, data: bytes) -> list[Record]:
    reader.feed(data)
    reader.feed_eof()
    return list(reader)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_package_inside_a_package_is_refused_at_the_inner_command(version: str) -> None:
    data, at = nested_package(version)
    with pytest.raises(MalformedError) as caught:
        read_all(StreamReader(version), data)
    assert caught.value.what == "PACKAGED"
    assert caught.value.offset == at
    assert "package inside a package" in caught.value.detail


def test_one_package_after_another_still_reads() -> None:
    schema = schema_for("7.2")
    eof = bytes(schema.eof.build(m.Eof()))
    # An EOF in the package ends its load, as RUN does; then the outer stream goes on.
    package = schema.build_packaged(schema.build_command(m.Ping(1)) + eof)
    data = _opening("7.2") + package + package + eof
    names = [record.name for record in read_all(StreamReader("7.2"), data)]
    assert names.count("PACKAGED") == 2 and names.count("PACKAGE_END") == 2


@pytest.mark.parametrize("version", VERSIONS)
def test_a_package_that_ends_without_run_or_eof_is_refused_at_its_end(version: str) -> None:
    """QEMU loads a package until RUN or an EOF in it; past the blob's end its read fails."""
    schema = schema_for(version)
    package = schema.build_packaged(schema.build_command(m.Ping(1)))
    data = _opening(version) + package + bytes(schema.eof.build(m.Eof()))
    with pytest.raises(MalformedError) as caught:
        read_all(StreamReader(version), data)
    assert caught.value.what == "PACKAGED"
    assert caught.value.offset == len(_opening(version) + package)
    assert "without POSTCOPY_RUN or EOF" in caught.value.detail


@pytest.mark.parametrize("version", VERSIONS)
def test_req_pages_with_no_req_pages_id_before_it_is_refused(version: str) -> None:
    data, at = orphan_request(version)
    with pytest.raises(MalformedError) as caught:
        read_all(ReturnPathReader(version), data)
    assert (caught.value.what, caught.value.offset) == ("REQ_PAGES", at)
    assert "no previous block" in caught.value.detail


@pytest.mark.parametrize("fast", [True, False])
def test_req_pages_after_a_req_pages_id_reads(fast: bool) -> None:
    schema = schema_for("7.2")
    named = m.ReqPagesId(0x1000, 0x1000, "pc.ram")
    data = schema.build_rp(named) + schema.build_rp(m.ReqPages(0x2000, 0x1000))
    reader = ReturnPathReader("7.2")
    reader._page_requests.enabled = fast
    messages = [record.message for record in read_all(reader, data)]
    assert messages == [named, m.ReqPages(0x2000, 0x1000)]


def _inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["inspect", "--qemu-version", "7.2", *args])
    return code, capsys.readouterr().err


def test_inspect_refuses_a_nested_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, at = nested_package("7.2")
    (tmp_path / "stream.bin").write_bytes(data)
    code, err = _inspect(capsys, str(tmp_path / "stream.bin"))
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qmig: error: PACKAGED: a package inside a package")
    assert lines[0].endswith(f"at byte {at}")


def test_inspect_refuses_a_return_path_starting_with_req_pages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = schema_for("7.2")
    stream = _opening("7.2") + bytes(schema.eof.build(m.Eof()))
    rp, at = orphan_request("7.2")
    (tmp_path / "stream.bin").write_bytes(stream)
    (tmp_path / "rp.bin").write_bytes(rp)
    code, err = _inspect(
        capsys, str(tmp_path / "stream.bin"), "--return-path", str(tmp_path / "rp.bin")
    )
    assert code != 0
    assert err.strip().splitlines() == [
        f"qmig: error: REQ_PAGES: no previous block: no REQ_PAGES_ID named one before it "
        f"at byte {at}"
    ]
