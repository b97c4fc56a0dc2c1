"""The `trace` subcommands: start/stop/status on a running controller, install-dissector."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess

from xhcidbg.devices.tablet import Tablet
from xhcidbg.guest.driver import XhciDriver
from xhcidbg.trace import cli, dissector
from xhcidbg.trace.viewer import Reader
from xhcidbg.transport.inproc import InProcessBus


def parse(argv):
    p = argparse.ArgumentParser(prog="xhcidbg")
    cli.add_trace_commands(p.add_subparsers(dest="command", required=True))
    return p.parse_args(argv)


def test_start_status_stop_on_a_running_controller(tmp_path, capsys):
    bus = InProcessBus()
    session = cli.SessionTrace(bus.controller)        # what a session owns
    path = tmp_path / "session.pcapng"
    assert cli.run(parse(["trace", "start", str(path), "kind=urb,command", "--max-files", "2",
                          "--max-size", "1M"]), session) == 0
    assert "tracing to" in capsys.readouterr().out
    assert cli.run(parse(["trace", "start", str(path)]), session) == 2
    assert "already tracing" in capsys.readouterr().err
    drv = XhciDriver(bus).start()
    drv.enumerate(drv.wait_for_connect(bus.controller.attach(Tablet())))
    assert cli.run(parse(["trace", "status"]), session) == 0
    assert "tracing to" in capsys.readouterr().out
    assert cli.run(parse(["trace", "stop"]), session) == 0
    out = capsys.readouterr().out
    assert "stopped" in out and "records" in out
    assert cli.run(parse(["trace", "stop"]), session) == 2
    files = sorted(tmp_path.glob("session_*.pcapng"))
    kinds = {e.kind for f in files for e in Reader(f).entries()}
    assert kinds == {"urb", "command"}


def test_install_dissector_into_a_plugin_folder_tshark_loads(tmp_path, capsys):
    home = tmp_path / "home"
    folder = home / ".local" / "lib" / "wireshark" / "plugins"
    assert cli.run(parse(["trace", "install-dissector", "--folder", str(folder)])) == 0
    installed = folder / dissector.FILENAME
    assert installed.read_text() == dissector.REPO_COPY.read_text()
    tshark = shutil.which("tshark")
    assert tshark, "tshark is required for these tests: apt-get install -y tshark"
    r = subprocess.run([tshark, "-G", "protocols"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HOME=str(home)))
    assert "xhci" in [line.split("\t")[-1] for line in r.stdout.splitlines()]


def test_trace_option_for_serve_and_vm(tmp_path):
    """`--trace FILE --trace-filter TERMS` and `tracing(...)`: what `xhcidbg serve` / `vm` use."""
    p = argparse.ArgumentParser()
    cli.add_trace_option(p.add_argument_group("tracing"))
    said = []
    bus = InProcessBus()
    session = cli.SessionTrace(bus.controller)
    path = tmp_path / "vm.pcapng"
    args = p.parse_args(["--trace", str(path), "--trace-filter", "kind=urb,command"])
    with cli.tracing(session, args, say=said.append) as tracer:
        assert session.status().running               # the console's `trace status` sees it
        drv = XhciDriver(bus).start()
        drv.enumerate(drv.wait_for_connect(bus.controller.attach(Tablet())))
    assert not tracer.status().running and session.status() is None
    assert said[0] == f"tracing to {path} (kind=urb,command)"
    assert said[1].startswith("trace: stopped to") and "records" in said[1]
    kinds = {e.kind for e in Reader(path).entries()}
    assert kinds == {"urb", "command"}
    # nothing asked, nothing done; bad requests are ValueErrors that name the option
    with cli.tracing(session, p.parse_args([]), say=said.append) as tracer:
        assert tracer is None
    for argv, why in ((["--trace", str(tmp_path / "no" / "x.pcapng")], "cannot write"),
                      (["--trace", str(path), "--trace-filter", "kind=nope"], "unknown record")):
        try:
            with cli.tracing(session, p.parse_args(argv)):
                raise AssertionError("the block ran")
        except ValueError as e:
            assert str(e).startswith(f"--trace {argv[1]}: ") and why in str(e)
