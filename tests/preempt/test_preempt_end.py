"""The end of a preempt migration at the destination: in the 8.0 variant the source answers a
request on the preempt channel only, so its main channel can end before that answer is read;
the channel is read on, once the load is over, until every page asked for has come (QEMU's
postcopy_ram_incoming_cleanup waits for its page_requested_count to reach zero before it
shuts the channel down). The pre-7.2 variant reads up to its EOS, which follows every page."""

from __future__ import annotations

from test_preempt_protocol import PAGE, Pair

from qmig.protocol import events as ev
from qmig.protocol.preempt import PreemptVariant
from qmig.protocol.states import DestinationState, SourceState
from qmig.wire.reader import END, NEED_DATA


def _main_channel_to_its_end(pair: Pair) -> None:
    while pair.source.state is SourceState.POSTCOPY:
        pair.to_dest(pair.source.data_to_send(8 * PAGE))
    pair.to_source()


def test_a_requested_page_still_on_its_way_is_read_after_the_main_channel_ended() -> None:
    pair = Pair("10.0", PreemptVariant.V8_0)
    pair.switch_over()
    pair.dest.page_fault("pc.ram", 40 * PAGE)
    pair.to_source()
    answer = pair.source.preempt_data()  # sent, and not read yet at the destination
    assert answer
    _main_channel_to_its_end(pair)
    assert pair.dest.state is DestinationState.END
    assert pair.dest.pending_requests() == [("pc.ram", 40 * PAGE)]
    assert pair.channel.awaits_requested_pages
    # The load is over, and the channel still waits for the page asked for...
    assert pair.channel.next_event() is NEED_DATA
    # ...which comes, is delivered, and only then does the channel end.
    assert pair.to_preempt(answer) is END
    assert pair.by_channel["preempt"] == 1
    assert not pair.channel.awaits_requested_pages
    pair.verify()


def test_with_every_requested_page_in_the_8_0_channel_ends_with_the_load() -> None:
    pair = Pair("10.0", PreemptVariant.V8_0)
    pair.switch_over()
    pair.dest.page_fault("pc.ram", 8 * PAGE)
    pair.to_source()
    pair.to_preempt(pair.source.preempt_data())
    _main_channel_to_its_end(pair)
    assert pair.dest.pending_requests() == []
    assert pair.channel.next_event() is END


def test_the_pre_7_2_channel_reads_to_its_eos_after_a_late_answer() -> None:
    pair = Pair("7.2", PreemptVariant.PRE_7_2)
    pair.switch_over()
    pair.dest.page_fault("pc.ram", 40 * PAGE)
    pair.to_source()
    answer = pair.source.preempt_data()
    _main_channel_to_its_end(pair)
    tail = pair.source.preempt_data()  # the EOS, after the answer
    assert pair.dest.state is DestinationState.END
    assert pair.channel.next_event() is NEED_DATA
    events = []
    pair.channel.receive_data(answer + tail)
    while isinstance(event := pair.channel.next_event(), ev.Event):
        events.append(event)
    assert event is END and pair.channel.ended
    assert [type(event) for event in events] == [ev.PagesReceived]
