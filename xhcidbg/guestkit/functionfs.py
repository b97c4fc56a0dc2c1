"""FunctionFS in a kit guest: gadget functions whose descriptors are whatever a test declares.

configfs functions (gadgets.py) present the descriptors their kernel driver hard-codes.  A
FunctionFS function (usb_f_fs, configfs name `ffs.<instance>`) presents the descriptors a user
space daemon writes to its ep0 file.  This module declares them (`FunctionFs`: bytes per speed,
or `FunctionFs.declared` from xhcidbg's own `Interface`/`EndpointDecl` declarations) and builds
the blobs FunctionFS reads (Documentation/usb/functionfs.rst, include/uapi/linux/usb/
functionfs.h); `FunctionFs.start`, which `Gadgets.create` calls before any bind, runs the daemon
(functionfs_daemon, the venv's Python in the guest's host root) and waits until it has written
both blobs to ep0, the gadget's UDC being written only after that.  The daemon then keeps ep0
open, logs every event and answers control requests: the replies the function declares, a stall
for any other.  `Gadgets.remove` stops it, which closes ep0 and unmounts the instance.

    disk = Gadget("uas", [UasShapedDisk()])     # Bulk-Only alt 0, UAS alt 1
    plugged = await Gadgets(vm).plug(disk)       # the daemon is started, then the UDC bound

What Linux 6.1's FunctionFS accepts, read from f_fs.c (ffs_do_single_desc) and seen in the
guest: interface, endpoint, SuperSpeed endpoint companion, interface association, OTG and the
HID/CCID class descriptor (0x21); any other type, class-specific interface descriptors (0x24,
among them UAS's Pipe Usage) included, makes the descriptors write fail with EINVAL.  Endpoint
addresses are keys only: FunctionFS gives each endpoint descriptor its own UDC endpoint, so
every endpoint descriptor of a speed needs its own address (two alternate settings cannot share
one), and the host sees the addresses the UDC assigned.
"""
from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING, Any

import construct as c
from usb_protocol.types.descriptor import DescriptorField, DescriptorFormat, DescriptorNumber

from ..devices.base import EpType, Speed
from ..devices.declaration import EndpointDecl, Interface
from ..devices.descriptor_set import endpoint_descriptors
from ..devices.descriptors import InterfaceDescriptor
from . import functionfs_daemon
from .functionfs_daemon import EventType, Replies
from .gadgets import FILE_STORAGE, LANGUAGE, NETCHIP, Function

if TYPE_CHECKING:
    from .hostroot import Job
    from .launch import Vm

__all__ = [
    "FFS_SPEEDS", "BulkOnly", "DescriptorsV2", "EventType", "Flags", "FunctionFs",
    "MassStorageCode", "PipeId", "PipeUsageDescriptor", "Replies", "StringsBlob", "UasShapedDisk",
    "descriptor_count", "descriptors_blob", "function_descriptors", "setting_strings",
    "strings_blob",
    "uas_disk_descriptors", "uas_disk_settings",
]

# ---- the blobs ep0 takes (include/uapi/linux/usb/functionfs.h) --------------------------------

DESCRIPTORS_MAGIC_V2 = 3
STRINGS_MAGIC = 2


class Flags(IntFlag):
    """The v2 descriptors header's flags: which speeds' descriptors follow, and options."""
    NONE = 0
    HAS_FS_DESC = 1
    HAS_HS_DESC = 2
    HAS_SS_DESC = 4
    HAS_MS_OS_DESC = 8
    VIRTUAL_ADDR = 16           # keep the endpoint addresses the descriptors give
    EVENTFD = 32
    ALL_CTRL_RECIP = 64         # every control request reaches the daemon, not only its own
    CONFIG0_SETUP = 128


# The speeds FunctionFS keeps descriptors for, in blob order, with their flag.
FFS_SPEEDS = {Speed.FULL: Flags.HAS_FS_DESC, Speed.HIGH: Flags.HAS_HS_DESC,
              Speed.SUPER: Flags.HAS_SS_DESC}


def _descriptors_length(this: Any) -> int:
    return 12 + 4 * len(this.counts) + len(this.descriptors)


# magic, length, flags; one descriptor count per speed flagged (full, high, super); then each
# speed's descriptors, one after the other (no MS OS descriptors or eventfd here).
DescriptorsV2 = c.Struct(
    "magic" / c.Const(DESCRIPTORS_MAGIC_V2, c.Int32ul),
    "length" / c.Rebuild(c.Int32ul, _descriptors_length),
    "flags" / c.Int32ul,
    "counts" / c.Array(lambda this: bin(this.flags & 7).count("1"), c.Int32ul),
    "descriptors" / c.GreedyBytes,
)


def _strings_length(this: Any) -> int:
    return 16 + sum(2 + sum(len(s.encode()) + 1 for s in language["strings"])
                    for language in this.languages)


# magic, length, strings per language, languages; per language its code and NUL-ended strings,
# string 1 first (descriptors' string indexes are the function's own, from 1).
StringsBlob = c.Struct(
    "magic" / c.Const(STRINGS_MAGIC, c.Int32ul),
    "length" / c.Rebuild(c.Int32ul, _strings_length),
    "str_count" / c.Int32ul,
    "lang_count" / c.Rebuild(c.Int32ul, c.len_(c.this.languages)),
    "languages" / c.Array(c.this.lang_count, c.Struct(
        "code" / c.Int16ul,
        "strings" / c.Array(c.this._.str_count, c.CString("utf8")),
    )),
)


def descriptor_count(blob: bytes) -> int:
    """How many descriptors `blob` holds (walking bLength)."""
    count = position = 0
    while position < len(blob):
        if blob[position] < 2:
            raise ValueError(f"a descriptor at byte {position} has bLength {blob[position]}")
        position += blob[position]
        count += 1
    if position != len(blob):
        raise ValueError("the last descriptor runs past the end of the blob")
    return count


def descriptors_blob(descriptors: Mapping[Speed, bytes], flags: Flags = Flags.NONE) -> bytes:
    """The v2 blob for ep0 from each speed's descriptors (FULL, HIGH, SUPER; any may be
    missing, the kernel falls back to a lower speed's)."""
    speeds = [s for s in FFS_SPEEDS if descriptors.get(s)]
    if not speeds:
        raise ValueError("FunctionFS needs descriptors for at least one speed")
    if set(descriptors) - set(FFS_SPEEDS):
        raise ValueError(f"FunctionFS keeps descriptors for {[s.name for s in FFS_SPEEDS]} only")
    for speed in speeds:
        flags |= FFS_SPEEDS[speed]
    blob: bytes = DescriptorsV2.build({
        "flags": int(flags), "counts": [descriptor_count(descriptors[s]) for s in speeds],
        "descriptors": b"".join(descriptors[s] for s in speeds)})
    return blob


def strings_blob(strings: Sequence[str], language: int = int(LANGUAGE, 16)) -> bytes:
    """The strings blob for ep0: `strings` (index 1 first) in one language, or none at all."""
    blob: bytes = StringsBlob.build({
        "str_count": len(strings),
        "languages": [{"code": language, "strings": list(strings)}] if strings else []})
    return blob


# ---- declaring descriptors --------------------------------------------------------------------

def function_descriptors(settings: Sequence[Interface], speed: Speed,
                         strings: Sequence[str] = (),
                         after_endpoint: Mapping[tuple[int, int, int], bytes] | None = None
                         ) -> bytes:
    """A function's descriptors at `speed` from xhcidbg's own declarations: each alternate
    setting's interface descriptor (iInterface: its name's index in `strings`, from 1) and class
    descriptors, then its endpoints, each with its SuperSpeed companion at SuperSpeed and
    `after_endpoint[(interface, alternate, address)]` (class-specific endpoint descriptors)."""
    extras = after_endpoint or {}
    out = b""
    for setting in settings:
        out += InterfaceDescriptor.build({
            "bInterfaceNumber": setting.number, "bAlternateSetting": setting.alternate,
            "bNumEndpoints": len(setting.endpoints), "bInterfaceClass": setting.cls,
            "bInterfaceSubclass": setting.subclass, "bInterfaceProtocol": setting.protocol,
            "iInterface": list(strings).index(setting.name) + 1 if setting.name else 0})
        out += b"".join(setting.class_descriptors)
        for endpoint in setting.endpoints:
            out += endpoint_descriptors(endpoint, speed)
            out += extras.get((setting.number, setting.alternate, endpoint.address), b"")
    return out


def setting_strings(settings: Sequence[Interface]) -> list[str]:
    """The strings of the settings' names, once each, in order (string 1 first)."""
    return list(dict.fromkeys(s.name for s in settings if s.name))


@dataclass
class FunctionFs(Function):
    """A FunctionFS function: `descriptors` per speed (FULL, HIGH, SUPER: interface and
    endpoint descriptors, with interface numbers from 0 and string indexes from 1 as the
    function sees them), `strings` (US English) and `replies` to class or vendor requests
    (everything else is stalled).  `name` is the instance name (functions/ffs.<name>), which
    must be unique in the whole guest.  `start` runs its daemon (Gadgets.create calls it)."""
    driver = "ffs"
    name: str = "ffs"
    descriptors: Mapping[Speed, bytes] = field(default_factory=dict)
    strings: Sequence[str] = ()
    replies: Replies = field(default_factory=dict)
    flags: Flags = Flags.NONE
    ready_timeout: float = 60.0         # until the daemon has written ep0 (Python under TCG)

    @classmethod
    def declared(cls, settings: Sequence[Interface], *, speeds: Sequence[Speed] = tuple(FFS_SPEEDS),
                 after_endpoint: Mapping[tuple[int, int, int], bytes] | None = None,
                 **options: Any) -> FunctionFs:
        """The function whose descriptors `function_descriptors` builds at each of `speeds`
        from `settings`; the settings' names become its strings."""
        strings = setting_strings(settings)
        return cls(descriptors={speed: function_descriptors(settings, speed, strings,
                                                            after_endpoint)
                                for speed in speeds},
                   strings=strings, **options)

    def instance(self, index: int) -> str:
        return self.name

    @property
    def mountpoint(self) -> str:
        """Where the daemon mounts the instance, in the host root's tree (its /run is the
        guest's own tmpfs)."""
        return f"/run/ffs/{self.name}"

    def spec(self) -> dict[str, Any]:
        """What the daemon is given (as JSON): the instance, the mount point, the blobs."""
        return {"instance": self.name, "mountpoint": self.mountpoint,
                "descriptors": descriptors_blob(self.descriptors, self.flags).hex(),
                "strings": strings_blob(self.strings).hex(),
                "replies": [[kind, request, None if data is None else data.hex()]
                            for (kind, request), data in self.replies.items()]}

    async def start(self, vm: Vm, folder: str) -> Job:
        """Run the daemon in the host root and wait until it has written ep0."""
        host = vm.host
        path = f"{self.mountpoint}.json"
        text = json.dumps(self.spec())
        # In pieces: the guest tty takes lines of up to 3000 characters.
        pieces = [text[i:i + 1200] for i in range(0, len(text), 1200)]
        await host.run(" && ".join([f"mkdir -p /run/ffs && : > {path}",
                                    *(f"printf %s {shlex.quote(p)} >> {path}" for p in pieces)]),
                       check=True)
        job = await host.start(shlex.join([host.python_path, "-m", functionfs_daemon.__name__,
                                           path]))
        try:
            await job.wait_output("ready", self.ready_timeout)
        except TimeoutError as e:
            await job.stop()
            raise RuntimeError(f"the FunctionFS daemon of {self.name} did not get ready: {e}"
                               ) from None
        except BaseException:
            await job.stop()
            raise
        return job


# ---- the UAS-shaped disk ---------------------------------------------------------------------

class MassStorageCode(IntEnum):
    """Mass storage class codes (USB Mass Storage Class Overview 1.4)."""
    CLASS = 0x08
    SCSI = 0x06                 # subclass: SCSI transparent command set
    BULK_ONLY = 0x50            # protocol: Bulk-Only Transport (BBB)
    UAS = 0x62                  # protocol: USB Attached SCSI


class BulkOnly(IntEnum):
    """Bulk-Only class requests (BOT 1.0 3.1, 3.2), to the interface."""
    RESET = 0xFF                # OUT, no data
    GET_MAX_LUN = 0xFE          # IN, one byte: the highest LUN


class PipeId(IntEnum):
    """UAS Pipe Usage bPipeID (UAS 1.0 5.3.3.1.1)."""
    COMMAND = 1
    STATUS = 2
    DATA_IN = 3
    DATA_OUT = 4


PIPE_USAGE = 0x24               # bDescriptorType: class-specific interface (UAS calls it so)

# UAS 1.0 5.3.3.1.1: which UAS pipe an endpoint is; follows its endpoint (and companion).
PipeUsageDescriptor = DescriptorFormat(
    "bLength" / c.Const(4, c.Int8ul),
    "bDescriptorType" / DescriptorNumber(PIPE_USAGE),
    "bPipeID" / DescriptorField("Pipe ID"),
    "bReserved" / DescriptorField("Reserved", default=0),
)

UAS_STREAMS_EXPONENT = 5        # SuperSpeed companion bmAttributes MaxStreams: 2**5 streams
UAS_DATA_BURST = 15             # bMaxBurst of the status and data pipes: 16 packets
# Keys only (FunctionFS assigns the UDC's): one address per endpoint descriptor.
BOT_IN, BOT_OUT = 0x81, 0x02
UAS_PIPES = {PipeId.COMMAND: 0x03, PipeId.STATUS: 0x84, PipeId.DATA_IN: 0x85,
             PipeId.DATA_OUT: 0x06}


def uas_disk_settings() -> list[Interface]:
    """Interface 0 as a real UAS disk declares it: alt 0 Bulk-Only (bulk IN, bulk OUT), alt 1
    UAS (command OUT, status IN, data IN, data OUT; at SuperSpeed all but the command pipe
    ask for 2**5 streams and bursts of 16)."""
    def bulk(address: int, streams: bool) -> EndpointDecl:
        return EndpointDecl(address, EpType.BULK, max_burst=UAS_DATA_BURST if streams else 0,
                            ss_attributes=UAS_STREAMS_EXPONENT if streams else 0)
    return [
        Interface(0, (bulk(BOT_IN, False), bulk(BOT_OUT, False)), alternate=0,
                  cls=MassStorageCode.CLASS, subclass=MassStorageCode.SCSI,
                  protocol=MassStorageCode.BULK_ONLY, name="Bulk-Only Transport"),
        Interface(0, tuple(bulk(address, pipe is not PipeId.COMMAND)
                           for pipe, address in UAS_PIPES.items()), alternate=1,
                  cls=MassStorageCode.CLASS, subclass=MassStorageCode.SCSI,
                  protocol=MassStorageCode.UAS, name="USB Attached SCSI"),
    ]


def pipe_usage_descriptors() -> dict[tuple[int, int, int], bytes]:
    """The Pipe Usage descriptor after each UAS endpoint (interface 0, alt 1)."""
    return {(0, 1, address): PipeUsageDescriptor.build({"bPipeID": pipe})
            for pipe, address in UAS_PIPES.items()}


CLASS_TO_INTERFACE = 0x21      # bmRequestType: host to device, class, interface (| 0x80: IN)
# A Bulk-Only device answers GET_MAX_LUN (one LUN: 0) and takes the reset.
BOT_REPLIES: dict[tuple[int, int], bytes | None] = {
    (CLASS_TO_INTERFACE | 0x80, BulkOnly.GET_MAX_LUN): b"\x00",
    (CLASS_TO_INTERFACE, BulkOnly.RESET): None}


def uas_disk_descriptors(pipe_usage: bool = False) -> dict[Speed, bytes]:
    """The UAS-shaped disk's descriptors at full, high and super speed.  `pipe_usage` adds the
    Pipe Usage descriptors a UAS host driver looks for, which Linux 6.1's FunctionFS refuses
    (EINVAL): without them the interface still shows both settings, and a host's uas driver
    does not take it (usb-storage keeps it, on alt 0)."""
    settings = uas_disk_settings()
    strings = setting_strings(settings)
    extras = pipe_usage_descriptors() if pipe_usage else None
    return {speed: function_descriptors(settings, speed, strings, extras) for speed in FFS_SPEEDS}


@dataclass
class UasShapedDisk(FunctionFs):
    """A SuperSpeed mass-storage function shaped like a UAS disk (see `uas_disk_settings`),
    with no SCSI behind it: its bulk endpoints never move data.  0525:a4a5 as g_mass_storage."""
    vendor_id, product_id = NETCHIP, FILE_STORAGE
    name: str = "uas"
    descriptors: Mapping[Speed, bytes] = field(default_factory=uas_disk_descriptors)
    strings: Sequence[str] = field(default_factory=lambda: setting_strings(uas_disk_settings()))
    replies: Replies = field(default_factory=lambda: dict(BOT_REPLIES))
