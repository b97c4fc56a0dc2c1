"""xHCI register map as a host driver sees it (xHCI 1.2 chapter 5), written from the spec.

These are the guest driver's own names for offsets and bits; the controller has its own
declarations.  Keeping them apart is deliberate: the scripted guest is a second, independent
reading of the spec, so where the two disagree one of them misread it.

Multi-bit fields are `Field`s of a one-dword layout (dword 0 is the register), declared with
`fields.bits` at the bit range the spec prints; single bits are plain masks.
"""
from __future__ import annotations

from .fields import bits, field_mask, read

# ---- capability registers (5.3), offsets from BAR0 -------------------------------------------
CAPLENGTH = 0x00          # 8 bits; HCIVERSION is the 16 bits at 0x02
HCIVERSION = 0x02
HCSPARAMS1 = 0x04
HCSPARAMS2 = 0x08
HCSPARAMS3 = 0x0C
HCCPARAMS1 = 0x10
DBOFF = 0x14
RTSOFF = 0x18
HCCPARAMS2 = 0x1C

# The dword at CAPLENGTH (5.3.1, 5.3.2)
CAP_CAPLENGTH = bits("caplength", 0, 7, 0)
CAP_HCIVERSION = bits("hciversion", 0, 31, 16)
# HCSPARAMS1 (5.3.3)
HCS1_MAX_SLOTS = bits("max_slots", 0, 7, 0)
HCS1_MAX_INTRS = bits("max_interrupters", 0, 18, 8)
HCS1_MAX_PORTS = bits("max_ports", 0, 31, 24)
# HCSPARAMS2 (5.3.4): the scratchpad count is split, Hi 25:21 above Lo 31:27
HCS2_IST = bits("ist", 0, 3, 0)
HCS2_ERST_MAX = bits("erst_max", 0, 7, 4)
HCS2_SCRATCHPADS_HI = bits("max_scratchpads_hi", 0, 25, 21)
HCS2_SPR = 1 << 26
HCS2_SCRATCHPADS_LO = bits("max_scratchpads_lo", 0, 31, 27)
# HCSPARAMS3 (5.3.5)
HCS3_U1_EXIT_LATENCY = bits("u1_exit_latency", 0, 7, 0)
HCS3_U2_EXIT_LATENCY = bits("u2_exit_latency", 0, 31, 16)
# DBOFF and RTSOFF (5.3.7, 5.3.8): offsets with their reserved low bits masked off
DBOFF_OFFSET = bits("dboff", 0, 31, 2)
RTSOFF_OFFSET = bits("rtsoff", 0, 31, 5)

# HCCPARAMS1 bits
HCC1_AC64 = 1 << 0
HCC1_BNC = 1 << 1
HCC1_CSZ = 1 << 2
HCC1_PPC = 1 << 3
HCC1_PIND = 1 << 4
HCC1_LHRC = 1 << 5
HCC1_LTC = 1 << 6
HCC1_NSS = 1 << 7
HCC1_PAE = 1 << 8
HCC1_SPC = 1 << 9
HCC1_SEC = 1 << 10
HCC1_CFC = 1 << 11
HCC1_MAX_PSA_SIZE = bits("max_psa_size", 0, 15, 12)
HCC1_XECP = bits("xecp", 0, 31, 16)       # in dwords from BAR0

# HCCPARAMS2 bits
HCC2_U3C = 1 << 0
HCC2_CMC = 1 << 1
HCC2_FSC = 1 << 2
HCC2_CTC = 1 << 3
HCC2_LEC = 1 << 4
HCC2_CIC = 1 << 5
HCC2_ETC = 1 << 6
HCC2_ETC_TSC = 1 << 7
HCC2_GSC = 1 << 8
HCC2_VTC = 1 << 9

# ---- operational registers (5.4), offsets from CAPLENGTH --------------------------------------
USBCMD = 0x00
USBSTS = 0x04
PAGESIZE = 0x08
DNCTRL = 0x14
CRCR = 0x18               # 64 bits
DCBAAP = 0x30             # 64 bits
CONFIG = 0x38
PORT_BASE = 0x400         # port register set n (1-based) at PORT_BASE + 0x10 * (n - 1)
PORT_STRIDE = 0x10
PORTSC = 0x0
PORTPMSC = 0x4
PORTLI = 0x8
PORTHLPMC = 0xC
PAGESIZE_BITS = bits("page_size", 0, 15, 0)   # bit n set: pages of 2**(n + 12) bytes

# USBCMD bits
CMD_RS = 1 << 0
CMD_HCRST = 1 << 1
CMD_INTE = 1 << 2
CMD_HSEE = 1 << 3
CMD_LHCRST = 1 << 7
CMD_CSS = 1 << 8
CMD_CRS = 1 << 9
CMD_EWE = 1 << 10
CMD_EU3S = 1 << 11
CMD_CME = 1 << 13

# USBSTS bits (HSE, EINT, PCD, SRE are RW1C)
STS_HCH = 1 << 0
STS_HSE = 1 << 2
STS_EINT = 1 << 3
STS_PCD = 1 << 4
STS_SSS = 1 << 8
STS_RSS = 1 << 9
STS_SRE = 1 << 10
STS_CNR = 1 << 11
STS_HCE = 1 << 12

# CRCR bits
CRCR_RCS = 1 << 0
CRCR_CS = 1 << 1
CRCR_CA = 1 << 2
CRCR_CRR = 1 << 3

# CONFIG bits
CONFIG_MAX_SLOTS_EN = bits("max_slots_en", 0, 7, 0)
CONFIG_U3E = 1 << 8
CONFIG_CIE = 1 << 9

# PORTSC bits (5.4.8)
PORT_CCS = 1 << 0         # RO   current connect status
PORT_PED = 1 << 1         # RW1CS: writing 1 DISABLES the port
PORT_OCA = 1 << 3         # RO
PORT_PR = 1 << 4          # RW1S port reset
PORT_PLS = bits("pls", 0, 8, 5)           # RWS (written with LWS) port link state
PORT_PP = 1 << 9          # RWS port power
PORT_SPEED = bits("speed", 0, 13, 10)     # RO protocol speed ID
PORT_PIC = bits("pic", 0, 15, 14)         # RWS port indicator control
PORT_LWS = 1 << 16        # RW link state write strobe
PORT_CSC = 1 << 17        # RW1CS change bits 17..23
PORT_PEC = 1 << 18
PORT_WRC = 1 << 19
PORT_OCC = 1 << 20
PORT_PRC = 1 << 21
PORT_PLC = 1 << 22
PORT_CEC = 1 << 23
PORT_CAS = 1 << 24        # RO
PORT_WCE = 1 << 25        # RWS wake enables 27:25
PORT_WDE = 1 << 26
PORT_WOE = 1 << 27
PORT_DR = 1 << 30         # RO device removable
PORT_WPR = 1 << 31        # RW1S warm port reset (USB3)

PORT_CHANGE_BITS = PORT_CSC | PORT_PEC | PORT_WRC | PORT_OCC | PORT_PRC | PORT_PLC | PORT_CEC
# Bits a read-modify-write must carry back unchanged: the sticky read/write ones.  Everything
# else is written 0 so no change bit is cleared, PED is not turned off and no reset starts.
PORT_PRESERVE = PORT_PP | field_mask(PORT_PIC) | PORT_WCE | PORT_WDE | PORT_WOE

PLS_NAMES = {0: "U0", 1: "U1", 2: "U2", 3: "U3", 4: "Disabled", 5: "RxDetect", 6: "Inactive",
             7: "Polling", 8: "Recovery", 9: "Hot Reset", 10: "Compliance mode", 11: "Test mode",
             15: "Resume"}
PORT_CHANGE_NAMES = ((PORT_CSC, "CSC"), (PORT_PEC, "PEC"), (PORT_WRC, "WRC"), (PORT_OCC, "OCC"),
                     (PORT_PRC, "PRC"), (PORT_PLC, "PLC"), (PORT_CEC, "CEC"))

# ---- runtime registers (5.5), offsets from RTSOFF ---------------------------------------------
MFINDEX = 0x00
IR_BASE = 0x20            # interrupter register set n at IR_BASE + 0x20 * n
IR_STRIDE = 0x20
IMAN = 0x00               # IP bit 0 (RW1C), IE bit 1
IMOD = 0x04               # IMODI 15:0 (250 ns units), IMODC 31:16
ERSTSZ = 0x08             # 15:0
ERSTBA = 0x10             # 64 bits, 63:6
ERDP = 0x18               # 64 bits: DESI 2:0, EHB bit 3 (RW1C), pointer 63:4

IMAN_IP = 1 << 0
IMAN_IE = 1 << 1
IMOD_INTERVAL = bits("imodi", 0, 15, 0)
ERSTSZ_SIZE = bits("erstsz", 0, 15, 0)
ERDP_EHB = 1 << 3
ERDP_DESI = bits("desi", 0, 2, 0)         # Dequeue ERST Segment Index

# ---- extended capabilities (7) ---------------------------------------------------------------
XCAP_LEGACY = 1
XCAP_PROTOCOL = 2
XCAP_POWER = 3
XCAP_IOV = 4
XCAP_MSI = 5
XCAP_LOCAL_MEMORY = 6
XCAP_DEBUG = 10
XCAP_EXT_MSI = 17

LEGSUP_BIOS_OWNED = 1 << 16
LEGSUP_OS_OWNED = 1 << 24
LEGCTLSTS = 0x4            # USB Legacy Support Control/Status, after USBLEGSUP
LEGCTLSTS_SMI_ENABLES = (1 << 0) | (1 << 4) | (1 << 13) | (1 << 14) | (1 << 15)
LEGCTLSTS_SMI_EVENTS = (1 << 29) | (1 << 30) | (1 << 31)   # RW1C

# Extended capability header (7.0)
XCAP_ID = bits("id", 0, 7, 0)
XCAP_NEXT = bits("next", 0, 15, 8)        # in dwords from this capability; 0 ends the list
# Supported Protocol capability (7.2): dword 0 is the header, then name, ports, slot type, PSIs
PROTOCOL_MINOR = bits("minor", 0, 23, 16)
PROTOCOL_MAJOR = bits("major", 0, 31, 24)
PROTOCOL_PORT_OFFSET = bits("port_offset", 0, 7, 0)      # dword 2
PROTOCOL_PORT_COUNT = bits("port_count", 0, 15, 8)       # dword 2
PROTOCOL_PSIC = bits("psic", 0, 31, 28)                  # dword 2
PROTOCOL_SLOT_TYPE = bits("slot_type", 0, 4, 0)          # dword 3
PROTOCOL_NAME_USB = 0x20425355   # "USB "

# ---- doorbells (5.6) -------------------------------------------------------------------------
DB_STRIDE = 4              # doorbell n at DBOFF + 4 * n
DB_TARGET = bits("target", 0, 7, 0)
DB_STREAM = bits("stream", 0, 31, 16)


def port_offset(op_base: int, port: int, reg: int = PORTSC) -> int:
    return op_base + PORT_BASE + PORT_STRIDE * (port - 1) + reg


def describe_portsc(v: int) -> str:
    """PORTSC in the words of Linux's xhci_decode_portsc."""
    parts = ["Powered" if v & PORT_PP else "Powered-off",
             "Connected" if v & PORT_CCS else "Not-connected",
             "Enabled" if v & PORT_PED else "Disabled",
             f"Link:{PLS_NAMES.get(read(PORT_PLS, v), 'Unknown')}",
             f"PortSpeed:{read(PORT_SPEED, v)}"]
    if v & PORT_OCA:
        parts.append("OverCurrent")
    if v & PORT_PR:
        parts.append("In-Reset")
    changes = " ".join(n for bit, n in PORT_CHANGE_NAMES if v & bit)
    parts.append(f"Change: {changes}" if changes else "Change:")
    return " ".join(parts)
