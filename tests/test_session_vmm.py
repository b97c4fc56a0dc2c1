"""The VMM's monitor against a real QEMU (no guest: `-machine none`, so it starts at once).

What matters here is the teardown: `xhcidbg serve --qmp` closes its QMP connection from two
places (the task that follows QEMU, and the session's end), often while QEMU is hanging up.
"""
from __future__ import annotations

import asyncio
import subprocess

import pytest

from xhcidbg.guestkit import ensure_qemu
from xhcidbg.session.vmm import Vmm

pytestmark = pytest.mark.e2e


@pytest.fixture
def qemu(tmp_path):
    path = str(tmp_path / "qmp.sock")
    install = ensure_qemu()
    proc = subprocess.Popen(install.command("-machine", "none", "-display", "none", "-S",
                                            "-qmp", f"unix:{path},server=on,wait=off"),
                            env=install.environ(), stdin=subprocess.DEVNULL)
    yield proc, path
    proc.kill()
    proc.wait()


async def _connected(path: str) -> Vmm:
    for _ in range(100):
        try:
            return await Vmm.connect(path, timeout=5)
        except Exception:
            await asyncio.sleep(0.1)
    return await Vmm.connect(path, timeout=5)


def test_freeze_and_thaw_follow_qemus_own_status(qemu):
    _proc, path = qemu

    async def main():
        vmm = await _connected(path)
        try:
            started_frozen = vmm.frozen                  # -S: QEMU starts with its vCPUs stopped
            assert await vmm.thaw()
            running = (await vmm.status())["status"]
            assert await vmm.freeze()
            paused = (await vmm.status())["status"]
            return started_frozen, running, paused, vmm.freezes
        finally:
            await vmm.close()

    assert asyncio.run(main()) == (True, "running", "paused", 1)


def test_close_from_two_tasks_while_qemu_hangs_up_ends(qemu):
    proc, path = qemu

    async def main():
        vmm = await _connected(path)
        gone = asyncio.ensure_future(vmm.wait_gone())
        proc.kill()                                   # QEMU goes away under the connection
        await asyncio.wait_for(gone, 10)
        first = asyncio.ensure_future(vmm.close())
        await asyncio.sleep(0)
        first.cancel()                                # the follower is cancelled mid-close
        second = asyncio.ensure_future(vmm.close())   # ... and the session closes it again
        third = asyncio.ensure_future(vmm.close())
        results = await asyncio.wait_for(
            asyncio.gather(first, second, third, return_exceptions=True), 30)
        return [type(r).__name__ for r in results]

    assert asyncio.run(main()) == ["CancelledError", "NoneType", "NoneType"]
