"""Mass storage end to end through the controller: the scripted guest writes megabytes with
WRITE(10), syncs, reads them back, and the image file on the host holds the same bytes."""
import hashlib
import os

import pytest

from xhcidbg.devices.base import Speed
from xhcidbg.devices.storage import StorageDevice
from xhcidbg.guest.driver import XhciDriver
from xhcidbg.guest.storage import MassStorage
from xhcidbg.transport.inproc import InProcessBus

SYNCHRONIZE_CACHE_10 = bytes([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("speed", [Speed.HIGH, Speed.SUPER])
def test_write_sync_read_back_checksum_and_image_on_disk(tmp_path, speed):
    img = tmp_path / "stick.img"
    img.write_bytes(bytes(8 << 20))
    bus = InProcessBus(ram_size=64 << 20)
    port = bus.controller.attach(StorageDevice(img, speed=speed))
    drv = XhciDriver(bus).start()
    disk = MassStorage(drv.enumerate(port))
    payload = os.urandom(3 << 20)
    lba = 2048
    for off in range(0, len(payload), 1 << 20):                 # 1 MiB commands, like Linux
        disk.write(lba + off // 512, payload[off:off + (1 << 20)])
    assert disk.command(SYNCHRONIZE_CACHE_10).ok
    back = b"".join(disk.read(lba + off // 512, (1 << 20) // 512)
                    for off in range(0, len(payload), 1 << 20))
    digest = hashlib.sha256(payload).hexdigest()
    assert hashlib.sha256(back).hexdigest() == digest
    with open(img, "rb") as f:                                  # what is on the host's disk
        f.seek(lba * 512)
        assert hashlib.sha256(f.read(len(payload))).hexdigest() == digest
    assert bus.controller.internal_errors == 0
