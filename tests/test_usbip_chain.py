"""The chain, end to end: a real Linux guest driver using a real Linux USB device of another
machine through xhcidbg.  Two kit VMs on this machine: the exporter (a Gadget Zero SourceSink
on dummy_hcd, handed to usbip-host and offered by Debian's usbipd through a forwarded port) and
the guest, whose USB controller is xhcidbg (a vfio-user server here) with that device imported
over USB/IP on one of its root ports.  What is asserted is what the guest's Linux reports:
usbtest's verdict on each of its test cases (driven through its usbfs ioctl), its kernel log."""
from __future__ import annotations

import asyncio
import re

import pytest
from test_e2e_fault_isoch import USBTEST

from xhcidbg.guestkit import launch
from xhcidbg.guestkit.gadgets import Gadget, Gadgets, Pattern, SourceSink
from xhcidbg.guestkit.testing import guest_kit
from xhcidbg.guestkit.usbip import USBIP_PORT, UsbipExporter, ensure_usbip_tools
from xhcidbg.vm.backend import Backend

pytestmark = pytest.mark.e2e

# usbtest's own pattern (its default, 0: zeros) on both ends
ZERO = Gadget("zero", [SourceSink(pattern=Pattern.ZEROS)], product="Gadget Zero",
              serial="xhcidbg-chain-1")
# bulk OUT/IN (1-4; 3 and 4 with lengths that vary), scatter-gather (5-8), chapter 9 (9),
# queued control (10), unlinks (11, 12), halts (13), vendor control (14), unaligned buffers
# (17-20), unaligned control (21)
CASES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 17, 18, 19, 20, 21]
ITERATIONS, LENGTH, SGLEN, VARY = 4, 4096, 4, 512


class Chain:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.exporter_vm: launch.Vm | None = None
        self.guest: launch.Vm | None = None
        self.backend: Backend | None = None

    def run(self, coro, timeout: float = 300.0):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    qemu, kernel, initrd = guest_kit()
    tools = ensure_usbip_tools()
    folder = tmp_path_factory.mktemp("chain")
    loop = asyncio.new_event_loop()
    c = Chain(loop)
    try:
        c.exporter_vm = c.run(launch.Vm.start(
            qemu=qemu, kernel=kernel, initrd=initrd, host_root=True,
            forward_tcp={USBIP_PORT: 0}, log=folder / "exporter.log", progress=False), 360)
        c.gadgets = Gadgets(c.exporter_vm)
        c.run(c.gadgets.load(udcs=2))
        c.exporter = UsbipExporter(c.exporter_vm, tools)
        c.run(c.exporter.start())
        c.backend = Backend(folder / "xhci.sock", [])
        c.run(c.backend.start())
        c.folder = folder
        c.qemu, c.kernel, c.initrd = qemu, kernel, initrd
        yield c
    finally:
        if c.guest is not None:
            c.run(c.guest.stop(), 60)
        if c.backend is not None:
            c.backend.close()
        if c.exporter_vm is not None:
            c.run(c.exporter_vm.stop(), 60)
        loop.close()


def test_linux_usbtest_passes_on_a_remote_gadget_zero_through_xhcidbg(chain, tmp_path):
    c = chain
    script = tmp_path / "usbtest_ioctl.py"
    script.write_text(USBTEST)
    plugged = c.run(c.gadgets.plug(ZERO))
    busid = c.run(c.exporter.bind(plugged))
    host, port = c.exporter.address

    async def body():
        assert c.backend is not None
        said: list[str] = []
        mapper = c.backend.port_mapper()
        mapper.remote.say = said.append
        mapper.attach(f"usbip://{host}:{port}/{busid}")
        for _ in range(300):
            if mapper.remote.attached:
                break
            await asyncio.sleep(0.05)
        assert mapper.remote.attached, said
        c.guest = await launch.Vm.start(devices=[c.backend.device_arg], qemu=c.qemu,
                                        kernel=c.kernel, initrd=c.initrd, progress=False,
                                        host_root=True, log=c.folder / "guest.log")
        sh = c.guest.console
        await sh.run("modprobe usbtest", check=True)
        await sh.run("i=0; until ls /sys/bus/usb/drivers/usbtest/ | grep -q ':'; do "
                     "i=$((i+1)); [ $i -lt 400 ] || exit 1; usleep 50000; done", check=True)
        await sh.run("dmesg -c > /dev/null")
        args = [str(script), str(ITERATIONS), str(LENGTH), str(SGLEN), *map(str, CASES)]
        ran = await c.guest.host.run(" ".join([c.guest.host.python_path, *args]), timeout=900,
                                     env={"USBTEST_VARY": str(VARY)})
        log = (await sh.run("dmesg -c")).output
        return ran, log, said, next(iter(mapper.remote.attached.values())).device.submitted
    ran, log, said, submitted = c.run(body(), 1500)
    verdicts = dict(re.findall(r"test (\d+) status (-?\d+)", ran.output))
    assert verdicts == {str(n): "0" for n in CASES}, ran.output + log + "\n".join(said)
    assert submitted > 200, submitted           # all of it went over USB/IP
    assert "xhci" not in log.lower() or "error" not in log.lower(), log
