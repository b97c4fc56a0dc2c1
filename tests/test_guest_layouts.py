"""The guest's transcription of the TRB and context figures against the controller's: two
independent readings of the spec must place every field they both name at the same bits."""
import pytest

from xhcidbg.emu import context as emu_ctx
from xhcidbg.emu import trb as emu_trb
from xhcidbg.emu.layout import Layout
from xhcidbg.guest import context as guest_ctx
from xhcidbg.guest import trb as guest_trb


def geometry(layout: Layout) -> dict[str, tuple[int, int, int]]:
    return {f.name: (f.dword, f.lo, f.width) for f in layout.fields}


@pytest.mark.parametrize("trb_type", sorted(guest_trb.LAYOUTS), ids=lambda t: emu_trb.trb_name(t))
def test_trb_figures_agree(trb_type):
    guest, controller = guest_trb.LAYOUTS[trb_type], emu_trb.LAYOUTS[trb_type]
    assert geometry(guest) == geometry(controller)


@pytest.mark.parametrize("name", ["SLOT_CTX", "EP_CTX", "INPUT_CTRL_CTX"])
def test_context_figures_agree(name):
    assert geometry(getattr(guest_ctx, name)) == geometry(getattr(emu_ctx, name))


def test_guest_trb_round_trip():
    t = guest_trb.GuestTrb.build(emu_trb.TrbType.ADDRESS_DEVICE, 0x1000, pointer=0x4000, slot=3,
                                 bsr=1, cycle=1)
    assert (t.type, t.cycle, t.field("slot"), t.field("bsr")) == (11, 1, 3, 1)
    assert t.decode() == emu_trb.Trb(t.addr, t.param, t.status, t.control).decode()
