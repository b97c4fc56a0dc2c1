"""xHCI register map (xHCI 1.2 chapter 5), declared once.

BAR0 layout (64 KiB):

    0x0000  capability registers (CAPLENGTH = 0x20)
    0x0020  operational registers; port register sets at +0x400, 0x10 each
    0x0800  extended capabilities: USB Legacy Support, Supported Protocol USB 2.0, USB 3.x
    0x2000  runtime registers: MFINDEX, then 0x20 bytes per interrupter from +0x20
    0x3000  doorbell array, 4 bytes per slot (doorbell 0 rings the command ring)
    0x8000  free for the transport (vfio-user places the MSI-X table and PBA here)

Each register is a `Layout` (fields) plus an offset and the masks of its RW1C / RW1S bits,
which the MMIO dispatcher and the decoders derive from the one declaration.
"""
from __future__ import annotations

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
    name: str
    offset: int             # from the start of its block
    layout: Layout
    rw1c: int = 0           # bits cleared by writing 1
    rw1s: int = 0           # bits set by writing 1, read as 0 (strobes)
    doc: str = ""

    def mask(self, *names: str) -> int:
        """The register bits of the named fields, in place (for masks on hot paths)."""
        m = 0
        for n in names:
            f = self.layout[n]
            m |= f.mask << f.lo
        return m

    def shift(self, name: str) -> int:
        return self.layout[name].lo


def _reg(name, offset, fields, rw1c=0, rw1s=0, doc="") -> Register:
    return Register(name, offset, Layout(name, 1, fields), rw1c, rw1s, doc)


# ---- capability registers ---------------------------------------------------------------------
CAP_REGS = (
    _reg("CAPLENGTH", 0x00, (F("caplength", 0, 0, 8), F("hciversion", 0, 16, 16))),
    _reg("HCSPARAMS1", 0x04, (F("max_slots", 0, 0, 8), F("max_intrs", 0, 8, 11),
                              F("max_ports", 0, 24, 8))),
    _reg("HCSPARAMS2", 0x08, (F("ist", 0, 0, 4), F("erst_max", 0, 4, 4),
                              F("max_scratchpad_hi", 0, 21, 5), F("spr", 0, 26, 1),
                              F("max_scratchpad_lo", 0, 27, 5))),
    _reg("HCSPARAMS3", 0x0C, (F("u1_exit_latency", 0, 0, 8), F("u2_exit_latency", 0, 16, 16))),
    _reg("HCCPARAMS1", 0x10, (F("ac64", 0, 0), F("bnc", 0, 1), F("csz", 0, 2), F("ppc", 0, 3),
                              F("pind", 0, 4), F("lhrc", 0, 5), F("ltc", 0, 6), F("nss", 0, 7),
                              F("pae", 0, 8), F("spc", 0, 9), F("sec", 0, 10), F("cfc", 0, 11),
                              F("max_psa_size", 0, 12, 4), F("xecp", 0, 16, 16))),
    _reg("DBOFF", 0x14, (F("dboff", 0, 0, 32),)),
    _reg("RTSOFF", 0x18, (F("rtsoff", 0, 0, 32),)),
    _reg("HCCPARAMS2", 0x1C, (F("u3c", 0, 0), F("cmc", 0, 1), F("fsc", 0, 2), F("ctc", 0, 3),
                              F("lec", 0, 4), F("cic", 0, 5), F("etc", 0, 6))),
)

# ---- operational registers ------------------------------------------------------------------
USBCMD = _reg("USBCMD", 0x00, (F("rs", 0, 0), F("hcrst", 0, 1), F("inte", 0, 2), F("hsee", 0, 3),
                               F("lhcrst", 0, 7), F("css", 0, 8), F("crs", 0, 9), F("ewe", 0, 10),
                               F("eu3s", 0, 11), F("cme", 0, 13), F("ete", 0, 14)))
USBSTS = _reg("USBSTS", 0x04, (F("hch", 0, 0), F("hse", 0, 2), F("eint", 0, 3), F("pcd", 0, 4),
                               F("sss", 0, 8), F("rss", 0, 9), F("sre", 0, 10), F("cnr", 0, 11),
                               F("hce", 0, 12)), rw1c=(1 << 2) | (1 << 3) | (1 << 4) | (1 << 10))
PAGESIZE = _reg("PAGESIZE", 0x08, (F("page_size", 0, 0, 16),))
DNCTRL = _reg("DNCTRL", 0x14, (F("notification_enable", 0, 0, 16),))
CRCR_LO = _reg("CRCR_LO", 0x18, (F("rcs", 0, 0), F("cs", 0, 1), F("ca", 0, 2), F("crr", 0, 3),
                                 F("pointer_lo", 0, 6, 26)), rw1s=(1 << 1) | (1 << 2))
CRCR_HI = _reg("CRCR_HI", 0x1C, (F("pointer_hi", 0, 0, 32),))
DCBAAP_LO = _reg("DCBAAP_LO", 0x30, (F("pointer_lo", 0, 6, 26),))
DCBAAP_HI = _reg("DCBAAP_HI", 0x34, (F("pointer_hi", 0, 0, 32),))
CONFIG = _reg("CONFIG", 0x38, (F("max_slots_en", 0, 0, 8), F("u3e", 0, 8), F("cie", 0, 9)))
OP_REGS = (USBCMD, USBSTS, PAGESIZE, DNCTRL, CRCR_LO, CRCR_HI, DCBAAP_LO, DCBAAP_HI, CONFIG)

# ---- port register set (per port, at PORT_BASE + 0x10 * (port - 1)) --------------------------
PORTSC = _reg("PORTSC", 0x0, (
    F("ccs", 0, 0), F("ped", 0, 1), F("oca", 0, 3), F("pr", 0, 4), F("pls", 0, 5, 4),
    F("pp", 0, 9), F("speed", 0, 10, 4), F("pic", 0, 14, 2), F("lws", 0, 16), F("csc", 0, 17),
    F("pec", 0, 18), F("wrc", 0, 19), F("occ", 0, 20), F("prc", 0, 21), F("plc", 0, 22),
    F("cec", 0, 23), F("cas", 0, 24), F("wce", 0, 25), F("wde", 0, 26), F("woe", 0, 27),
    F("dr", 0, 30), F("wpr", 0, 31)),
    rw1c=0x00FE0000 | (1 << 1), rw1s=(1 << 4) | (1 << 16) | (1 << 31))
PORTSC_CHANGE_NAMES = ("csc", "pec", "wrc", "occ", "prc", "plc", "cec")
PORTPMSC = _reg("PORTPMSC", 0x4, (F("u1_timeout", 0, 0, 8), F("u2_timeout", 0, 8, 8),
                                  F("fla", 0, 16), F("test_mode", 0, 28, 4)))
PORTLI = _reg("PORTLI", 0x8, (F("link_error_count", 0, 0, 16), F("rx_lane_count", 0, 16, 4),
                              F("tx_lane_count", 0, 20, 4)))
PORTHLPMC = _reg("PORTHLPMC", 0xC, (F("value", 0, 0, 32),))
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
IR_BASE = 0x20
IR_STRIDE = 0x20
IMAN = _reg("IMAN", 0x00, (F("ip", 0, 0), F("ie", 0, 1)), rw1c=1)
IMOD = _reg("IMOD", 0x04, (F("imodi", 0, 0, 16), F("imodc", 0, 16, 16)))
ERSTSZ = _reg("ERSTSZ", 0x08, (F("size", 0, 0, 16),))
ERSTBA_LO = _reg("ERSTBA_LO", 0x10, (F("pointer_lo", 0, 6, 26),))
ERSTBA_HI = _reg("ERSTBA_HI", 0x14, (F("pointer_hi", 0, 0, 32),))
ERDP_LO = _reg("ERDP_LO", 0x18, (F("desi", 0, 0, 3), F("ehb", 0, 3), F("pointer_lo", 0, 4, 28)),
               rw1c=1 << 3)
ERDP_HI = _reg("ERDP_HI", 0x1C, (F("pointer_hi", 0, 0, 32),))
IR_REGS = (IMAN, IMOD, ERSTSZ, ERSTBA_LO, ERSTBA_HI, ERDP_LO, ERDP_HI)

# ---- doorbells ---------------------------------------------------------------------------------
DOORBELL = _reg("DOORBELL", 0x0, (F("target", 0, 0, 8), F("stream", 0, 16, 16)))

# ---- extended capabilities ----------------------------------------------------------------------
XCAP_LEGACY = 1
XCAP_PROTOCOL = 2
USBLEGSUP = _reg("USBLEGSUP", 0x0, (F("cap_id", 0, 0, 8), F("next", 0, 8, 8),
                                    F("bios_owned", 0, 16), F("os_owned", 0, 24)))
USBLEGCTLSTS = _reg("USBLEGCTLSTS", 0x4, (F("smi_enable", 0, 0), F("smi_hse_enable", 0, 4),
                                          F("smi_os_enable", 0, 13), F("smi_pci_cmd_enable", 0, 14),
                                          F("smi_bar_enable", 0, 15), F("smi_event", 0, 16),
                                          F("smi_hse", 0, 20), F("smi_os_change", 0, 29),
                                          F("smi_pci_cmd", 0, 30), F("smi_bar", 0, 31)),
                     rw1c=(1 << 29) | (1 << 30) | (1 << 31))
SUPPORTED_PROTOCOL = Layout("Supported Protocol", 4, (
    F("cap_id", 0, 0, 8), F("next", 0, 8, 8), F("minor", 0, 16, 8), F("major", 0, 24, 8),
    F("name", 1, 0, 32), F("port_offset", 2, 0, 8), F("port_count", 2, 8, 8),
    F("protocol_defined", 2, 16, 12), F("psic", 2, 28, 4), F("slot_type", 3, 0, 5)))


def reg_name(offset: int, n_ports: int, n_intrs: int) -> str:
    """Human name of the register at BAR0 `offset` (for traces and the console)."""
    if offset < CAP_LENGTH:
        for r in CAP_REGS:
            if r.offset <= offset < r.offset + 4:
                return r.name
    elif offset < PORT_BASE:
        rel = offset - OP_BASE
        for r in OP_REGS:
            if r.offset <= rel < r.offset + 4:
                return r.name
        return f"OP+{rel:#x}"
    elif offset < PORT_BASE + 0x10 * n_ports:
        rel = offset - PORT_BASE
        return f"{PORT_REGS[(rel % 0x10) // 4].name}[{rel // 0x10 + 1}]"
    elif XECP_BASE <= offset < RT_BASE:
        return f"XECP+{offset - XECP_BASE:#x}"
    elif RT_BASE <= offset < RT_BASE + IR_BASE:
        return "MFINDEX" if offset < RT_BASE + 4 else f"RT+{offset - RT_BASE:#x}"
    elif RT_BASE + IR_BASE <= offset < RT_BASE + IR_BASE + IR_STRIDE * n_intrs:
        rel = offset - RT_BASE - IR_BASE
        for r in IR_REGS:
            if r.offset <= rel % IR_STRIDE < r.offset + 4:
                return f"{r.name}[{rel // IR_STRIDE}]"
    elif DB_BASE <= offset < DB_BASE + 4 * 256:
        return f"DOORBELL[{(offset - DB_BASE) // 4}]"
    return f"BAR0+{offset:#x}"
