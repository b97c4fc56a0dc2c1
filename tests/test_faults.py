"""The fault engine against the scripted guest: each action as the guest sees it (completion
code, residue, endpoint state, events), the WHEN counters, seeds and replay, and the grammar's
errors."""
import json

import pytest

from xhcidbg.devices.base import Speed
from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.emu.context import EpState
from xhcidbg.emu.trb import CC
from xhcidbg.emu.trb import TrbType as T
from xhcidbg.faults import FaultEngine, RuleError, parse_rule, parse_rules
from xhcidbg.guest import regs as GR
from xhcidbg.guest.device import Device
from xhcidbg.guest.errors import ControllerError, XhciTimeout


@pytest.fixture
def dev(bus, drv):
    bus.controller.attach(LoopbackDevice(speed=Speed.SUPER, pattern=None))
    from xhcidbg.guest.device import Device
    return Device.enumerate(drv, 3)


@pytest.fixture
def faults(bus):
    engine = FaultEngine(bus.controller, seed=7).attach()
    yield engine
    engine.detach()


def _in(dev, length=64, **kw):
    return dev.endpoint(0x81).submit(length=length, **kw).wait()


# ---- grammar ---------------------------------------------------------------------------------
def test_a_rule_reads_back_as_it_was_written():
    r = parse_rule("stall-in: urb ep=0x81 nth=2 do stall")
    assert (r.name, r.kind, r.when) == ("stall-in", "urb", {"nth": "2"})
    assert r.definition() == "stall-in: urb ep=0x81 nth=2 do cc code=6"
    assert parse_rule(r.definition()).definition() == r.definition()


@pytest.mark.parametrize("line, column, says", [
    ("urb ep=0x81 nth=0 do stall", 13, "nth needs a count of 1 or more"),
    ("urbs ep=0x81 do stall", 1, "expected what the rule watches"),
    ("urb ep=0x81 do explode", 16, "expected an action"),
    ("urb ep=0x81 nth=2", 18, "expected `do ACTION`"),
    ("command type=address do short length=3", 25, "acts on urb rules, not command"),
    ("urb colour=red do stall", 5, "takes slot, dci, ep"),
    ("urb ep=0x81 do cc code=nonsense", 16, "no such name"),
    ("urb ep=0x81 probability=2 do stall", 13, "between 0 and 1"),
])
def test_a_bad_rule_is_refused_with_its_line_column_and_what_was_expected(line, column, says):
    text = "# a scenario\n\n" + line + "   # trailing comment\n"
    with pytest.raises(RuleError) as e:
        parse_rules(text, source="s.faults")
    assert (e.value.line, e.value.column) == (3, column)
    assert says in str(e.value) and str(e.value).startswith(f"s.faults:3:{column}:")


def test_a_bad_line_in_a_scenario_adds_none_of_its_rules(bus, faults):
    with pytest.raises(RuleError):
        faults.load("urb ep=0x81 do stall\nurb do nothing\n")
    assert faults.rules == []


# ---- transfers -------------------------------------------------------------------------------
def test_stall_on_the_nth_transfer_halts_the_endpoint_and_recovery_works(bus, drv, dev, faults):
    faults.add("urb ep=0x81 nth=2 do stall")
    assert _in(dev).cc == CC.SUCCESS
    t = _in(dev)
    assert t.cc == CC.STALL_ERROR
    ep = dev.endpoint(0x81)
    assert ep.state == EpState.HALTED
    ep.recover()
    assert _in(dev).cc == CC.SUCCESS
    [inj] = faults.log
    assert (inj.rule, inj.match, inj.action, inj.seed) == (1, 2, "cc", 7)
    assert inj.where["trb"] == t.trb_addrs()[0]
    assert inj.original["status"] == "OK" and inj.injected["cc"].startswith("6 ")


def test_a_vendor_code_with_a_residue_and_the_endpoint_state_asked_for(bus, drv, dev, faults):
    faults.add("urb ep=0x81 do cc code=200 residue=17 state=running")
    t = _in(dev, 64)
    assert t.cc == 200 and t.events[-1].length == 17
    assert dev.endpoint(0x81).state == EpState.RUNNING


@pytest.mark.parametrize("action, cc, state", [
    ("babble", CC.BABBLE_DETECTED, EpState.HALTED),
    ("xact-error", CC.USB_TRANSACTION_ERROR, EpState.HALTED),
    ("trb-error", CC.TRB_ERROR, EpState.ERROR),
    ("cc code=short", CC.SHORT_PACKET, EpState.RUNNING),
])
def test_each_error_leaves_the_endpoint_state_a_real_controller_leaves(bus, drv, dev, faults,
                                                                       action, cc, state):
    faults.add(f"urb ep=0x81 do {action}")
    assert _in(dev).cc == cc
    assert dev.endpoint(0x81).state == state


def test_transaction_errors_n_times_then_success_as_linux_soft_retries(bus, drv, dev, faults):
    faults.add("urb ep=0x81 times=2 do xact-error")
    ep = dev.endpoint(0x81)
    t = ep.submit(length=64)
    t.wait()
    ccs = [t.cc]
    for _ in range(2):                       # Reset Endpoint with TSP: the same TD runs again
        assert ep.state == EpState.HALTED
        assert ep.reset(tsp=True).cc == CC.SUCCESS
        ep.ring_doorbell()
        drv.wait_for(lambda: len(t.events) > len(ccs), "the retried TD's event")
        ccs.append(t.events[-1].cc)
    assert ccs == [CC.USB_TRANSACTION_ERROR, CC.USB_TRANSACTION_ERROR, CC.SUCCESS]
    assert len(faults.log) == 2



def _looped(bus, drv):
    """A loopback device in its loopback configuration: IN returns what OUT sent."""
    bus.controller.attach(LoopbackDevice(speed=Speed.SUPER, pattern=None))
    dev = Device.enumerate(drv, 3, configure=False)
    dev.set_configuration(2)
    return dev


def test_a_soft_retried_td_gets_the_devices_same_answer_again(bus, drv, faults):
    # the transaction error is the host's view: the device answered, its packets were not
    # acknowledged, and on the retry it sends the same ones (not its next answer)
    dev = _looped(bus, drv)
    faults.add("urb ep=0x81 nth=1 do xact-error")
    assert dev.endpoint(0x01).submit(b"first!" * 8).wait().ok
    assert dev.endpoint(0x01).submit(b"second" * 8).wait().ok
    ep = dev.endpoint(0x81)
    t = ep.submit(length=48)
    t.wait()
    assert t.cc == CC.USB_TRANSACTION_ERROR
    assert ep.reset(tsp=True).cc == CC.SUCCESS          # Linux's soft retry
    ep.ring_doorbell()
    drv.wait_for(lambda: len(t.events) > 1, "the retried TD's event")
    assert t.events[-1].cc == CC.SUCCESS
    assert bytes(bus.controller.mem.read(t.buf, 48)) == b"first!" * 8
    assert ep.submit(length=48).wait().data[:48] == b"second" * 8


def test_a_rule_without_phase_counts_completions_only(bus, drv, faults):
    dev = _looped(bus, drv)
    done = faults.add("urb ep=0x81 do note")
    faults.add("urb ep=0x01 phase=submit do note")
    for _ in range(3):
        assert dev.endpoint(0x01).submit(b"x" * 8).wait().ok
        assert dev.endpoint(0x81).submit(length=8).wait().ok
    assert done.seen == 3

def test_a_short_packet_of_a_chosen_length(bus, drv, dev, faults):
    out = dev.endpoint(0x01).submit(bytes(range(64))).wait()
    assert out.ok
    faults.add("urb ep=0x81 do short length=10")
    t = _in(dev, 64)
    assert t.cc == CC.SHORT_PACKET and t.actual == 10 and t.residual == 54


def test_corrupted_in_data_reaches_the_guest(bus, drv, dev, faults):
    dev.endpoint(0x01).submit(bytes(64)).wait()
    faults.add("urb ep=0x81 do corrupt offset=5 value=0xAB")
    t = _in(dev, 64)
    assert t.ok and t.data[5] == 0xAB and t.data[:5] == bytes(5)
    assert faults.log[0].injected["bytes"] == ["5:0xab"]


def test_a_delayed_completion_arrives_later_and_a_withheld_one_never(bus, drv, dev, faults):
    faults.add("urb ep=0x81 nth=1 do delay ms=50")
    t0 = bus.scheduler.now_ns()
    assert _in(dev).ok
    assert bus.scheduler.now_ns() - t0 >= 50_000_000
    faults.add("urb ep=0x81 nth=2 do withhold")      # rule 2 counts from its own first match
    _in(dev)                                         # rule 2's match 1
    ep = dev.endpoint(0x81)
    t = ep.submit(length=64)
    with pytest.raises(XhciTimeout):
        t.wait(timeout_ns=200_000_000)
    assert ep.stop().cc == CC.SUCCESS                # Stop Endpoint takes the TD back
    assert ep.state == EpState.STOPPED


def test_a_disconnect_in_the_middle_of_a_td_and_a_reconnect(bus, drv, dev, faults):
    faults.add("urb ep=0x81 phase=submit nth=1 do disconnect and reconnect ms=20")
    t = dev.endpoint(0x81).submit(length=64)
    t.wait()
    assert t.cc == CC.USB_TRANSACTION_ERROR
    drv.wait_port(3, lambda s: s.connected, "the device to come back")
    assert bus.controller.port(3).device is not None
    assert [i.action for i in faults.log] == ["disconnect", "reconnect"]



def test_a_reconnect_at_another_speed_comes_back_on_a_usb2_port(bus, drv, dev, faults):
    faults.add("urb ep=0x81 phase=submit nth=1 do disconnect and reconnect speed=high ms=20")
    t = dev.endpoint(0x81).submit(length=64)
    t.wait()
    drv.wait_port(1, lambda s: s.connected, "the device on the USB 2 port")
    assert bus.controller.port(3).device is None
    again = Device.enumerate(drv, 1)
    assert again.speed == Speed.HIGH
    assert again.get_descriptor(1, 0, 18)[2:4] == bytes([0x00, 0x02])     # bcdUSB 2.00 now
    assert faults.log[-1].injected["speed"] == "high-speed"


def test_a_descriptor_field_is_corrupted_by_name(bus, drv, dev, faults):
    faults.add("urb request=6 value=0x100 do corrupt field=bMaxPacketSize0 value=0x20")
    faults.add("urb request=6 value=0x200 do corrupt field=ENDPOINT.wMaxPacketSize "
               "occurrence=2 value=0x1234")
    device = dev.get_descriptor(1, 0, 18)
    assert device[7] == 0x20 and device[:7] == dev.get_descriptor(1, 0, 7)
    config = dev.get_descriptor(2, 0, 255)
    endpoints = [config[i:i + 7] for i in range(len(config) - 6)
                 if config[i] == 7 and config[i + 1] == 5]
    assert int.from_bytes(endpoints[1][4:6], "little") == 0x1234
    assert int.from_bytes(endpoints[0][4:6], "little") != 0x1234
    assert faults.log[0].where["field"] == "DEVICE.bMaxPacketSize0"
    faults.add("urb request=6 value=0x100 do corrupt field=wTotalLength value=1")
    dev.get_descriptor(1, 0, 18)
    assert "no wTotalLength" in faults.log[-1].injected["note"]

# ---- commands --------------------------------------------------------------------------------
def test_a_command_completion_code_is_rewritten(bus, drv, faults):
    faults.add("command type=no-op do cc code=200")
    assert drv.no_op().cc == 200
    assert drv.enable_slot().cc == CC.SUCCESS


def test_a_withheld_command_is_aborted_with_command_ring_stopped(bus, drv, faults):
    faults.add("command type=enable do withhold")
    pc = drv.queue_command(GR_ENABLE_SLOT())
    with pytest.raises(XhciTimeout):
        drv.wait_command(pc, timeout_ns=100_000_000)
    stopped = drv.abort_command_ring()
    assert pc.completion is not None and pc.completion.cc == CC.COMMAND_ABORTED
    assert stopped is not None and stopped.cc == CC.COMMAND_RING_STOPPED
    assert drv.no_op().cc == CC.SUCCESS               # the ring runs again


def test_an_ignored_abort_leaves_the_command_ring_running(bus, drv, faults):
    faults.add("command type=enable do withhold and ignore-abort")
    pc = drv.queue_command(GR_ENABLE_SLOT())
    drv.bus.wait(lambda: False, 10_000_000)
    with pytest.raises(XhciTimeout):
        drv.abort_command_ring(timeout_ns=100_000_000)
    assert pc.completion is None
    assert drv.r32(drv.op + GR.CRCR) & GR.CRCR_CRR


def GR_ENABLE_SLOT():
    from xhcidbg.guest import trb as GT
    return GT.GuestTrb.build(T.ENABLE_SLOT)


def GR_NO_OP():
    from xhcidbg.guest import trb as GT
    return GT.GuestTrb.build(T.NOOP_COMMAND)


# ---- events, controller ----------------------------------------------------------------------
def test_a_dropped_and_a_duplicated_event(bus, drv, faults):
    faults.add("event type=command nth=1 do drop")
    with pytest.raises(XhciTimeout):
        drv.no_op(timeout_ns=5_000_000)
    faults.add("event type=command nth=1 do duplicate")
    before = len(drv.unmatched)
    assert drv.no_op().cc == CC.SUCCESS
    drv.bus.wait(lambda: False, 5_000_000)
    drv.service()
    dup = [e for e in list(drv.unmatched)[before:] if e.type == T.COMMAND_COMPLETION]
    assert len(dup) == 1                 # the copy answers a command that is no longer pending


def test_hse_halts_the_controller_and_all_ones_hides_it(bus, drv, faults):
    faults.add("command type=no-op do hse")
    with pytest.raises((XhciTimeout, ControllerError)):
        drv.no_op(timeout_ns=5_000_000)
    assert drv.usbsts & GR.STS_HSE and drv.usbsts & GR.STS_HCH
    faults.add("time do all-ones")
    drv.bus.wait(lambda: False, 1_000_000)
    assert drv.usbsts == 0xFFFFFFFF



def test_a_reordered_event_is_written_after_the_next_one(bus, drv, faults):
    faults.add("event type=command nth=1 do reorder")
    first = drv.queue_command(GR_NO_OP(), ring=False)
    second = drv.queue_command(GR_NO_OP())              # one doorbell: two completions
    drv.wait_command(second)
    drv.wait_command(first)
    assert first.completion is not None and second.completion is not None
    assert first.completion.event.addr > second.completion.event.addr   # in ring order: 2, 1
    assert [i.action for i in faults.log] == ["reorder"]
    faults.delete()
    faults.add("event type=command nth=1 do reorder ms=30")   # nothing follows: it waits 30 ms
    t0 = bus.scheduler.now_ns()
    assert drv.no_op().cc == CC.SUCCESS
    assert bus.scheduler.now_ns() - t0 >= 30_000_000


def test_an_event_lost_is_reported_by_a_host_controller_event(bus, drv, faults):
    faults.add("event type=command nth=1 do event-lost")
    with pytest.raises(XhciTimeout):
        drv.no_op(timeout_ns=5_000_000)              # its completion is the event lost
    [hce] = [e for e in drv.unmatched if e.type == T.HOST_CONTROLLER_EVENT]
    assert hce.cc == CC.EVENT_LOST
    faults.add("time do event-lost interrupter=9")   # refused with a reason, nothing posted
    drv.bus.wait(lambda: False, 1_000_000)
    assert faults.log[-1].injected == {"note": "there is no interrupter 9"}
    assert drv.no_op().cc == CC.SUCCESS and not drv.fatal


def test_a_lost_msix_message_leaves_the_events_unsignalled_until_the_guest_polls(
        bus, drv, faults):
    faults.add("interrupt nth=1 do lose")
    before = bus.interrupts[0]
    drv.queue_command(GR_NO_OP())
    drv.bus.wait(lambda: False, 5_000_000)
    regs = drv.interrupter_regs(0)
    # the controller believes it sent the message: IP clear, the Event Handler Busy ...
    assert bus.interrupts[0] == before and not regs["IMAN"] & GR.IMAN_IP
    assert regs["ERDP"] & GR.ERDP_EHB
    drv.queue_command(GR_NO_OP())                   # ... so the next event interrupts neither
    drv.bus.wait(lambda: False, 5_000_000)
    assert bus.interrupts[0] == before
    assert drv.service() == 2                       # a poll finds both and clears EHB
    assert drv.no_op().cc == CC.SUCCESS             # and interrupts come again
    assert bus.interrupts[0] == before + 1
    assert faults.log[0].injected == {"message": "lost"}

# ---- when, seeds and replay ------------------------------------------------------------------
def test_skip_every_and_times_pick_the_matches(bus, drv, faults):
    faults.add("command type=no-op skip=1 every=2 times=2 do cc code=200")
    ccs = [drv.no_op().cc for _ in range(8)]
    assert ccs == [1, 1, 200, 1, 200, 1, 1, 1]


def test_states_and_after_rule_chain_rules(bus, drv, faults):
    faults.load("first: command type=no-op nth=2 new_state=broken do cc code=201\n"
                "command type=no-op state=broken times=1 do cc code=202\n"
                "command type=enable after_rule=first do cc code=203\n")
    assert [drv.no_op().cc for _ in range(4)] == [1, 201, 202, 1]
    assert drv.enable_slot().cc == 203


def _seeded_run(bus, drv, seed):
    engine = FaultEngine(bus.controller, seed=seed).attach()
    engine.add("command type=no-op probability=0.3 do cc code=200")
    ccs = [drv.no_op().cc for _ in range(40)]
    engine.detach()
    return engine, ccs


def test_the_same_seed_injects_the_same_faults_and_a_log_replays(bus, drv):
    a, ccs_a = _seeded_run(bus, drv, 1234)
    b, ccs_b = _seeded_run(bus, drv, 1234)
    assert ccs_a == ccs_b and 200 in ccs_a and 1 in ccs_a
    strip = [{k: v for k, v in json.loads(x).items() if k not in ("t_ms", "where")}
             for x in a.log_lines()]
    assert strip == [{k: v for k, v in json.loads(x).items() if k not in ("t_ms", "where")}
                     for x in b.log_lines()]
    replay = FaultEngine(bus.controller, seed=99).attach()
    replay.load("\n".join(a.log_lines()))            # a log is a scenario
    assert [drv.no_op().cc for _ in range(40)] == ccs_a
    assert [i.match for i in replay.log] == [i.match for i in a.log]


# ---- ports -----------------------------------------------------------------------------------
def test_over_current_disables_the_port_and_reports_occ(bus, drv, dev, faults):
    faults.add("time do over-current port=3 ms=30")
    drv.wait_port(3, lambda s: s.raw & GR.PORT_OCA, "over-current")
    assert not drv.port_status(3).raw & GR.PORT_PED
    [inj] = faults.log
    assert inj.injected["portsc"] & GR.PORT_OCC and not inj.original["portsc"] & GR.PORT_OCA
    drv.wait_port(3, lambda s: not s.raw & GR.PORT_OCA, "over-current to end")


def test_ss_inactive_takes_a_warm_reset_and_a_failed_reset_leaves_the_port_disabled(
        bus, drv, dev, faults):
    faults.add("time do ss-inactive port=3")
    drv.wait_port(3, lambda s: GR.PORT_PLS.of(s.raw) == 6, "SS.Inactive")
    assert not drv.port_status(3).raw & GR.PORT_PED
    drv.clear_port_changes(3)
    drv.write_portsc(3, set_bits=GR.PORT_PR)                 # a hot reset does not leave it
    drv.wait_port(3, lambda s: s.raw & GR.PORT_PRC, "the hot reset to end")
    assert GR.PORT_PLS.of(drv.port_status(3).raw) == 6
    drv.clear_port_changes(3)
    faults.add("time do reset-fail port=3")
    drv.bus.wait(lambda: False, 1_000_000)
    drv.write_portsc(3, set_bits=GR.PORT_WPR)                # this warm reset fails
    drv.wait_port(3, lambda s: s.raw & GR.PORT_PRC, "the failed reset to end")
    assert not drv.port_status(3).raw & GR.PORT_PED
    drv.clear_port_changes(3)
    drv.write_portsc(3, set_bits=GR.PORT_WPR)                # the next one enables it
    drv.wait_port(3, lambda s: s.raw & GR.PORT_PRC and s.raw & GR.PORT_PED, "a warm reset")
    assert [i.action for i in faults.log] == ["ss-inactive", "reset-fail"]


# ---- expect ----------------------------------------------------------------------------------
def test_expect_reports_whether_the_guest_reacted_as_stated(bus, drv, dev, faults):
    rule = faults.add("urb ep=0x81 nth=1 do stall "
                      "expect reset-endpoint(tsp=0) then set-tr-dequeue within 1s")
    assert str(rule.expect) == "reset-endpoint(tsp=0) then set-tr-dequeue within 1000ms"
    faults.add("command type=no-op nth=1 do cc code=200 expect hcrst within 100ms")
    assert _in(dev).cc == CC.STALL_ERROR
    [stall] = faults.expectations
    assert stall.status == "pending" and stall.seen == []
    dev.endpoint(0x81).recover()                 # Reset Endpoint, Set TR Dequeue Pointer
    assert stall.status == "met", stall.text()
    assert [s.split(" @")[0] for s in stall.seen] == ["Reset Endpoint Command",
                                                      "Set TR Dequeue Pointer Command"]
    assert drv.no_op().cc == 200
    drv.bus.wait(lambda: False, 200_000_000)     # no controller reset comes
    hcrst = faults.expectations[1]
    assert hcrst.status == "failed" and "not within 100 ms" in hcrst.text()


def test_expect_waits_for_a_tsp_reset_when_told_and_refuses_unknown_steps(bus, drv, dev, faults):
    faults.add("urb ep=0x81 nth=1 do xact-error expect reset-endpoint(tsp=1)")
    _in(dev)
    dev.endpoint(0x81).recover()                 # a hard reset (TSP 0): not what was expected
    assert faults.expectations[0].status == "pending"
    with pytest.raises(RuleError, match="no command type"):
        parse_rule("urb do stall expect explode")
    with pytest.raises(RuleError, match="a time"):
        parse_rule("urb do stall expect hcrst within soon")


def test_expectation_outcomes_go_into_the_log_and_a_log_with_them_still_replays(
        bus, drv, dev, faults, tmp_path):
    import argparse

    from xhcidbg.faults.cli import apply_fault_options
    scenario = tmp_path / "s.faults"
    scenario.write_text("urb ep=0x81 nth=1 do stall expect reset-endpoint then set-tr-dequeue\n")
    log = tmp_path / "log.jsonl"
    said = []
    apply_fault_options(faults, argparse.Namespace(faults=[str(scenario)], fault_seed=3,
                                                   fault_log=str(log)), say=said.append)
    _in(dev)
    dev.endpoint(0x81).recover()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x.get("action", x.get("status")) for x in lines] == ["cc", "met"]
    assert any("MET" in s for s in said) and any("seed 3" in s for s in said)
    replay = FaultEngine(bus.controller).attach()
    assert len(replay.load(log.read_text())) == 1
    replay.detach()
