"""xHCI register map (xHCI 1.2 chapter 5), declared once.

BAR0 layout (64 KiB):

    0x0000  capability registers (CAPLENGTH = 0x20)
    0x0020  operational registers; port register sets at +0x400, 0x10 each
    0x0800  extended capabilities: USB Legacy Support, Supported Protocol USB 2.0, USB 3.x
    0x2000  runtime registers: MFINDEX, then 0x20 bytes per interrupter from +0x20
    0x3000  doorbell array, 4 bytes per slot (doorbell 0 rings the command ring)
    0x8000  free for the transport (vfio-user places the MSI-X table and PBA here)

Each register is a `Layout` (fields) plus its offset in its block and which of its fields
software writes (RW), clears by writing 1 (RW1C) or triggers by writing 1 (RW1S).  The MMIO
table (mmio.py), the register owners (controller, ports, interrupters) and the decoders all
take their masks, shifts and names from these declarations.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .layout import Field as F
from .layout import Layout

BAR_SIZE = 0x10000
CAP_LENGTH = 0x20
OP_BASE = CAP_LENGTH
PORT_BASE = OP_BASE + 0x400
XECP_BASE = 0x800
RT_BASE = 0x2000
DB_BASE = 0x3000
TRANSPORT_BASE = 0x8000
HCI_VERSION = 0x0120
MAX_PORTS = 0x40           # port register sets that fit below XECP_BASE


@dataclass(frozen=True)
class Register:
    """One 32-bit register: its fields, its offset in its block, and how writes treat its bits.

    `rw` are the bits software writes and reads back, `rw1c` the bits a 1 clears, `rw1s` the
    strobes a 1 sets (they read as 0).  Bits in none of them are read-only to software.  The
    MMIO table takes the bits a partial write must not echo back from here; register owners take
    their write masks from here (`merge`)."""

    name: str
    offset: int             # from the start of its block
    layout: Layout
    rw: int = 0
    rw1c: int = 0
    rw1s: int = 0
    doc: str = ""

    def __getitem__(self, name: str) -> F:
        return self.layout[name]

    def mask(self, *names: str) -> int:
        """The register bits of the named fields, in place (for masks on hot paths)."""
        m = 0
        for n in names:
            m |= self.layout[n].bits
        return m

    def shift(self, name: str) -> int:
        return self.layout[name].lo

    def encode(self, **values: int) -> int:
        """The register's value with the named fields set (the rest 0)."""
        return self.layout.encode(None, **values)[0]

    def merge(self, old: int, value: int) -> int:
        """The register after software wrote `value` over `old`: RW bits take the written
        value, RW1C bits written as 1 clear, every other bit keeps its state."""
        return (old & ~self.rw & ~(value & self.rw1c)) | (value & self.rw)


def _reg(name: str, offset: int, fields: Iterable[F], rw: Iterable[str] = (),
         rw1c: Iterable[str] = (), rw1s: Iterable[str] = (), doc: str = "") -> Register:
    """A register whose write behaviour is given by field names."""
    layout = Layout(name, 1, fields)

    def bits(names: Iterable[str]) -> int:
        m = 0
        for n in names:
            m |= layout[n].bits
        return m

    return Register(name, offset, layout, bits(rw), bits(rw1c), bits(rw1s), doc)


# ---- capability registers (read-only) -----------------------------------------------------------
CAPLENGTH = _reg("CAPLENGTH", 0x00, (F("caplength", 0, 0, 8), F("hciversion", 0, 16, 16)))
HCSPARAMS1 = _reg("HCSPARAMS1", 0x04, (F("max_slots", 0, 0, 8), F("max_intrs", 0, 8, 11),
                                       F("max_ports", 0, 24, 8)))
HCSPARAMS2 = _reg("HCSPARAMS2", 0x08, (F("ist", 0, 0, 4), F("erst_max", 0, 4, 4),
                                       F("max_scratchpad_hi", 0, 21, 5), F("spr", 0, 26, 1),
                                       F("max_scratchpad_lo", 0, 27, 5)))
HCSPARAMS3 = _reg("HCSPARAMS3", 0x0C, (F("u1_exit_latency", 0, 0, 8),
                                       F("u2_exit_latency", 0, 16, 16)))
HCCPARAMS1 = _reg("HCCPARAMS1", 0x10, (F("ac64", 0, 0), F("bnc", 0, 1), F("csz", 0, 2),
                                       F("ppc", 0, 3), F("pind", 0, 4), F("lhrc", 0, 5),
                                       F("ltc", 0, 6), F("nss", 0, 7), F("pae", 0, 8),
                                       F("spc", 0, 9), F("sec", 0, 10), F("cfc", 0, 11),
                                       F("max_psa_size", 0, 12, 4), F("xecp", 0, 16, 16)))
DBOFF = _reg("DBOFF", 0x14, (F("dboff", 0, 0, 32),))
RTSOFF = _reg("RTSOFF", 0x18, (F("rtsoff", 0, 0, 32),))
HCCPARAMS2 = _reg("HCCPARAMS2", 0x1C, (F("u3c", 0, 0), F("cmc", 0, 1), F("fsc", 0, 2),
                                       F("ctc", 0, 3), F("lec", 0, 4), F("cic", 0, 5),
                                       F("etc", 0, 6)))
CAP_REGS = (CAPLENGTH, HCSPARAMS1, HCSPARAMS2, HCSPARAMS3, HCCPARAMS1, DBOFF, RTSOFF, HCCPARAMS2)

# ---- operational registers ------------------------------------------------------------------
USBCMD = _reg("USBCMD", 0x00, (F("rs", 0, 0), F("hcrst", 0, 1), F("inte", 0, 2), F("hsee", 0, 3),
                               F("lhcrst", 0, 7), F("css", 0, 8), F("crs", 0, 9), F("ewe", 0, 10),
                               F("eu3s", 0, 11), F("cme", 0, 13), F("ete", 0, 14)),
              # CSS/CRS (save/restore state) complete at once and are not stored
              rw=("rs", "inte", "hsee", "ewe", "eu3s", "cme", "ete"), rw1s=("hcrst",))
USBSTS = _reg("USBSTS", 0x04, (F("hch", 0, 0), F("hse", 0, 2), F("eint", 0, 3), F("pcd", 0, 4),
                               F("sss", 0, 8), F("rss", 0, 9), F("sre", 0, 10), F("cnr", 0, 11),
                               F("hce", 0, 12)), rw1c=("hse", "eint", "pcd", "sre"))
PAGESIZE = _reg("PAGESIZE", 0x08, (F("page_size", 0, 0, 16),))
DNCTRL = _reg("DNCTRL", 0x14, (F("notification_enable", 0, 0, 16),),
              rw=("notification_enable",))
CRCR_LO = _reg("CRCR_LO", 0x18, (F("rcs", 0, 0), F("cs", 0, 1), F("ca", 0, 2), F("crr", 0, 3),
                                 F("pointer_lo", 0, 6, 26)),
               rw=("rcs", "pointer_lo"), rw1s=("cs", "ca"))
CRCR_HI = _reg("CRCR_HI", 0x1C, (F("pointer_hi", 0, 0, 32),), rw=("pointer_hi",))
DCBAAP_LO = _reg("DCBAAP_LO", 0x30, (F("pointer_lo", 0, 6, 26),), rw=("pointer_lo",))
DCBAAP_HI = _reg("DCBAAP_HI", 0x34, (F("pointer_hi", 0, 0, 32),), rw=("pointer_hi",))
CONFIG = _reg("CONFIG", 0x38, (F("max_slots_en", 0, 0, 8), F("u3e", 0, 8), F("cie", 0, 9)),
              rw=("max_slots_en", "u3e", "cie"))
OP_REGS = (USBCMD, USBSTS, PAGESIZE, DNCTRL, CRCR_LO, CRCR_HI, DCBAAP_LO, DCBAAP_HI, CONFIG)

# ---- port register set (per port, at PORT_BASE + PORT_STRIDE * (port - 1)) --------------------
PORT_STRIDE = 0x10
PORTSC = _reg("PORTSC", 0x0, (
    F("ccs", 0, 0), F("ped", 0, 1), F("oca", 0, 3), F("pr", 0, 4), F("pls", 0, 5, 4),
    F("pp", 0, 9), F("speed", 0, 10, 4), F("pic", 0, 14, 2), F("lws", 0, 16), F("csc", 0, 17),
    F("pec", 0, 18), F("wrc", 0, 19), F("occ", 0, 20), F("prc", 0, 21), F("plc", 0, 22),
    F("cec", 0, 23), F("cas", 0, 24), F("wce", 0, 25), F("wde", 0, 26), F("woe", 0, 27),
    F("dr", 0, 30), F("wpr", 0, 31)),
    rw=("pic", "wce", "wde", "woe"),
    rw1c=("ped", "csc", "pec", "wrc", "occ", "prc", "plc", "cec"), rw1s=("pr", "lws", "wpr"))
PORTSC_CHANGE_NAMES = ("csc", "pec", "wrc", "occ", "prc", "plc", "cec")
# PORTPMSC as the decoders show it (fields of both protocols); a port stores what its own
# protocol's layout below lets software write.
PORTPMSC = _reg("PORTPMSC", 0x4, (F("u1_timeout", 0, 0, 8), F("u2_timeout", 0, 8, 8),
                                  F("fla", 0, 16), F("test_mode", 0, 28, 4)))
PORTPMSC_USB2 = _reg("PORTPMSC", 0x4, (F("l1s", 0, 0, 3), F("rwe", 0, 3), F("besl", 0, 4, 4),
                                       F("l1_device_slot", 0, 8, 8), F("hle", 0, 16),
                                       F("test_mode", 0, 28, 4)),
                     rw=("l1s", "rwe", "besl", "l1_device_slot", "hle", "test_mode"))
PORTPMSC_USB3 = _reg("PORTPMSC", 0x4, (F("u1_timeout", 0, 0, 8), F("u2_timeout", 0, 8, 8),
                                       F("fla", 0, 16)),
                     rw=("u1_timeout", "u2_timeout", "fla"))
PORTLI = _reg("PORTLI", 0x8, (F("link_error_count", 0, 0, 16), F("rx_lane_count", 0, 16, 4),
                              F("tx_lane_count", 0, 20, 4)))
PORTHLPMC = _reg("PORTHLPMC", 0xC, (F("value", 0, 0, 32),), rw=("value",))
PORT_REGS = (PORTSC, PORTPMSC, PORTLI, PORTHLPMC)
PORTSC_CHANGE_BITS = PORTSC.mask(*PORTSC_CHANGE_NAMES)

# Port link states (PORTSC.PLS)
PLS_U0, PLS_U1, PLS_U2, PLS_U3 = 0, 1, 2, 3
PLS_DISABLED, PLS_RXDETECT, PLS_INACTIVE, PLS_POLLING = 4, 5, 6, 7
PLS_RECOVERY, PLS_HOT_RESET, PLS_COMPLIANCE, PLS_TEST, PLS_RESUME = 8, 9, 10, 11, 15
PLS_NAMES = {0: "U0", 1: "U1", 2: "U2", 3: "U3", 4: "Disabled", 5: "RxDetect", 6: "Inactive",
             7: "Polling", 8: "Recovery", 9: "Hot Reset", 10: "Compliance mode", 11: "Test mode",
             15: "Resume"}

# ---- runtime registers ------------------------------------------------------------------------
MFINDEX = _reg("MFINDEX", 0x00, (F("index", 0, 0, 14),))
MICROFRAME_NS = 125_000            # MFINDEX counts 125 us microframes
IR_BASE = 0x20
IR_STRIDE = 0x20
IMAN = _reg("IMAN", 0x00, (F("ip", 0, 0), F("ie", 0, 1)), rw=("ie",), rw1c=("ip",))
IMOD = _reg("IMOD", 0x04, (F("imodi", 0, 0, 16), F("imodc", 0, 16, 16)), rw=("imodi", "imodc"))
IMOD_UNIT_NS = 250                 # IMODI counts 250 ns
ERSTSZ = _reg("ERSTSZ", 0x08, (F("size", 0, 0, 16),), rw=("size",))
ERSTBA_LO = _reg("ERSTBA_LO", 0x10, (F("pointer_lo", 0, 6, 26),), rw=("pointer_lo",))
ERSTBA_HI = _reg("ERSTBA_HI", 0x14, (F("pointer_hi", 0, 0, 32),), rw=("pointer_hi",))
ERDP_LO = _reg("ERDP_LO", 0x18, (F("desi", 0, 0, 3), F("ehb", 0, 3), F("pointer_lo", 0, 4, 28)),
               rw=("desi", "pointer_lo"), rw1c=("ehb",))
ERDP_HI = _reg("ERDP_HI", 0x1C, (F("pointer_hi", 0, 0, 32),), rw=("pointer_hi",))
IR_REGS = (IMAN, IMOD, ERSTSZ, ERSTBA_LO, ERSTBA_HI, ERDP_LO, ERDP_HI)

# ---- doorbells ---------------------------------------------------------------------------------
DOORBELL = _reg("DOORBELL", 0x0, (F("target", 0, 0, 8), F("stream", 0, 16, 16)))
DB_COUNT = 256                     # doorbell 0 and one per possible slot id

# ---- extended capabilities ----------------------------------------------------------------------
XCAP_LEGACY = 1
XCAP_PROTOCOL = 2
USBLEGSUP = _reg("USBLEGSUP", 0x0, (F("cap_id", 0, 0, 8), F("next", 0, 8, 8),
                                    F("bios_owned", 0, 16), F("os_owned", 0, 24)),
                 rw=("bios_owned", "os_owned"))
USBLEGCTLSTS = _reg("USBLEGCTLSTS", 0x4, (F("smi_enable", 0, 0), F("smi_hse_enable", 0, 4),
                                          F("smi_os_enable", 0, 13), F("smi_pci_cmd_enable", 0, 14),
                                          F("smi_bar_enable", 0, 15), F("smi_event", 0, 16),
                                          F("smi_hse", 0, 20), F("smi_os_change", 0, 29),
                                          F("smi_pci_cmd", 0, 30), F("smi_bar", 0, 31)),
                    rw=("smi_enable", "smi_hse_enable", "smi_os_enable", "smi_pci_cmd_enable",
                        "smi_bar_enable"),
                    rw1c=("smi_os_change", "smi_pci_cmd", "smi_bar"))
LEGACY_REGS = (USBLEGSUP, USBLEGCTLSTS)
SUPPORTED_PROTOCOL = Layout("Supported Protocol", 4, (
    F("cap_id", 0, 0, 8), F("next", 0, 8, 8), F("minor", 0, 16, 8), F("major", 0, 24, 8),
    F("name", 1, 0, 32), F("port_offset", 2, 0, 8), F("port_count", 2, 8, 8),
    F("protocol_defined", 2, 16, 12), F("psic", 2, 28, 4), F("slot_type", 3, 0, 5)))
PROTOCOL_NAME_USB = int.from_bytes(b"USB ", "little")
