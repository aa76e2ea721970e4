"""The latency figures every summary reports (receive, replay, simulate)."""

from __future__ import annotations

from qmig.cli.text import latency_form
from qmig.latency import (
    LATENCY_DIST_BUCKETS,
    latency_by_already_sent,
    latency_dist,
    percentile_us,
    percentiles_us,
    qemu_latency_figures,
    request_legs,
    request_split,
)


def test_percentiles_of_nanosecond_samples_in_microseconds() -> None:
    samples = [(k + 1) * 1000 for k in range(100)][::-1]  # 1..100 µs, unsorted
    assert percentiles_us(samples) == {"count": 100, "p50": 51.0, "p99": 100.0, "max": 100.0}
    assert percentile_us(sorted(samples), 0.0) == 1.0
    assert percentile_us([1234], 0.5) == 1.2


def test_no_samples_give_zeros() -> None:
    assert percentiles_us([]) == {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}


def test_latency_dist_uses_qemus_power_of_two_microsecond_buckets() -> None:
    # 0 µs and 1 µs share bucket 0; 255 µs is in [128, 256); 256 µs opens [256, 512).
    samples = [0, 999, 1_000, 255_000, 256_000, 511_999, 2**40 * 1000]
    dist = latency_dist(samples)
    assert len(dist) == LATENCY_DIST_BUCKETS == 24
    assert dist[0] == 3  # 0 µs, 0.999 µs (truncated to 0) and 1 µs
    assert dist[7] == 1  # 255 µs
    assert dist[8] == 2  # 256 µs and 511.999 µs
    assert dist[23] == 1  # far past the last bucket's start
    assert sum(dist) == len(samples)


def test_qemu_latency_figures_average_in_nanoseconds() -> None:
    figures = qemu_latency_figures([1_000, 3_000])
    assert figures["postcopy_latency_ns"] == 2_000
    assert qemu_latency_figures([]) == {
        "postcopy_latency_ns": 0,
        "postcopy_latency_dist": [0] * LATENCY_DIST_BUCKETS,
    }


def test_the_summaries_print_qemus_form_by_each_buckets_range() -> None:
    # The samples of the bucket test above: [0, 2) µs three, [128, 256) one, [256, 512)
    # two, and the open-ended last bucket one; empty buckets are left out.
    samples = [0, 999, 1_000, 255_000, 256_000, 511_999, 2**40 * 1000]
    figures = qemu_latency_figures(samples)
    assert latency_form(figures["postcopy_latency_ns"], figures["postcopy_latency_dist"]) == (
        f"average {sum(samples) // len(samples) / 1000:.1f} µs; faults by µs: [0, 2) 3, "
        "[128, 256) 1, [256, 512) 2, [8,388,608, ∞) 1"
    )
    assert latency_form(0, latency_dist([])) == "average 0.0 µs; faults by µs: none"


def test_request_legs_join_the_two_ends_by_page_first_with_first() -> None:
    # The destination sent three requests (ns, sent → placed, block, offset); pc.ram 0x2000
    # twice (a second fault after a page was discarded again), one vga.vram that the source
    # never read (its channel broke), and the source read the other three in its own order.
    sent = [
        (1_000_000, 500_000, "pc.ram", 0x2000),
        (2_000_000, 400_000, "pc.ram", 0x2000),
        (1_500_000, 300_000, "pc.ram", 0x5000),
        (1_700_000, 900_000, "vga.vram", 0),
    ]
    read = [(0.00105, "pc.ram", 0x2000), (0.00160, "pc.ram", 0x5000), (0.00230, "pc.ram", 0x2000)]
    served_ns = [20_000, 10_000, 40_000]
    to_read, to_placed = request_legs(read, served_ns, sent)
    # Read − sent, then placed (sent + its wait) − written (read + served).
    assert to_read == [50_000, 100_000, 300_000]
    assert to_placed == [
        1_500_000 - 1_050_000 - 20_000,
        1_800_000 - 1_600_000 - 10_000,
        2_400_000 - 2_300_000 - 40_000,
    ]


def test_a_page_placed_before_the_answer_was_written_has_no_delivery_time() -> None:
    # Asked for while the sweep's copy was already on the wire: placed 30 µs after the
    # request was sent, the source read it 20 µs after and wrote its answer 50 µs later.
    sent = [(1_000_000, 30_000, "pc.ram", 0)]
    assert request_legs([(0.00102, "pc.ram", 0)], [50_000], sent) == ([20_000], [])


def test_request_legs_leave_out_requests_only_one_end_saw() -> None:
    # A request read from a stream the destination did not answer (and the reverse).
    assert request_legs([(0.001, "pc.ram", 0)], [5_000], []) == ([], [])
    assert request_legs([], [], [(1_000, 2_000, "pc.ram", 0)]) == ([], [])


def test_fault_latency_split_by_what_each_request_found_on_the_source() -> None:
    # As above: pc.ram 0x2000 asked twice, the first time sent already (the sweep's), the
    # second time sent for it; pc.ram 0x5000 sent for it; vga.vram never read by the source.
    sent = [
        (1_000_000, 500_000, "pc.ram", 0x2000),
        (2_000_000, 400_000, "pc.ram", 0x2000),
        (1_500_000, 300_000, "pc.ram", 0x5000),
        (1_700_000, 900_000, "vga.vram", 0),
    ]
    # The destination's fault → sent, in the order it sent them, and when.
    sent_at_ns = [1_000_000, 1_500_000, 1_700_000, 2_000_000]
    fault_to_sent = [7_000, 8_000, 9_000, 6_000]
    read = [(0.00105, "pc.ram", 0x2000), (0.00160, "pc.ram", 0x5000), (0.00230, "pc.ram", 0x2000)]
    already, sent_for = latency_by_already_sent(
        read, [True, False, False], sent, fault_to_sent, sent_at_ns
    )
    # Fault → sent, then sent → placed; each request paired with its own destination entry.
    assert already == [7_000 + 500_000]
    assert sent_for == [8_000 + 300_000, 6_000 + 400_000]


def test_the_split_from_a_time_on_groups_only_the_requests_made_from_then_on() -> None:
    # pc.ram 0x2000 asked before a recovery at 1.8 ms (the sweep's copy was out already) and
    # again after it (sent for it); pc.ram 0x5000 after it, sent already; pc.ram 0x9000 read
    # after it and not yet answered when the run's report was taken.
    sent = [
        (1_000_000, 500_000, "pc.ram", 0x2000),
        (2_000_000, 400_000, "pc.ram", 0x2000),
        (2_100_000, 300_000, "pc.ram", 0x5000),
        (2_200_000, 900_000, "pc.ram", 0x9000),
    ]
    sent_at_ns = [1_000_000, 2_000_000, 2_100_000, 2_200_000]
    fault_to_sent = [7_000, 6_000, 9_000, 5_000]
    read = [
        (0.00105, "pc.ram", 0x2000),
        (0.00203, "pc.ram", 0x2000),
        (0.00212, "pc.ram", 0x5000),
        (0.00230, "pc.ram", 0x9000),
    ]
    served_ns, already_sent = [20_000, 40_000, 1_000], [True, False, True]
    args = (read, served_ns, already_sent, sent, fault_to_sent, sent_at_ns)
    after = request_split(*args, since=0.0018)
    assert after.already_sent == [9_000 + 300_000]
    assert after.sent_for_request == [6_000 + 400_000]
    assert after.served == [40_000, 1_000] and after.sent == [6_000, 9_000, 5_000]
    figures = after.as_json()
    assert figures["page_already_sent"] == {"count": 1, "p50": 309.0, "p99": 309.0}
    assert figures["page_sent_for_request"] == {"count": 1, "p50": 406.0, "p99": 406.0}
    # The whole run: the first request joins the pages sent already.
    whole = request_split(*args)
    assert whole.already_sent == [7_000 + 500_000, 9_000 + 300_000]
    assert whole.sent_for_request == after.sent_for_request
