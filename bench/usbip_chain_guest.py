"""The guest half of bench/usbip_chain.py: time Linux's usbtest cases on Gadget Zero.

Runs in the guest VM (chrooted in this machine's tree, the venv's Python), with usbtest bound
to the device's interface 0.  Each case is one USBDEVFS_IOCTL carrying USBTEST_REQUEST (as
tests/test_e2e_fault_isoch.py's USBTEST does), timed here around the ioctl with perf_counter,
--repeats times; prints `@@ ` progress lines and, last, `@@result {json}`: per case its status
(0 or -errno) and the seconds of each repeat.

    python bench/usbip_chain_guest.py --iterations 8 --length 4096 --repeats 5 1 2 9 10 14
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys
import time
from pathlib import Path


class Param(ctypes.Structure):             # struct usbtest_param_64
    _fields_ = [(n, ctypes.c_uint32) for n in ("test", "iterations", "length", "vary",
                                               "sglen")] + [("sec", ctypes.c_int64),
                                                            ("usec", ctypes.c_int64)]


class Request(ctypes.Structure):           # struct usbdevfs_ioctl
    _fields_ = [("ifno", ctypes.c_int), ("code", ctypes.c_uint), ("data", ctypes.c_void_p)]


def iowr(nr: int, size: int) -> int:
    return 3 << 30 | size << 16 | ord("U") << 8 | nr


def node(vid: str, pid: str) -> str:
    for d in glob.glob("/sys/bus/usb/devices/*"):
        try:
            ids = [Path(d, a).read_text().strip() for a in ("idVendor", "idProduct")]
            if ids == [vid, pid]:
                bus, dev = (int(Path(d, a).read_text()) for a in ("busnum", "devnum"))
                return f"/dev/bus/usb/{bus:03d}/{dev:03d}"
        except OSError:
            pass
    sys.exit(f"no USB device {vid}:{pid}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", type=int, nargs="+")
    ap.add_argument("--iterations", type=int, default=8, help="usbtest's iterations per ioctl")
    ap.add_argument("--length", type=int, default=4096, help="usbtest's length")
    ap.add_argument("--sglen", type=int, default=4, help="usbtest's sglen (case 10: queued)")
    ap.add_argument("--vary", type=int, default=0, help="usbtest's vary")
    ap.add_argument("--repeats", type=int, default=5, help="ioctls per case")
    ap.add_argument("--device", default="0525:a4a0", help="VID:PID (default Gadget Zero's)")
    args = ap.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(node(*args.device.split(":")), os.O_RDWR)
    code = ctypes.c_ulong(iowr(18, ctypes.sizeof(Request)))
    result: dict[str, dict[str, object]] = {}
    for test in args.cases:
        p = Param(test, args.iterations, args.length, args.vary, args.sglen)
        r = Request(0, iowr(100, ctypes.sizeof(p)), ctypes.cast(ctypes.pointer(p),
                                                                ctypes.c_void_p))
        seconds, status = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            rc = libc.ioctl(fd, code, ctypes.byref(r))
            seconds.append(time.perf_counter() - t0)
            if rc < 0:
                status = -ctypes.get_errno()
                break
        result[str(test)] = {"status": status, "seconds": seconds}
        print(f"@@ case {test}: status {status}, "
              f"{min(seconds) * 1e3:.1f}-{max(seconds) * 1e3:.1f} ms", flush=True)
    os.close(fd)
    print("@@result " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
