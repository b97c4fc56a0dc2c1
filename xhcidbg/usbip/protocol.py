"""The USB/IP wire format, each message declared once (both directions parse and build).

As Linux implements it (drivers/usb/usbip/, tools/usb/usbip/; Documentation/usb/
usbip_protocol.rst): every field big-endian except the SETUP packet, which travels as the
device sees it.  A connection starts with an operation (OP_REQ_DEVLIST or OP_REQ_IMPORT, each
answered once); after a successful import it carries 48-byte URB headers: CMD_SUBMIT and
CMD_UNLINK from the client, RET_SUBMIT and RET_UNLINK from the server, each followed by its data
and, for isochronous URBs, one descriptor per packet.

Isochronous IN data comes back compacted: the server sends only each packet's actual bytes, one
after another, and the packet descriptors say where each belongs in the transfer buffer.
"""
from __future__ import annotations

from enum import IntEnum

import construct as c

VERSION = 0x0111
PORT = 3240                     # IANA's usbip port, where usbipd listens
PATH_SIZE, BUSID_SIZE = 256, 32


class Op(IntEnum):
    REQ_DEVLIST = 0x8005
    REP_DEVLIST = 0x0005
    REQ_IMPORT = 0x8003
    REP_IMPORT = 0x0003


class Command(IntEnum):
    CMD_SUBMIT = 1
    CMD_UNLINK = 2
    RET_SUBMIT = 3
    RET_UNLINK = 4


class Direction(IntEnum):
    OUT = 0
    IN = 1


class UsbSpeed(IntEnum):
    """Linux's enum usb_device_speed, as OP_REP_DEVLIST and OP_REP_IMPORT carry it."""
    UNKNOWN = 0
    LOW = 1
    FULL = 2
    HIGH = 3
    WIRELESS = 4
    SUPER = 5
    SUPER_PLUS = 6


# urb->transfer_flags bits the server honours (the rest it masks)
URB_SHORT_NOT_OK = 0x0001
URB_ISO_ASAP = 0x0002
URB_ZERO_PACKET = 0x0040
URB_DIR_IN = 0x0200

OpHeader = c.Struct("version" / c.Int16ub, "code" / c.Int16ub, "status" / c.Int32ub)
OP_HEADER_SIZE = OpHeader.sizeof()

UsbDeviceInfo = c.Struct(
    "path" / c.PaddedString(PATH_SIZE, "utf8"),
    "busid" / c.PaddedString(BUSID_SIZE, "utf8"),
    "busnum" / c.Int32ub,
    "devnum" / c.Int32ub,
    "speed" / c.Int32ub,
    "idVendor" / c.Int16ub,
    "idProduct" / c.Int16ub,
    "bcdDevice" / c.Int16ub,
    "bDeviceClass" / c.Int8ub,
    "bDeviceSubClass" / c.Int8ub,
    "bDeviceProtocol" / c.Int8ub,
    "bConfigurationValue" / c.Int8ub,
    "bNumConfigurations" / c.Int8ub,
    "bNumInterfaces" / c.Int8ub,
)
DEVICE_INFO_SIZE = UsbDeviceInfo.sizeof()           # 312
UsbInterfaceInfo = c.Struct("bInterfaceClass" / c.Int8ub, "bInterfaceSubClass" / c.Int8ub,
                            "bInterfaceProtocol" / c.Int8ub, c.Padding(1))
INTERFACE_INFO_SIZE = UsbInterfaceInfo.sizeof()     # 4
DevlistCount = c.Int32ub                            # after OP_REP_DEVLIST's header
ImportRequest = c.Struct("busid" / c.PaddedString(BUSID_SIZE, "utf8"))

# The URB header: the basic part, then 28 bytes that depend on the command.
UrbHeader = c.Struct(
    "command" / c.Int32ub,
    "seqnum" / c.Int32ub,
    "devid" / c.Int32ub,            # busnum << 16 | devnum
    "direction" / c.Int32ub,
    "ep" / c.Int32ub,
    "body" / c.Bytes(28),
)
URB_HEADER_SIZE = UrbHeader.sizeof()                # 48
CmdSubmit = c.Struct(
    "transfer_flags" / c.Int32ub,
    "transfer_buffer_length" / c.Int32sb,
    "start_frame" / c.Int32sb,
    "number_of_packets" / c.Int32sb,
    "interval" / c.Int32sb,
    "setup" / c.Bytes(8),
)
RetSubmit = c.Struct(
    "status" / c.Int32sb,
    "actual_length" / c.Int32sb,
    "start_frame" / c.Int32sb,
    "number_of_packets" / c.Int32sb,
    "error_count" / c.Int32sb,
    c.Padding(8),
)
CmdUnlink = c.Struct("unlink_seqnum" / c.Int32ub, c.Padding(24))
RetUnlink = c.Struct("status" / c.Int32sb, c.Padding(24))
IsoPacket = c.Struct(
    "offset" / c.Int32ub,
    "length" / c.Int32ub,
    "actual_length" / c.Int32ub,
    "status" / c.Int32sb,
)
ISO_PACKET_SIZE = IsoPacket.sizeof()                # 16

URB_HEADER = UrbHeader.compile()
CMD_SUBMIT = CmdSubmit.compile()
RET_SUBMIT = RetSubmit.compile()
RET_UNLINK = RetUnlink.compile()
ISO_PACKET = IsoPacket.compile()


def devid(busnum: int, devnum: int) -> int:
    return (busnum & 0xFFFF) << 16 | (devnum & 0xFFFF)


class Errno(IntEnum):
    """The Linux errno values a server puts in a URB's status (negated), whatever the client's
    own operating system numbers them."""
    ENOENT = 2
    EXDEV = 18
    ENODEV = 19
    EPIPE = 32
    ETIME = 62
    EPROTO = 71
    EOVERFLOW = 75
    EILSEQ = 84
    ECONNRESET = 104
    ESHUTDOWN = 108
    ETIMEDOUT = 110
    EREMOTEIO = 121
    EINPROGRESS = 115
    ECOMM = 70
    ENOSR = 63


def errno_name(status: int) -> str:
    try:
        return f"-{Errno(-status).name}"
    except ValueError:
        return str(status)
