"""Linux USB gadgets in a kit guest: real USB devices where the machine has no USB hardware.

dummy_hcd pairs a software device controller (UDC `dummy_udc.N`) with a host controller
(`dummy_hcd.N`, one root port) in the same kernel.  A gadget declared in configfs
(/sys/kernel/config/usb_gadget) and bound to a UDC is plugged into that root port: usbcore
enumerates it, and usbfs (libusb) sees it as it sees any device.  Writing an empty name to the
gadget's UDC file unbinds it, which is pulling the plug; binding again plugs it back in.

This module is the one place that knows how: `Gadget` and its `Function`s declare a device and
give the POSIX shell (busybox or dash) that creates, binds, unbinds and removes it; `Gadgets` runs
that shell in a kit VM and waits until the host side has followed.

    usb = Gadgets(vm)                       # vm = await Vm.start(host_root=True)
    await usb.load(udcs=2)                  # dummy_hcd num=2: dummy_udc.0 and dummy_udc.1
    zero = Gadget("zero", [SourceSink(pattern=Pattern.MOD63)])     # 0525:a4a0, as g_zero
    plugged = await usb.plug(zero)          # created, bound, enumerated: plugged.busnum ...
    await usb.unplug(zero)                  # the host side has dropped it
    await usb.plug(zero)                    # back, on the same UDC (so the same bus)

What this kernel (Debian 6.1) offers, read from its modules and seen in the guest: dummy_hcd
moves control, bulk and interrupt data, and has no isochronous endpoints at all (it could not
move isochronous data anyway), so SourceSink comes with its bulk pair (alt 0) only and its isoc_*
options change nothing; SourceSink has no interrupt endpoints in this kernel.  Interrupt traffic
comes from the HID function; isochronous devices need another source: QEMU's usb-audio on a
qemu-xhci inside the VM (OUT only), or for isochronous IN vudc.py's IsoSource on vhci-hcd
(usbip-vudc, the other soft UDC, binds SourceSink's iso pair but answers iso URBs with -EXDEV).
"""
from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .hostroot import Job, Shell
    from .launch import SerialConsole, Vm

# The UDC and every function declared below; the initramfs ships them, `load_modules` loads them.
GADGET_MODULES = [
    "dummy_hcd", "libcomposite", "usb_f_ss_lb", "usb_f_mass_storage", "usb_f_hid", "usb_f_acm",
    "usb_f_serial", "usb_f_fs",
]
CONFIGFS = "/sys/kernel/config/usb_gadget"
LANGUAGE = "0x409"                  # US English, the one string table every host asks for
CONFIG = "c.1"                      # the gadget's one configuration, bConfigurationValue 1
# The IDs Linux's own legacy gadgets use, so that host-side tools recognise each kind.
NETCHIP = 0x0525
GADGET_ZERO = 0xA4A0                # g_zero: SourceSink and Loopback (Linux's usbtest binds it)
FILE_STORAGE = 0xA4A5               # g_mass_storage
SERIAL_GENERIC = 0xA4A6             # g_serial, generic bulk pair
SERIAL_ACM = 0xA4A7                 # g_serial use_acm=1
HID_GADGET = 0xA4AC                 # g_hid
LINUX_FOUNDATION, MULTIFUNCTION = 0x1D6B, 0x0104     # a composite of several kinds


def _octal(data: bytes) -> str:
    """`data` as a printf format of octal escapes (POSIX printf has no \\x)."""
    return "".join(f"\\{b:03o}" for b in data)


def write_bytes(data: bytes, path: str) -> str:
    """A command that writes `data` to `path` exactly (binary attributes, /dev/hidgN)."""
    return f"printf '{_octal(data)}' > {shlex.quote(path)}"


class Pattern(IntEnum):
    """What SourceSink sends IN and expects OUT (its `pattern` attribute, g_zero's `pattern`)."""
    ZEROS = 0       # every byte 0
    MOD63 = 1       # byte i of every packet is i % 63: lost, doubled or shifted packets show
    ANY = 2         # IN: whatever its buffers hold; OUT: not checked


def source_sink_data(pattern: Pattern, length: int, max_packet: int) -> bytes:
    """The bytes SourceSink sources (and, with a checking pattern, wants to sink) for `length`
    bytes of a bulk stream whose packets are `max_packet` long (512 at high speed).

    f_sourcesink restarts the mod63 count in every packet, so this holds for any transfer size;
    a wrong OUT byte makes it halt its OUT endpoint (and log "bad OUT byte").
    """
    if pattern is Pattern.MOD63:
        packet = bytes(i % 63 for i in range(max_packet))
        return (packet * (length // max_packet + 1))[:length]
    if pattern is Pattern.ZEROS:
        return bytes(length)
    raise ValueError("Pattern.ANY has no defined data")


# ---- functions -------------------------------------------------------------------------------

@dataclass
class Function:
    """One USB function of a gadget: a configfs directory functions/<driver>.<instance>."""
    driver: ClassVar[str]               # the usb_f_* function name configfs knows
    vendor_id: ClassVar[int] = LINUX_FOUNDATION
    product_id: ClassVar[int] = MULTIFUNCTION

    def attributes(self) -> dict[str, str]:
        """Attribute files to write, in order, before the function is linked into the config."""
        return {}

    def setup(self, folder: str) -> list[str]:
        """Commands that fill the function's folder: its attributes by default."""
        return [f"echo {shlex.quote(value)} > {folder}/{name}"
                for name, value in self.attributes().items()]

    def node(self, folder: str) -> str | None:
        """A command printing the gadget-side device node (/dev/hidg0, /dev/ttyGS0), if any."""
        return None

    def instance(self, index: int) -> str:
        """The instance name (functions/<driver>.<instance>): the function's place in its
        gadget, unless its kind wants a name unique in the whole guest (FunctionFS)."""
        return str(index)

    async def start(self, vm: Vm, folder: str) -> Job | None:
        """Start what must run in the guest before the gadget can be bound, once `folder` is
        made (FunctionFS's daemon); `Gadgets.remove` stops the job it returns."""
        return None


def _set(**values: int | bool | str | None) -> dict[str, str]:
    """The attributes given a value (None keeps the kernel's default), as the kernel reads them."""
    return {k: str(int(v)) if isinstance(v, int) else v   # bools and IntEnums as numbers
            for k, v in values.items() if v is not None}


@dataclass
class SourceSink(Function):
    """f_sourcesink: sources IN data and sinks OUT data on a bulk pair (alt 0), plus an
    isochronous pair (alt 1) where the UDC has isochronous endpoints (dummy_hcd has none);
    vendor requests 0x5b/0x5c write and read back ep0's buffer.

    The sink checks a request when it is full (bulk_buflen bytes) or ended by a short packet.
    None leaves the kernel's default (bulk_buflen 4096, bulk_qlen 1, iso_qlen 8,
    isoc_interval 4, isoc_maxpacket 1024, isoc_mult 0, isoc_maxburst 0, pattern 0)."""
    driver = "SourceSink"
    vendor_id, product_id = NETCHIP, GADGET_ZERO
    pattern: Pattern | None = Pattern.MOD63
    bulk_buflen: int | None = None      # bytes per request the function queues
    bulk_qlen: int | None = None        # requests queued per bulk endpoint
    iso_qlen: int | None = None         # requests queued per isochronous endpoint
    isoc_interval: int | None = None    # 1..16, the bInterval exponent
    isoc_maxpacket: int | None = None   # 0..1024 bytes
    isoc_mult: int | None = None        # 0..2 extra transactions per microframe (high speed)
    isoc_maxburst: int | None = None    # 0..15 (SuperSpeed)

    def attributes(self) -> dict[str, str]:
        return _set(pattern=self.pattern, bulk_buflen=self.bulk_buflen, bulk_qlen=self.bulk_qlen,
                    iso_qlen=self.iso_qlen, isoc_interval=self.isoc_interval,
                    isoc_maxpacket=self.isoc_maxpacket, isoc_mult=self.isoc_mult,
                    isoc_maxburst=self.isoc_maxburst)


@dataclass
class Loopback(Function):
    """f_loopback: what the host writes to its bulk OUT endpoint comes back on bulk IN."""
    driver = "Loopback"
    vendor_id, product_id = NETCHIP, GADGET_ZERO
    qlen: int | None = None             # requests queued per direction (kernel default 32)
    bulk_buflen: int | None = None      # bytes per request (default 4096)

    def attributes(self) -> dict[str, str]:
        return _set(qlen=self.qlen, bulk_buflen=self.bulk_buflen)


@dataclass
class MassStorage(Function):
    """f_mass_storage: a Bulk-Only SCSI disk (LUN 0) backed by `file`.

    The file is opened by the kernel, by its path as the writing shell sees it (in the host's
    tree when the gadget is made through `vm.host`); under the overlay, writing to it copies it
    into the guest's tmpfs first, and the host's copy never changes.
    """
    driver = "mass_storage"
    vendor_id, product_id = NETCHIP, FILE_STORAGE
    file: str = ""
    read_only: bool | None = None
    removable: bool | None = None       # a medium that can go (eject) and be given again
    cdrom: bool | None = None
    nofua: bool | None = None           # ignore Force Unit Access (faster, less safe)
    inquiry_string: str | None = None   # vendor(8) product(16) revision(4), as INQUIRY reports
    stall: bool | None = None           # may the function stall bulk endpoints (default yes)

    def setup(self, folder: str) -> list[str]:
        lun = f"{folder}/lun.0"
        # ro and cdrom cannot change while a file is open, so the file goes last.
        attributes = _set(removable=self.removable, ro=self.read_only, cdrom=self.cdrom,
                          nofua=self.nofua, inquiry_string=self.inquiry_string)
        commands = [f"echo {shlex.quote(value)} > {lun}/{name}"
                    for name, value in attributes.items()]
        if self.stall is not None:
            commands.insert(0, f"echo {int(self.stall)} > {folder}/stall")
        if self.file:
            commands.append(f"echo {shlex.quote(self.file)} > {lun}/file")
        return commands


def _char_node(folder: str) -> str:
    # `dev` holds MAJOR:MINOR; sysfs names the node devtmpfs made for it.
    return (f"sed -n 's,^DEVNAME=,/dev/,p' /sys/dev/char/$(cat {folder}/dev)/uevent")


@dataclass
class Hid(Function):
    """f_hid: a HID interface with an interrupt IN endpoint (and OUT, unless no_out_endpoint);
    reports written to the gadget's /dev/hidgN go to the host, one report per write."""
    driver = "hid"
    vendor_id, product_id = NETCHIP, HID_GADGET
    report_desc: bytes = b""
    report_length: int = 8
    subclass: int = 0                   # 1: boot interface
    protocol: int = 0                   # boot protocol: 1 keyboard, 2 mouse
    no_out_endpoint: bool | None = None  # host output reports on ep0 only (SET_REPORT)

    def setup(self, folder: str) -> list[str]:
        attributes = _set(protocol=self.protocol, subclass=self.subclass,
                          report_length=self.report_length,
                          no_out_endpoint=self.no_out_endpoint)
        return [*(f"echo {value} > {folder}/{name}" for name, value in attributes.items()),
                write_bytes(self.report_desc, f"{folder}/report_desc")]

    def node(self, folder: str) -> str:
        return _char_node(folder)


def _boot_keyboard_descriptor() -> bytes:
    from ..devices.keyboard import REPORT_DESCRIPTOR
    return REPORT_DESCRIPTOR


@dataclass
class HidKeyboard(Hid):
    """A boot keyboard: the report descriptor of xhcidbg's own virtual keyboard, 8-byte reports
    (modifiers, reserved, six keys); feed it with `Gadgets.write(..., keyboard_report(...))`."""
    report_desc: bytes = field(default_factory=_boot_keyboard_descriptor)
    subclass: int = 1
    protocol: int = 1


def keyboard_report(*keys: int | str) -> bytes:
    """The boot report with `keys` down (names as xhcidbg's keyboard takes them: 'a', 'enter',
    'left_shift'); no keys is every key up."""
    from ..devices.keyboard import keycode
    codes = [keycode(k) for k in keys]
    modifiers = sum(1 << (c - 0xE0) for c in codes if c >= 0xE0)
    down = [c for c in codes if c < 0xE0][:6]
    return bytes([modifiers, 0, *down, *([0] * (6 - len(down)))])


@dataclass
class Serial(Function):
    """A serial port: CDC ACM (`acm`, cdc_acm on a Linux host) or the generic bulk pair of
    g_serial (`gser`, usbserial's `generic`); the gadget side is /dev/ttyGS<port_num>."""
    driver = "acm"
    vendor_id, product_id = NETCHIP, SERIAL_ACM

    def node(self, folder: str) -> str:
        return f"echo /dev/ttyGS$(cat {folder}/port_num)"


@dataclass
class GenericSerial(Serial):
    driver = "gser"
    vendor_id, product_id = NETCHIP, SERIAL_GENERIC


# ---- gadgets ---------------------------------------------------------------------------------

class MaxSpeed(StrEnum):
    """The fastest a gadget offers (configfs max_speed); the UDC may offer less."""
    FULL = "full-speed"
    HIGH = "high-speed"
    SUPER = "super-speed"


@dataclass
class Gadget:
    """A USB device made of `functions` (one configuration), under configfs as `name`.

    The IDs default to those of Linux's legacy gadget for the first function's kind (0525:a4a0
    for SourceSink or Loopback, as g_zero), or the Linux Foundation's multifunction composite
    when the functions are of several kinds.
    """
    name: str
    functions: Sequence[Function]
    vendor_id: int | None = None
    product_id: int | None = None
    manufacturer: str = "xhcidbg"
    product: str = ""                   # default: the name
    serial: str = ""                    # default: the name
    max_speed: MaxSpeed | None = None
    bcd_device: int | None = None
    max_power_ma: int = 100
    device_class: tuple[int, int, int] | None = None    # class, subclass, protocol; default 0

    def __post_init__(self) -> None:
        if not self.functions:
            raise ValueError("a gadget needs at least one function")
        if "/" in self.name or not self.name.strip("."):
            raise ValueError(f"{self.name!r} cannot be a configfs directory name")

    @property
    def path(self) -> str:
        return f"{CONFIGFS}/{self.name}"

    @property
    def ids(self) -> tuple[int, int]:
        kinds = {(f.vendor_id, f.product_id) for f in self.functions}
        default = kinds.pop() if len(kinds) == 1 else (LINUX_FOUNDATION, MULTIFUNCTION)
        return (self.vendor_id if self.vendor_id is not None else default[0],
                self.product_id if self.product_id is not None else default[1])

    def function_folder(self, index: int) -> str:
        """functions/<driver>.<instance>, the instance being the index unless the function
        names it (instance names need only be unique per gadget, FunctionFS's in the guest)."""
        function = self.functions[index]
        return f"{self.path}/functions/{function.driver}.{function.instance(index)}"

    def create(self) -> list[str]:
        """Commands that make the gadget in configfs, unbound (loads no modules)."""
        g, q = self.path, shlex.quote
        vendor, product = self.ids
        lines = [f"mkdir {g}",
                 f"echo {vendor:#06x} > {g}/idVendor", f"echo {product:#06x} > {g}/idProduct"]
        if self.bcd_device is not None:
            lines.append(f"echo {self.bcd_device:#06x} > {g}/bcdDevice")
        if self.device_class is not None:
            cls, sub, proto = self.device_class
            lines += [f"echo {cls:#04x} > {g}/bDeviceClass",
                      f"echo {sub:#04x} > {g}/bDeviceSubClass",
                      f"echo {proto:#04x} > {g}/bDeviceProtocol"]
        if self.max_speed is not None:
            lines.append(f"echo {self.max_speed.value} > {g}/max_speed")
        strings = f"{g}/strings/{LANGUAGE}"
        lines += [f"mkdir {strings}",
                  f"echo {q(self.manufacturer)} > {strings}/manufacturer",
                  f"echo {q(self.product or self.name)} > {strings}/product",
                  f"echo {q(self.serial or self.name)} > {strings}/serialnumber"]
        config = f"{g}/configs/{CONFIG}"
        lines += [f"mkdir {config} {config}/strings/{LANGUAGE}",
                  f"echo {q(self.name)} > {config}/strings/{LANGUAGE}/configuration",
                  f"echo {self.max_power_ma} > {config}/MaxPower"]
        for i, function in enumerate(self.functions):
            folder = self.function_folder(i)
            # The kernel would load the usb_f_* module for this mkdir by its alias, which the
            # kit's module tree does not list (no modules.alias): Gadgets.load loads them all.
            lines += [f"mkdir {folder}", *function.setup(folder), f"ln -s {folder} {config}/"]
        return lines

    def bind(self, udc: str) -> str:
        """Plug in: bind to `udc` (e.g. dummy_udc.0), whose host side then enumerates it."""
        return f"echo {shlex.quote(udc)} > {self.path}/UDC"

    def unbind(self) -> str:
        """Pull the plug: an empty UDC; nothing happens if the gadget is not bound."""
        return f"if [ -n \"$(cat {self.path}/UDC)\" ]; then echo '' > {self.path}/UDC; fi"

    def remove(self) -> list[str]:
        """Commands that take the gadget out of configfs (unbinding it first), in the order
        configfs insists on: links, configuration, functions, strings, the gadget."""
        g = self.path
        config = f"{g}/configs/{CONFIG}"
        folders = [self.function_folder(i) for i in range(len(self.functions))]
        return [f"[ -d {g} ] || exit 0", self.unbind(),
                *(f"rm {config}/{folder.rsplit('/', 1)[1]}" for folder in folders),
                f"rmdir {config}/strings/{LANGUAGE} {config}",
                *(f"rmdir {folder}" for folder in folders),
                f"rmdir {g}/strings/{LANGUAGE} {g}"]


# ---- what dummy_hcd cannot give ---------------------------------------------------------------

QEMU_AUDIO = (0x46F4, 0x0002)       # QEMU's usb-audio: full speed, isochronous OUT 0x01, alt 1


def qemu_audio_args(controller: str = "iso-xhci") -> list[str]:
    """QEMU options (for Vm.start's extra_args) that give the guest an isochronous device:
    QEMU's usb-audio on a qemu-xhci of its own, driven by the guest's xhci_hcd, so libusb in the
    guest reaches it through usbfs like the gadgets (it plays into a silent audio backend)."""
    return ["-device", f"qemu-xhci,id={controller}", "-audiodev", "none,id=iso-audio",
            "-device", f"usb-audio,audiodev=iso-audio,bus={controller}.0"]


# ---- running them in a kit VM ----------------------------------------------------------------

class UdcSpeed(StrEnum):
    """What dummy_hcd's controllers offer (its is_high_speed and is_super_speed parameters)."""
    FULL = "full"
    HIGH = "high"
    SUPER = "super"


def load_modules(udcs: int = 1, speed: UdcSpeed = UdcSpeed.HIGH) -> str:
    """Kit-shell commands that (re)load dummy_hcd with `udcs` controllers and every function
    module; dummy_udc.0 .. dummy_udc.<udcs-1> exist afterwards."""
    if not 1 <= udcs <= 32:
        raise ValueError("dummy_hcd makes 1 to 32 controllers")
    parameters = (f"num={udcs} is_super_speed={int(speed is UdcSpeed.SUPER)}"
                  f" is_high_speed={int(speed is not UdcSpeed.FULL)}")
    functions = [m for m in GADGET_MODULES if m != "dummy_hcd"]
    # Parameters only take effect on loading: a loaded dummy_hcd goes first (which fails
    # while a gadget is bound to one of its UDCs).
    return "\n".join([
        "set -e",
        "if [ -d /sys/module/dummy_hcd ]; then rmmod dummy_hcd; fi",
        f"modprobe dummy_hcd {parameters}",
        f"modprobe -a {' '.join(functions)}",
        f"[ -e /sys/class/udc/dummy_udc.{udcs - 1} ]",
    ])


def _udc_index(udc: str) -> int:
    name, _, index = udc.rpartition(".")
    if name != "dummy_udc" or not index.isdigit():
        raise ValueError(f"{udc!r} is not a dummy_hcd UDC (dummy_udc.N)")
    return int(index)


def host_side(udc: str) -> str:
    """A glob matching the host-side sysfs device of whatever is plugged into `udc`: dummy_hcd.N
    has one root port (per bus: a SuperSpeed one too with is_super_speed)."""
    return f"/sys/devices/platform/dummy_hcd.{_udc_index(udc)}/usb*/*-1"


def wait_plugged(udc: str, timeout: float) -> str:
    """Polls in the guest until the device on `udc` is enumerated and configured; prints its
    sysfs path, busnum, devnum and speed (Mbit/s)."""
    tries = int(timeout / 0.05)
    return (f"i=0; d=; while [ $i -lt {tries} ]; do"
            f" for c in {host_side(udc)}; do"
            # Quoted: an unmatched glob stays literal, and must not match later inside cat.
            " [ -n \"$(cat \"$c/bConfigurationValue\" 2>/dev/null)\" ] && d=$c; done;"
            " [ -n \"$d\" ] && break; sleep 0.05; i=$((i+1)); done;"
            f" [ -n \"$d\" ] || {{ echo 'nothing enumerated on {udc} within {timeout:g} s';"
            " exit 1; }; echo \"$d $(cat \"$d/busnum\" \"$d/devnum\" \"$d/speed\")\"")


def wait_unplugged(udc: str, timeout: float) -> str:
    """Polls in the guest until the host side of `udc` has no device any more."""
    tries = int(timeout / 0.05)
    return (f"i=0; while [ $i -lt {tries} ]; do set -- {host_side(udc)};"
            " [ -e \"$1\" ] || exit 0; sleep 0.05; i=$((i+1)); done;"
            f" echo 'the device on {udc} is still there after {timeout:g} s'; exit 1")


@dataclass
class Plugged:
    """A gadget as the guest's host side sees it once enumerated."""
    udc: str
    sysfs: str          # e.g. /sys/devices/platform/dummy_hcd.0/usb3/3-1
    busnum: int
    devnum: int         # the address usbcore gave it: libusb's getDeviceAddress()
    speed_mbps: int     # 12, 480, 5000


class Gadgets:
    """Gadgets in a running kit VM: load dummy_hcd, create, plug, unplug and remove them.

    Modules load through the kit's shell (its modprobe knows the kit's kernel); configfs is
    written through `vm.host` when the VM has the host's root (so MassStorage files are host
    paths), else through the kit's shell.  Each gadget keeps the UDC it was first plugged into.
    """

    def __init__(self, vm: Vm, shell: Shell | None = None):
        self.vm = vm
        self.console: SerialConsole = vm.console
        try:
            default: Shell = vm.host
        except RuntimeError:
            default = vm.console
        self.shell: Shell = shell or default
        self.udcs: list[str] = []
        self.created: dict[str, Gadget] = {}
        self.placed: dict[str, str] = {}        # gadget name -> its UDC
        self.jobs: dict[str, list[Job]] = {}    # gadget name -> what its functions started

    async def _run(self, shell: Shell, lines: Iterable[str], what: str,
                   timeout: float = 60.0) -> str:
        script = "\n".join(["set -e", *lines])
        result = await shell.run(script, timeout)
        if not result.ok:
            raise RuntimeError(f"{what} failed (status {result.status}):\n{result.output}")
        return result.output

    async def load(self, udcs: int = 1, speed: UdcSpeed = UdcSpeed.HIGH) -> list[str]:
        """Load dummy_hcd with `udcs` controllers (reloading it, so no gadget may be bound) and
        the function modules; the UDC names."""
        await self._run(self.console, [load_modules(udcs, speed)], "loading dummy_hcd")
        self.udcs = [f"dummy_udc.{i}" for i in range(udcs)]
        self.placed.clear()
        return list(self.udcs)

    async def create(self, gadget: Gadget) -> None:
        """Make `gadget` in configfs, unbound, and start what its functions need running
        (`Function.start`); a function that fails to start leaves the gadget for `remove`."""
        if gadget.name in self.created:
            raise ValueError(f"a gadget named {gadget.name!r} exists already")
        await self._run(self.shell, gadget.create(), f"creating gadget {gadget.name}")
        self.created[gadget.name] = gadget
        jobs = self.jobs[gadget.name] = []
        for i, function in enumerate(gadget.functions):
            job = await function.start(self.vm, gadget.function_folder(i))
            if job is not None:
                jobs.append(job)

    def _free_udc(self) -> str:
        taken = set(self.placed.values())
        for udc in self.udcs:
            if udc not in taken:
                return udc
        raise RuntimeError(f"every UDC is taken ({len(self.udcs)} loaded): load(udcs=...)")

    async def plug(self, gadget: Gadget, udc: str | None = None,
                   timeout: float = 30.0) -> Plugged:
        """Bind `gadget` (creating it first if need be) and wait until the host side has
        enumerated and configured it.  Without `udc`: where it was before, else a free one."""
        if not self.udcs:
            await self.load()
        if gadget.name not in self.created:
            await self.create(gadget)
        udc = udc or self.placed.get(gadget.name) or self._free_udc()
        await self._run(self.shell, [gadget.bind(udc)], f"binding {gadget.name} to {udc}")
        self.placed[gadget.name] = udc
        output = await self._run(self.console, [wait_plugged(udc, timeout)],
                                 f"enumerating {gadget.name}", timeout + 30)
        sysfs, busnum, devnum, speed = output.split()
        return Plugged(udc, sysfs, int(busnum), int(devnum), int(speed))

    async def unplug(self, gadget: Gadget, timeout: float = 30.0) -> None:
        """Unbind `gadget` and wait until the host side has dropped it."""
        await self._run(self.shell, [gadget.unbind()], f"unbinding {gadget.name}")
        udc = self.placed.get(gadget.name)
        if udc:
            await self._run(self.console, [wait_unplugged(udc, timeout)],
                            f"unplugging {gadget.name}", timeout + 30)

    async def remove(self, gadget: Gadget, timeout: float = 30.0) -> None:
        """Unplug `gadget` and take it out of configfs; its UDC is free again."""
        await self.unplug(gadget, timeout)
        for job in self.jobs.pop(gadget.name, []):
            await job.stop()
            await job.wait(timeout)
        await self._run(self.shell, gadget.remove(), f"removing {gadget.name}")
        self.created.pop(gadget.name, None)
        self.placed.pop(gadget.name, None)

    async def node(self, gadget: Gadget, index: int = 0) -> str:
        """The gadget-side device node of function `index` (/dev/hidg0, /dev/ttyGS0)."""
        command = gadget.functions[index].node(gadget.function_folder(index))
        if command is None:
            raise ValueError(f"a {gadget.functions[index].driver} function has no device node")
        return (await self._run(self.console, [command], "finding the device node")).strip()

    async def write(self, gadget: Gadget, data: bytes, index: int = 0,
                    timeout: float = 30.0) -> None:
        """Write `data` to the gadget side of function `index`.  For HID, one write per
        report_length bytes: f_hid sends one report per write, and each write waits until the
        host has read the report before it (the host sees a zero-length packet after every
        report as well, in this kernel)."""
        node = await self.node(gadget, index)
        function = gadget.functions[index]
        size = function.report_length if isinstance(function, Hid) else len(data) or 1
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        await self._run(self.console, [write_bytes(chunk, node) for chunk in chunks],
                        f"writing to {node}", timeout)
