"""Tab completion, asked the way prompt_toolkit asks (Document objects), against the
in-process guest: what it offers must be what the parsers, the controller and the disk hold,
and what it offers for conditions must be what the conditions accept."""
from __future__ import annotations

import pytest
from prompt_toolkit.document import Document

from xhcidbg.emu.trb import CC_NAMES, TrbType
from xhcidbg.ui import Console, WorldOptions
from xhcidbg.ui.completion import (
    COMMAND_TYPES,
    EVENT_TYPES,
    TRANSFER_TYPES,
    CommandCompleter,
    cc_names,
    type_names,
)
from xhcidbg.ui.history import KINDS
from xhcidbg.ui.observe import parse_conditions
from xhcidbg.ui.registry import REGISTRY


@pytest.fixture(scope="module")
def con():
    c = Console(WorldOptions(), width=200).start()
    yield c
    c.close()


@pytest.fixture(scope="module")
def words(con):
    comp = CommandCompleter(con)

    def complete(text: str) -> list[str]:
        return [c.text for c in comp.get_completions(Document(text), None)]
    return complete


def test_command_names_and_aliases(words):
    assert set(words("")) == set(REGISTRY.names())
    assert words("hi") == ["history"] and "why" in words("wh")
    assert {"top", "tablet", "trace", "trb"} <= set(words("t"))
    assert words("pause; st") == [n for n in REGISTRY.names() if n.startswith("st")]


def test_subcommands_choices_and_options_from_the_parsers(words):
    assert words("tablet m") == ["move"]
    assert set(words("step ")) >= {"trb", "td", "command"}
    assert set(words("top -")) >= {"-n", "-d", "--once", "--count", "--delay", "--json"}
    assert "--kind" in words("log --k") and "--json" in words("ring ")
    assert words("log --kind ") == list(KINDS) and words("log ev") == ["event"]
    assert set(words("trace ")) >= {"start", "stop", "status", "show", "stats"}
    assert words("trace show --l") == ["--limit"]


def test_slots_dcis_rings_and_registers_from_the_controller(con, words):
    c = con.controller
    slots = [str(s) for s in sorted(c.slots)]
    assert words("log --slot ")[:len(slots)] == slots
    tablet = con.world.guest_devices[con.world.find("tablet")[0]].device.slot
    dcis = [str(d) for d in sorted(c.slots[tablet].endpoints)]
    assert words(f"log --slot {tablet} --dci ") == dcis
    assert words(f"slots {tablet} ")[:len(dcis)] == dcis
    assert words(f"break event slot={tablet} dci=") == dcis
    assert words("break event slot=") == slots
    assert f"{tablet}/3" in words("ring ") and words("regs usbs") == ["USBSTS"]


def test_type_and_cc_names_after_type_and_cc(words):
    assert words("break command type=ad") == ["address"]
    assert "setup" in words("break trb type=se") and "transfer" in words("break event type=")
    assert words("break event cc=sta") == ["stall"]
    assert words("break command cc=") == list(cc_names())
    assert "short-packet" in cc_names() and "usb-transaction" in cc_names()
    assert words("break urb status=ST") == ["STALL"]


def _matched(kind: str, key: str, name: str, values) -> set[int]:
    """The values a breakpoint condition KEY=NAME of `kind` holds for (it must parse)."""
    [condition] = parse_conditions(kind, [f"{key}={name}"])
    return {v for v in values if condition.holds({key: v})}


@pytest.mark.parametrize("kind,types", [("command", COMMAND_TYPES), ("event", EVENT_TYPES),
                                        ("trb", [*TRANSFER_TYPES, *COMMAND_TYPES])])
def test_offered_type_names_are_what_breakpoints_accept(kind, types):
    """Each type has a name offered that a breakpoint condition matches it with, and each name
    offered matches a type of that kind."""
    names = type_names(kind)
    assert len(set(names)) == len(names)
    for t in types:
        assert any(t in _matched(kind, "type", n, types) for n in names), (kind, t)
    for n in names:
        assert _matched(kind, "type", n, types), (kind, n)
    assert _matched(kind, "type", "address", types) == (
        {TrbType.ADDRESS_DEVICE} if kind != "event" else set())


def test_offered_cc_names_are_what_breakpoints_accept():
    """Every completion code has one offered name, which a condition takes and which picks
    that code alone."""
    names = cc_names()
    codes = [cc for cc in CC_NAMES if cc]
    assert len(names) == len(codes) == len(set(names))
    for cc, name in zip(sorted(codes), names, strict=True):
        assert _matched("event", "cc", name, CC_NAMES) == {cc}, (cc, name)
    assert {"stall", "short-packet", "usb-transaction", "success"} <= set(names)


def test_conditions_with_other_operators_and_register_names(words):
    assert words("break event cc!=sta") == ["stall"]
    assert words("break mmio reg=USBS") == ["USBSTS"]
    assert words("break mmio access=w") == ["write"]
    assert words("watch reg PORTS") == ["PORTSC"]
    assert words("break event slot>") == words("break event slot=")


def test_file_names_where_arguments_are_paths(tmp_path, words):
    (tmp_path / "capture.pcapng").write_bytes(b"")
    (tmp_path / "stick.img").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert words(f"trace start {tmp_path}/ca") == [f"{tmp_path}/capture.pcapng"]
    assert words(f"trace show {tmp_path}/s") == [f"{tmp_path}/stick.img", f"{tmp_path}/sub/"]
    assert words(f"plug storage --image {tmp_path}/st") == [f"{tmp_path}/stick.img"]
    assert words(f"log -g {tmp_path}/st") == []         # a regular expression, not a file


def test_py_completes_python_names(words):
    assert words("py hc.sl") == ["hc.slots"]
    assert words("pause; py x = 1; hc.interr") == ["hc.interrupters"]
    assert "TrbType(" in words("py Trb")              # rlcompleter marks callables


def test_history_offers_the_trbs_it_has(con, words):
    fetched = [e.addr for e in con.activity.records if e.kind == "trb"]
    offered = words("history 0x")
    assert offered and offered[0] == f"{fetched[-1]:#x}"
    assert {int(a, 16) for a in offered} <= set(fetched)
