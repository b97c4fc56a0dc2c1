"""The FunctionFS daemon, run in a kit guest with the venv's Python (`FunctionFs.start` does):

    python -m xhcidbg.guestkit.functionfs_daemon SPEC.json

SPEC (functionfs.FunctionFs.spec) names the instance, where to mount it, the descriptors and
strings blobs (hex) and the replies to control requests.  The daemon mounts functionfs, writes
both blobs to ep0 and prints `ready` (FunctionFS binds only once both are written: the UDC is
written after that); then it keeps ep0 open, prints every event and answers SETUPs: a declared
reply, else a stall (Documentation/usb/functionfs.rst: reading ep0 stalls an IN request,
writing it an OUT one).  SIGTERM closes ep0 (a bound gadget is unbound by the kernel then) and
unmounts.

The standard library only: under TCG in the guest, importing construct and xhcidbg.devices
over 9p takes some ten seconds, which every plug would wait for.
"""
from __future__ import annotations

import errno
import json
import os
import select
import signal
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import Any

__all__ = ["EVENT", "EventType", "Replies", "serve"]


class EventType(IntEnum):
    """usb_functionfs_event.type (include/uapi/linux/usb/functionfs.h)."""
    BIND = 0
    UNBIND = 1
    ENABLE = 2          # the host set a configuration (or alternate setting) with the function
    DISABLE = 3
    SETUP = 4           # a control request for the function: answer or stall it
    SUSPEND = 5
    RESUME = 6


# struct usb_functionfs_event, what reading ep0 returns one or more of: the SETUP packet (of
# SETUP events), the type, 3 bytes of padding.
EVENT = struct.Struct("<8sB3x")

# (bmRequestType, bRequest) -> the IN data to answer with, or None to accept an OUT request.
Replies = Mapping[tuple[int, int], bytes | None]


def _say(text: str) -> None:
    print(text, flush=True)


def answer(ep0: int, setup: bytes, replies: Replies) -> str:
    """Answer one SETUP event: the declared reply, else a stall; what was done."""
    kind, request = setup[0], setup[1]
    length = int.from_bytes(setup[6:8], "little")
    declared, reply = (kind, request) in replies, replies.get((kind, request))
    try:
        if kind & 0x80 and declared and reply is not None:
            os.write(ep0, reply[:length])
            return f"answered {len(reply[:length])} bytes"
        if not kind & 0x80 and declared:
            os.read(ep0, length)                # the data stage (if any), then the status
            return "accepted"
        if kind & 0x80:
            os.read(ep0, EVENT.size)            # reading ep0 on an IN request stalls it
        else:
            os.write(ep0, b"")                  # writing ep0 on an OUT request stalls it
    except OSError as e:
        # EL2HLT: stalled, as asked; else (EIDRM) the host gave up on the request already.
        return "stalled" if e.errno == errno.EL2HLT else f"failed: {e}"
    return "stalled"


def _events(ep0: int, replies: Replies) -> None:
    # Poll first, then read only what is there: a read of ep0 that waits for events holds the
    # instance's mutex all the while, and the gadget's unbind takes that mutex before it adds
    # the event that would end the wait (f_fs.c: ffs_ep0_read, functionfs_unbind), so writing
    # an empty UDC would hang; poll waits without the mutex.
    events = select.poll()
    events.register(ep0, select.POLLIN)
    while True:
        events.poll()
        data = os.read(ep0, EVENT.size * 4)
        for setup, kind in (EVENT.unpack_from(data, i)
                            for i in range(0, len(data) - EVENT.size + 1, EVENT.size)):
            if kind == EventType.SETUP:
                _say(f"SETUP {setup.hex()}: {answer(ep0, setup, replies)}")
            else:
                _say(EventType(kind).name if kind in EventType._value2member_map_
                     else f"event {kind}")


def serve(spec: Mapping[str, Any]) -> int:
    """Mount the instance, write its blobs to ep0, then answer ep0's events until SIGTERM."""
    mountpoint = spec["mountpoint"]
    replies = {(kind, request): None if data is None else bytes.fromhex(data)
               for kind, request, data in spec["replies"]}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.makedirs(mountpoint, exist_ok=True)
    subprocess.run(["mount", "-t", "functionfs", spec["instance"], mountpoint], check=True)
    try:
        ep0 = os.open(f"{mountpoint}/ep0", os.O_RDWR)
        try:
            for blob in ("descriptors", "strings"):
                try:
                    os.write(ep0, bytes.fromhex(spec[blob]))
                except OSError as e:
                    # EINVAL: a descriptor FunctionFS does not take, or counts that disagree.
                    _say(f"FunctionFS refused the {blob}: {e}")
                    return 1
            _say(f"ready: {' '.join(sorted(os.listdir(mountpoint)))}")
            _events(ep0, replies)
        finally:
            os.close(ep0)
    finally:
        subprocess.run(["umount", mountpoint], check=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print(f"usage: python -m {__spec__.name if __spec__ else __name__} SPEC.json",
              file=sys.stderr)
        return 2
    with open(args[0]) as f:
        return serve(json.load(f))


if __name__ == "__main__":
    sys.exit(main())
