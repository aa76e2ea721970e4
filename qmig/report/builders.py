"""One :class:`ReportDocument` per command, from what its run recorded."""

from __future__ import annotations

from typing import Any

from qmig.report.document import ReportDocument, Table, per_block
from qmig.report.recorder import BUCKET_S, MULTIFD_PREFIX, STREAM, Recorder
from qmig.runner.pauses import Pause


def _recorded(document: ReportDocument, recorder: Recorder) -> None:
    for name, buckets in sorted(recorder.series.items(), key=lambda item: _order(item[0])):
        document.add_series(name, buckets)
    for at, name in recorder.events:
        document.add_event(name, at - recorder.start, _kind(name))


def _order(name: str) -> tuple[int, int]:
    """The stream first, in the first colour, whichever channel counted first; the multifd
    channels last, by number; the others as they came."""
    if name == STREAM:
        return (0, 0)
    number = name.removeprefix(MULTIFD_PREFIX)
    if name.startswith(MULTIFD_PREFIX) and number.isdigit():
        return (2, int(number))
    return (1, 0)


def _multifd_table(document: ReportDocument, channels: list[dict[str, Any]], whose: str) -> None:
    """One row per multifd channel; ``channels``: each as
    :meth:`qmig.runner.multifd_recv.MultifdReceiver.summary` or inspect lists it (a figure it
    lacks is shown as -). A capture's channel is named as its file and series; a source's or
    destination's by its handshake's id (a source's series K is its channel K, which sends id
    K; a destination's series K is the K-th connection it took, which may carry another id)."""
    table = Table(
        f"Multifd channels ({whose})",
        ["channel", "id", "bytes", "packets", "pages", "zero pages", "syncs"],
    )
    for number, channel in enumerate(channels):
        table.rows.append(
            [channel.get("direction") or f"{MULTIFD_PREFIX}{channel.get('id', number)}"]
            + [
                channel.get(key)
                for key in ("id", "bytes", "packets", "pages", "zero_pages", "syncs")
            ]
        )
    document.tables.append(table)


def _sent_channels(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """A source's multifd channels from its plan's summary: bytes, pages and syncs per channel
    (it counts packets and zero pages over all channels only)."""
    return [
        {"id": number, "bytes": sent, "pages": pages, "syncs": plan["syncs"]}
        for number, (sent, pages) in enumerate(
            zip(plan["channel_bytes"], plan["pages_per_channel"], strict=True)
        )
    ]


def _kind(name: str) -> str:
    if name.startswith("pass"):
        return "pass"
    if name in ("pause", "postcopy paused"):
        return "pause"
    if name in ("recovery", "resume", "RESUME", "RECV_BITMAP"):
        return "recovery"
    if name == "end":
        return "end"
    return "switchover"


def _destination_parts(
    document: ReportDocument, destination: dict[str, Any], start: float, figures: dict[str, Any]
) -> None:
    """Switchover, requests, latency buckets and the two tables, from a destination's report
    (:func:`qmig.runner.peer.report_json`: the same in ``simulate``'s child and ``receive``)."""
    document.add_event("discards", _since(destination.get("first_discard_at"), start))
    document.add_event("LISTEN", _since(destination.get("listen_at"), start))
    document.add_event("RUN", _since(destination.get("running_at"), start))
    for sent_ns, latency_ns, block, offset in destination.get("request_log") or []:
        document.add_request(sent_ns / 1e9 - start, round(latency_ns / 1000, 1), block, offset)
    faults = destination.get("faults") or {}
    document.set_latency_dist(
        "fault → page placed (destination)", faults.get("postcopy_latency_dist") or [], figures
    )
    counts, waits = per_block(document.requests)
    pages = destination.get("block_pages") or {}
    blocks = Table(
        "RAM blocks",
        ["block", "size", "pages placed", "zero pages", "requests", "request wait (ms)"],
    )
    for name, size in (destination.get("blocks") or {}).items():
        placed, zero = pages.get(name, (0, 0))
        blocks.rows.append(
            [name, size, placed, zero, counts.get(name, 0), round(waits.get(name, 0.0), 2)]
        )
    document.tables.append(blocks)
    by_thread = {int(tid): ns for tid, ns in (faults.get("blocktime_ns_by_thread") or {}).items()}
    vcpus = Table("vCPUs", ["vCPU", "thread", "touches", "run time (ms)", "blocktime (ms)"])
    for index, result in enumerate(destination.get("workload") or []):
        tid = result.get("thread_id", 0)
        vcpus.rows.append(
            [
                index,
                tid,
                result.get("touches", 0),
                round(result.get("elapsed_ns", 0) / 1e6, 2),
                round(by_thread.get(tid, 0) / 1e6, 2),
            ]
        )
    document.tables.append(vcpus)


def _since(at: float | None, start: float) -> float | None:
    return None if at is None else at - start


def simulation(
    summary: dict[str, Any],
    recorder: Recorder,
    source_report: Any,
    destination: dict[str, Any],
    summary_text: str,
) -> ReportDocument:
    document = ReportDocument(
        "simulate",
        f"qmig simulate: {summary['mode']}, QEMU {summary['qemu_version']} wire",
        bucket_s=BUCKET_S,
        summary=summary,
        summary_text=summary_text,
    )
    _recorded(document, recorder)
    _source_events(document, source_report, recorder.start)
    _destination_parts(document, destination, recorder.start, summary["fault_latency_us"])
    _pauses(document, source_report.pauses, recorder.start, "postcopy pages sent")
    multifd = summary.get("multifd")
    if multifd is not None:
        received = multifd.get("received")
        if received is not None:
            _multifd_table(document, received["per_channel"], "as the destination read them")
        else:
            _multifd_table(document, _sent_channels(multifd["sent"]), "as the source sent them")
    return document


def _pauses(document: ReportDocument, pauses: list[Pause], start: float, pages: str) -> None:
    """Each pause the run lived through (monotonic times), on the report's clock."""
    for pause in pauses:
        document.add_pause(pause.as_json(start))
    if pauses:
        document.pause_table(pages)


def _source_events(document: ReportDocument, report: Any, start: float) -> None:
    for number, at in enumerate(getattr(report, "pass_ends", []), 1):
        document.add_event(f"pass {number}", at - start, "pass")
    document.add_event("stop", _since(report.stopped, start))
    document.add_event("end", _since(report.finished or None, start), "end")


def receive(
    summary: dict[str, Any], recorder: Recorder, destination: dict[str, Any], summary_text: str
) -> ReportDocument:
    document = ReportDocument(
        "receive",
        f"qmig receive: {summary['mode']}, QEMU {summary['qemu_version']} wire",
        bucket_s=BUCKET_S,
        summary=summary,
        summary_text=summary_text,
    )
    _recorded(document, recorder)
    document.add_event("end", _since(destination.get("finished"), recorder.start), "end")
    _destination_parts(document, destination, recorder.start, summary["fault_to_placed_us"])
    pauses = [Pause(**pause) for pause in destination.get("pauses") or []]
    _pauses(document, pauses, recorder.start, "postcopy pages placed")
    if summary.get("multifd") is not None:
        _multifd_table(document, summary["multifd"]["per_channel"], "as read here")
    return document


def replay(
    summary: dict[str, Any], recorder: Recorder, source_report: Any, summary_text: str
) -> ReportDocument:
    document = ReportDocument(
        "replay",
        f"qmig replay: {summary.get('mode', 'migration')} into {summary.get('to', 'QEMU')}",
        bucket_s=BUCKET_S,
        summary=summary,
        summary_text=summary_text,
    )
    _recorded(document, recorder)
    _source_events(document, source_report, recorder.start)
    served = source_report.served_ns
    for index, (received, block, start) in enumerate(source_report.requests):
        latency = round(served[index] / 1000, 1) if index < len(served) else None
        document.add_request(received - recorder.start, latency, block, start)
    document.set_latency(
        "page request read → its pages sent (source)", served, summary["request_to_sent_us"]
    )
    counts, waits = per_block(document.requests)
    table = Table("RAM blocks", ["block", "requests", "request wait (ms)"])
    for name in counts:
        table.rows.append([name, counts[name], round(waits[name], 2)])
    document.tables.append(table)
    _pauses(document, source_report.pauses, recorder.start, "postcopy pages sent")
    if summary.get("multifd") is not None:
        _multifd_table(document, _sent_channels(summary["multifd"]), "as sent")
    return document


# QEMU's commands that mark the switchover, a pause or a recovery, as inspect names them.
_SWITCHOVER = {
    "POSTCOPY_ADVISE": "ADVISE",
    "POSTCOPY_LISTEN": "LISTEN",
    "POSTCOPY_RUN": "RUN",
    "PACKAGED": "PACKAGED",
    "POSTCOPY_RESUME": "RESUME",
    "RECV_BITMAP": "RECV_BITMAP",
}


def inspection(
    report: dict[str, Any],
    capture: Any,
    requests: list[Any],
    summary_text: str,
    multifd: Any = None,
) -> ReportDocument:
    """``capture``: inspect's capture folder (its two timelines: chunk ends and times in ns
    since the capture started); ``requests``: its matched page requests; ``multifd``: its
    multifd channels (:class:`qmig.inspect_multifd.MultifdInspection`), if it has any."""
    document = ReportDocument(
        "inspect",
        f"qmig inspect {report.get('stream', '')}: QEMU {report.get('qemu_version')} wire",
        bucket_s=BUCKET_S,
        # The summary without the long lists (commands, messages, requests): those are in
        # the plots, or in inspect --json.
        summary={key: value for key, value in report.items() if key not in ("commands", "requests")}
        | {
            "return_path": {
                key: value
                for key, value in (report.get("return_path") or {}).items()
                if key != "messages"
            }
        },
        summary_text=summary_text,
    )
    timelines = [("stream", capture.stream), ("return path", capture.return_path)]
    if getattr(capture, "preempt", None) is not None:  # postcopy-preempt's channel
        timelines.append(("preempt", capture.preempt))
    if multifd is not None:  # by channel number, as the capture's files are
        timelines += [
            (direction.value, timeline) for direction, timeline in multifd.timelines.items()
        ]
    for name, timeline in timelines:
        buckets: dict[int, int] = {}
        previous = 0
        for end, t_ns in zip(timeline.ends, timeline.times, strict=True):
            index = int(t_ns / 1e9 / BUCKET_S)
            buckets[index] = buckets.get(index, 0) + end - previous
            previous = end
        document.add_series(name, buckets)
    seen_discard = False
    for command in report.get("commands") or []:
        name = command["name"]
        at = capture.stream.arrival(command["offset"], 1) / 1e9
        if name == "POSTCOPY_RAM_DISCARD" and not seen_discard:
            seen_discard = True
            document.add_event("discards", at)
        elif name in _SWITCHOVER:
            document.add_event(_SWITCHOVER[name], at, _kind(_SWITCHOVER[name]))
    samples = []
    for request in requests:
        latency = None if request.in_flight else request.latency_us
        if latency is not None:
            samples.append(int(latency * 1000))
        document.add_request(
            request.t_ns / 1e9, latency, request.block, request.start, in_flight=request.in_flight
        )
    document.set_latency(
        "page request → its answer at the relay (requests answered after they were made)",
        samples,
        report.get("request_latency_us") or {},
    )
    counts, waits = per_block(document.requests)
    table = Table(
        "RAM blocks",
        [
            "block",
            "used length",
            "page records",
            "zero records",
            "distinct pages",
            "zero pages",
            "requests",
            "request wait (ms)",
        ],
    )
    for name, figures in (report.get("ram_blocks") or {}).items():
        table.rows.append(
            [
                name,
                figures.get("used_length"),
                figures.get("page_records"),
                figures.get("zero_records"),
                figures.get("distinct_pages"),
                figures.get("zero_pages"),
                counts.get(name, 0),
                round(waits.get(name, 0.0), 2),
            ]
        )
    document.tables.append(table)
    if report.get("multifd") is not None:
        _multifd_table(document, report["multifd"]["channels"], "as the capture holds them")
        for point in report["multifd"]["sync_points"]:
            document.add_sync(
                point["t_ns"] / 1e9, f"{point['name']} at stream offset {point['offset']:,}"
            )
    return document
