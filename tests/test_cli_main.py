"""The `xhcidbg` command line, run as a user runs it."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from xhcidbg.cli import build_parser
from xhcidbg.devices import Speed
from xhcidbg.session import DeviceChoice, device_choice


def xhcidbg(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="160")
    return subprocess.run([sys.executable, "-m", "xhcidbg", *args], input=stdin, text=True,
                          capture_output=True, timeout=timeout, env=env)


def test_commands_option_runs_the_console_on_the_default_devices():
    r = xhcidbg("-c", "devices; reports", "--width", "200")
    assert r.returncode == 0, r.stderr
    for name in ("tablet", "keyboard", "storage"):
        assert "enumerated as slot" in r.stdout and name in r.stdout
    assert "no reports yet" in r.stdout


def test_batch_from_stdin_with_echo_and_exit_status():
    r = xhcidbg("console", "--no-storage", "--echo", stdin="pause\ntablet move 1 2\nstep td\n")
    assert r.returncode == 0, r.stderr
    assert "xhcidbg> step td" in r.stdout
    assert "guest received report: tablet" in r.stdout
    assert "00 01 00 02 00 00" in r.stdout
    r = xhcidbg("-c", "no-such-command")
    assert r.returncode == 1 and "unknown command" in r.stdout


def test_storage_image_option(tmp_path):
    image = tmp_path / "stick.img"
    image.write_bytes(bytes(1 << 20))
    r = xhcidbg("console", "--storage", str(image), "--no-tablet", "--no-keyboard",
                "-c", "storage")
    assert r.returncode == 0, r.stderr
    assert str(image) in r.stdout and "READ CAPACITY 2048 blocks" in r.stdout
    r = xhcidbg("console", "--storage", str(tmp_path / "missing.img"), "-c", "ports")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_trace_option_writes_a_capture(tmp_path):
    pytest.importorskip("xhcidbg.trace.cli")
    out = tmp_path / "run.pcapng"
    r = xhcidbg("console", "--no-storage", "--trace", str(out), "-c", "tablet move 5 5")
    assert r.returncode == 0, r.stderr
    assert out.exists() and out.stat().st_size > 1000
    assert out.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"       # pcapng Section Header Block


def test_help_has_examples_and_subcommands():
    parser = build_parser()
    text = parser.format_help()
    assert "console" in text and "examples:" in text
    r = xhcidbg("console", "--help")
    assert r.returncode == 0 and "--storage IMAGE" in r.stdout and "examples:" in r.stdout


def test_console_serve_and_vm_take_the_same_device_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    shared = {"--no-tablet", "--no-keyboard", "--storage", "--storage-size", "--storage-readonly",
              "--loopback", "--speed", "--trace", "--trace-filter"}
    for name in ("console", "serve", "vm"):
        options = {s for a in sub.choices[name]._actions for s in a.option_strings}
        assert shared <= options, name

    def choice(*argv: str) -> DeviceChoice:
        return device_choice(parser.parse_args(list(argv)))

    # each command keeps its defaults: the console adds a temporary stick, serve and vm do not
    assert choice("console") == DeviceChoice(scratch_stick=True)
    assert choice("serve", "--socket", "s") == choice("vm") == DeviceChoice()
    # one --storage is one stick on that image; more are more sticks; --no-storage is none
    assert choice("console", "--storage", "a.img").storage == ["a.img"]
    assert not choice("console", "--storage", "a.img").scratch_stick
    assert choice("vm", "--storage", "a", "--storage", "b").storage == ["a", "b"]
    assert choice("console", "--no-storage") == DeviceChoice(scratch_stick=False)
    assert choice("vm", "--speed", "keyboard=low").speeds == {"keyboard": Speed.LOW}
