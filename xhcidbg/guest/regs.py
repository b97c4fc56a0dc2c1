"""xHCI register map as a host driver sees it (xHCI 1.2 chapter 5), written from the spec.

These are the guest driver's own names for offsets and bits; the controller has its own
declarations.  Keeping them apart is deliberate: the scripted guest is a second, independent
reading of the spec, so where the two disagree one of them misread it.
"""
from __future__ import annotations

# ---- capability registers (5.3), offsets from BAR0 -------------------------------------------
CAPLENGTH = 0x00          # 8 bits; HCIVERSION is the 16 bits at 0x02
HCIVERSION = 0x02
HCSPARAMS1 = 0x04         # MaxSlots 7:0, MaxIntrs 18:8, MaxPorts 31:24
HCSPARAMS2 = 0x08         # IST 3:0, ERST Max 7:4, Max Scratchpad Hi 25:21, SPR 26, Lo 31:27
HCSPARAMS3 = 0x0C         # U1 Device Exit Latency 7:0, U2 31:16
HCCPARAMS1 = 0x10
DBOFF = 0x14              # 31:2
RTSOFF = 0x18             # 31:5
HCCPARAMS2 = 0x1C

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
CONFIG_MAX_SLOTS_EN = 0xFF
CONFIG_U3E = 1 << 8
CONFIG_CIE = 1 << 9

# PORTSC bits (5.4.8)
PORT_CCS = 1 << 0         # RO   current connect status
PORT_PED = 1 << 1         # RW1CS: writing 1 DISABLES the port
PORT_OCA = 1 << 3         # RO
PORT_PR = 1 << 4          # RW1S port reset
PORT_PLS_SHIFT = 5        # RWS (needs LWS) port link state 8:5
PORT_PLS_MASK = 0xF << 5
PORT_PP = 1 << 9          # RWS port power
PORT_SPEED_SHIFT = 10     # RO 13:10
PORT_SPEED_MASK = 0xF << 10
PORT_PIC_MASK = 0x3 << 14  # RWS
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
PORT_PRESERVE = PORT_PP | PORT_PIC_MASK | PORT_WCE | PORT_WDE | PORT_WOE

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
ERDP_EHB = 1 << 3
ERDP_DESI_MASK = 0x7

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

PROTOCOL_NAME_USB = 0x20425355   # "USB "

# ---- doorbells (5.6) -------------------------------------------------------------------------
DB_STRIDE = 4              # doorbell n at DBOFF + 4 * n; target 7:0, stream id 31:16


def port_offset(op_base: int, port: int, reg: int = PORTSC) -> int:
    return op_base + PORT_BASE + PORT_STRIDE * (port - 1) + reg


def describe_portsc(v: int) -> str:
    """PORTSC in the words of Linux's xhci_decode_portsc."""
    parts = ["Powered" if v & PORT_PP else "Powered-off",
             "Connected" if v & PORT_CCS else "Not-connected",
             "Enabled" if v & PORT_PED else "Disabled",
             f"Link:{PLS_NAMES.get((v & PORT_PLS_MASK) >> PORT_PLS_SHIFT, 'Unknown')}",
             f"PortSpeed:{(v & PORT_SPEED_MASK) >> PORT_SPEED_SHIFT}"]
    if v & PORT_OCA:
        parts.append("OverCurrent")
    if v & PORT_PR:
        parts.append("In-Reset")
    changes = " ".join(n for bit, n in PORT_CHANGE_NAMES if v & bit)
    parts.append(f"Change: {changes}" if changes else "Change:")
    return " ".join(parts)
