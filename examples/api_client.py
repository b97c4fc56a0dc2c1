"""A client of xhcidbg's API socket: start `xhcidbg vm --api /tmp/xhcidbg.sock` (or `serve
--api ...`), then run this.  It waits for the guest shell, stops the controller before the next
Enable Slot command, plugs a keyboard, and prints what Linux made of it once continued.

    python examples/api_client.py /tmp/xhcidbg.sock
"""
from __future__ import annotations

import json
import socket
import sys


class Api:
    def __init__(self, path: str):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        self.file = sock.makefile("rwb")
        self.ids = 0
        self.events: list[dict] = []

    def __call__(self, command: str) -> dict:
        """Run a console command; its reply (events arriving meanwhile are kept)."""
        self.ids += 1
        self.file.write(json.dumps({"id": self.ids, "command": command}).encode() + b"\n")
        self.file.flush()
        while True:
            message = self._next()
            if message.get("id") == self.ids:
                return message

    def wait_event(self, event: str, **fields: object) -> dict:
        """The first `event` with these field values (events come in order; the
        ones before it that do not match are kept)."""
        def matches(message: dict) -> bool:
            return message.get("event") == event and all(message.get(k) == v
                                                         for k, v in fields.items())
        for i, message in enumerate(self.events):
            if matches(message):
                return self.events.pop(i)
        while True:
            message = self._next()
            if matches(message):
                self.events.remove(message)
                return message

    def _next(self) -> dict:
        line = self.file.readline()
        if not line:
            raise SystemExit("xhcidbg closed the API socket")
        message = json.loads(line)
        if "event" in message and "id" not in message:
            self.events.append(message)
        return message


def main(path: str) -> None:
    api = Api(path)
    print(api("wait shell -t 300")["text"], end="")
    api("break command type=enable at=start")
    api("plug keyboard")
    port = api.wait_event("device", action="plugged", name="keyboard")["port"]
    stop = api.wait_event("stop")
    print("stopped:", stop["what"])
    print(api("ring cmd")["text"], end="")
    api("delete all; continue")
    print("enumerated:", api.wait_event("enumerated", port=port))
    for port in api("ports --json")["data"]:
        if port["device"]:
            print(f"port {port['port']}: {port['device']['name']} slot {port['slot']}")
    print(api("guest run cat /sys/bus/usb/devices/*/product")["text"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/xhcidbg.sock")
