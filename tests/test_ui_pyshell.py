"""`py` against the in-process guest: Python on the console's loop with the live session bound,
from a script line, through the API socket and at its own nested prompt."""
from __future__ import annotations

import asyncio
import io
import json

from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console as RichConsole

from xhcidbg.emu.context import SlotState
from xhcidbg.ui.api import ApiServer
from xhcidbg.ui.commands import split_commands, split_words
from xhcidbg.ui.pyshell import namespace, repl


def test_py_shows_the_live_controller(con):
    assert con.execute("py hc.slots[1].state").strip() == str(int(SlotState.CONFIGURED))
    assert con.execute("py SlotState(controller.slots[1].state).name").strip() == "'CONFIGURED'"
    port = con.controller.slots[1].port.number
    name = con.session.devices[port].name
    assert con.execute(f"py devices[{port}].name").strip() == repr(name)
    assert con.execute("py hc is con.controller is session.controller").strip() == "True"
    assert con.execute("py TRB_NAMES[TrbType.NORMAL], IOC.of(0x20)").strip() == "('Normal', 1)"


def test_py_lines_keep_their_semicolons_quotes_and_names(con):
    assert con.execute('py s = "a;b"; t = \'c d\'; len(s), t').strip() == "(3, 'c d')"
    con.execute("py x = hc.interrupters[0]")
    assert con.execute("py x.posted").strip() == str(con.controller.interrupters[0].posted)
    assert con.execute("py _ + 1").strip() == str(con.controller.interrupters[0].posted + 1)
    assert con.execute('py print("hello", 42, sep="-")') == "hello-42\n"
    assert con.execute("py y = 5") == ""               # a statement shows nothing
    assert split_commands("pause; py a = 1; b = 'x;y'") == ["pause", "py a = 1; b = 'x;y'"]
    assert split_words("py --json f('a b')") == ["py", "--json", "--", "f('a b')"]


def test_py_awaits_on_the_consoles_loop(con):
    assert con.execute("py await asyncio.sleep(0, 'slept')").strip() == "'slept'"
    port, _ = con.world.find("tablet")
    before = con.world.report_count
    # drive the tablet and let the session run: the guest receives the report meanwhile
    con.execute(f"py devices[{port}].move(7, 8); await session.settle(2)")
    assert con.world.report_count == before + 1
    assert con.world.reports[-1].data[1:5] == bytes([7, 0, 8, 0])


def test_py_errors_print_a_traceback_and_the_console_goes_on(con):
    out = con.execute("py 1/0")
    assert "Traceback (most recent call last)" in out and "ZeroDivisionError" in out
    assert "1/0" in out                                # the line that failed is shown
    assert "SyntaxError" in con.execute("py def")
    assert "SystemExit" in con.execute("py raise SystemExit(3)")
    assert "NameError" in con.execute("py nothing_here")
    assert con.execute("py 1 + 1").strip() == "2"
    failed = con.run_script(["py 1/0", "py 2"], echo=False, file=io.StringIO())
    assert failed == 1
    assert "py CODE" in con.execute("py")             # no prompt to open in a script


def test_py_json_gives_the_value(con):
    data = json.loads(con.execute("py --json [s for s in sorted(hc.slots)]"))
    assert data["value"] == sorted(con.controller.slots) and data["type"] == "list"
    data = json.loads(con.execute("py --json print('out'); hc"))
    assert data["output"] == "out\n" and data["value"] is None
    assert data["repr"].startswith("<") and data["type"] == "XhciController"


def test_py_through_the_api_socket(con, tmp_path):
    path = str(tmp_path / "api.sock")

    async def ask(line: str) -> dict:
        server = ApiServer(con, path)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(json.dumps({"id": 1, "command": line}).encode() + b"\n")
            await writer.drain()
            reply = json.loads(await reader.readline())
            while "event" in reply:            # the hello and other events come first
                reply = json.loads(await reader.readline())
            writer.close()
            return reply
        finally:
            await server.close()

    reply = con.loop.run_until_complete(ask("py n = len(hc.slots); n * 2"))
    assert reply["ok"] is True and reply["data"]["value"] == 2 * len(con.controller.slots)
    reply = con.loop.run_until_complete(ask("py 1/0"))
    assert reply["ok"] is False and "ZeroDivisionError" in reply["text"]


def test_the_nested_python_prompt_runs_blocks_until_ctrl_d(con):
    buf = io.StringIO()

    async def run() -> None:
        con.out = RichConsole(file=buf, width=200, no_color=True, force_terminal=False)
        with create_pipe_input() as keys:
            keys.send_text("x = 20\r"
                           "x * 2 + 2\r"
                           "for i in range(2):\r"
                           "    print('line', i)\r"
                           "\r"
                           "1/0\r"
                           "await asyncio.sleep(0, len(hc.slots))\r"
                           "\x04")
            await repl(con, namespace(con), input=keys, output=DummyOutput(),
                       history=InMemoryHistory())

    con.loop.run_until_complete(asyncio.wait_for(run(), 10))
    out = buf.getvalue()
    assert "Ctrl-D returns to the console" in out
    assert "\n42\n" in out and "line 0\nline 1\n" in out
    assert "ZeroDivisionError" in out
    assert out.rstrip().endswith(str(len(con.controller.slots)))
    assert namespace(con)["x"] == 20                   # the prompt and `py` share the names
