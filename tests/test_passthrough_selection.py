"""How a user names a host device (`--attach`, console `attach`): every form, what a selection
that matches nothing or several devices says, and how a persist selection finds the device
again after it came back with a new address.  (Real devices: tests/test_passthrough.py.)"""
import pytest

from xhcidbg.devices.base import Speed
from xhcidbg.passthrough import HostDevice, Selection, SelectionError
from xhcidbg.passthrough.cli import state, tree


def _dev(bus, ports, address, vid=0x0525, pid=0xA4A0, serial=None, drivers=()):
    from xhcidbg.passthrough.host import HostInterface
    return HostDevice(bus, tuple(ports), address, vid, pid, Speed.HIGH, "Linux", "Gadget Zero",
                      serial, 1, [HostInterface(i, 0, 0xFF, d) for i, d in enumerate(drivers)])


HOST = [_dev(1, (), 1, 0x1D6B, 0x0002), _dev(1, [1], 2, serial="A"),
        _dev(2, [3, 1], 7, serial="B", drivers=["usbtest"]), _dev(2, [4], 3, 0x0525, 0xA4A5)]


@pytest.mark.parametrize("text, picked", [
    ("bus=2,devaddr=7", "2-3.1"), ("0525:a4a0#2", "2-3.1"), ("0525:A4A0#1", "1-1"),
    ("2-3.1", "2-3.1"), ("serial=A", "1-1"), ("0525:a4a5,persist,force", "2-4"),
])
def test_each_form_picks_its_device(text, picked):
    assert Selection.parse(text).pick(HOST).path == picked


def test_flags_are_kept():
    sel = Selection.parse("1-1,persist,force")
    assert (sel.persist, sel.force, sel.bus, sel.ports) == (True, True, 1, (1,))
    deep = Selection.parse("0525:a4a0#2,depth=32,persist")
    assert deep.depth == 32 and deep.same_device_later(HOST[2]).depth == 32
    assert Selection.parse("1-1").depth is None        # the controller's own


@pytest.mark.parametrize("text, says", [
    ("0525:a4a0", "matches 2 devices"), ("0525:a4a0#3", "#1..#2"),
    ("1234:5678", "no host USB device matches"), ("devaddr=2", "needs bus="),
    ("bus=one", "are numbers"), ("red", "not a device selection"),
    ("vendor=1,bus=1", "unknown key vendor"), ("persist", "selects nothing"),
    ("bus=1,devaddr=1", "no host USB device matches"),       # a root hub is never attached
    ("1-1,depth=0", "transfers in flight per endpoint, 1 to 64"), ("1-1,depth=x", "1 to 64"),
])
def test_a_bad_or_ambiguous_selection_says_what_to_do(text, says):
    with pytest.raises(SelectionError, match=says):
        Selection.parse(text).pick(HOST)


def test_persist_finds_the_device_again_by_where_or_what_it_is():
    by_address = Selection.parse("bus=2,devaddr=7,persist").same_device_later(HOST[2])
    back = _dev(2, [3, 1], 9, serial="B")                   # same port, a new address
    assert by_address.matches(back) and by_address.persist
    by_id = Selection.parse("0525:a4a0#2,persist").same_device_later(HOST[2])
    elsewhere = _dev(1, [2], 4, serial="B")                 # another port: still the same one
    assert by_id.matches(elsewhere) and not by_id.matches(_dev(1, [2], 4, serial="C"))


def test_the_tree_nests_by_port_and_says_what_attach_would_meet():
    text = str(tree(HOST).children[0].children[0].label)
    assert text.startswith("1-1") and "0525:a4a0" in text and "serial A" in text
    assert state(HOST[0]) == ("root hub", "dim")
    assert state(HOST[1])[0] == "free: can be attached"
    assert "attach with `force`" in state(HOST[2])[0]
