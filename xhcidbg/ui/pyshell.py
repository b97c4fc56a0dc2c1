"""`py`: Python with the live session bound, on the console's own asyncio loop.

`py EXPR_OR_STATEMENTS` runs the rest of the line (the console does not split it at `;` or
take its quotes: see `raw` in the registry) and prints the value of a final expression, as the
Python prompt does; top-level `await` works, so `py await session.settle(1)` lets the session
run.  `py` alone at the interactive console opens a nested Python prompt until Ctrl-D.  The
names persist between lines: `py x = hc.slots[1]` then `py x.state`.  What the code raises is
shown as a traceback; it never takes the console down.
"""
from __future__ import annotations

import ast
import asyncio
import builtins
import codeop
import inspect
import itertools
import json
import linecache
import os
import pprint
import re
import rlcompleter
import traceback
from argparse import Namespace
from collections.abc import Iterator
from contextvars import ContextVar
from types import CodeType
from typing import TYPE_CHECKING, Any

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from rich.text import Text

from ..emu import context as emu_context
from ..emu import regs as R
from ..emu import trb as emu_trb
from ..emu.layout import Field
from . import render
from .registry import command, parser
from .world import World

if TYPE_CHECKING:
    from prompt_toolkit.history import History as PromptHistory
    from prompt_toolkit.input import Input
    from prompt_toolkit.output import Output

    from .console import Console

SESSION = "session"
FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
PY_HISTORY_FILE = os.path.join(os.path.expanduser("~"), ".xhcidbg_py_history")
_FILE_PREFIX = "<py-"
_runs = itertools.count(1)
# what `print` in py code writes to besides the console, while a `py` line runs (its --json)
_printed: ContextVar[list[str] | None] = ContextVar("xhcidbg-py-printed", default=None)


class PyError(RuntimeError):
    """The code raised: the message is its traceback."""


def namespace(con: Console) -> dict[str, Any]:
    """The names py code sees (made once per console, then kept: assignments persist)."""
    ns = con.extras.get("py")
    if isinstance(ns, dict):
        return ns
    session = con.session
    controller = session.controller
    ns = {"__name__": "__xhcidbg__", "__builtins__": builtins, "_": None,
          "con": con, "session": session, "controller": controller, "hc": controller,
          "devices": session.devices, "trace": session.trace, "mem": controller.mem,
          "asyncio": asyncio, "render": render, "R": R, "trb": emu_trb,
          "Trb": emu_trb.Trb, "TrbType": emu_trb.TrbType, "CC": emu_trb.CC,
          "TRB_NAMES": emu_trb.TRB_NAMES, "CC_NAMES": emu_trb.CC_NAMES,
          "trb_name": emu_trb.trb_name, "cc_name": emu_trb.cc_name,
          "SlotState": emu_context.SlotState, "EpState": emu_context.EpState,
          "print": _console_print(con)}
    # every TRB field (IOC, CHAIN, SLOT_ID...): `IOC.of(t.control)`, `SLOT_ID.put(1)`
    ns.update({name: value for name, value in vars(emu_trb).items()
               if name.isupper() and not name.startswith("_") and isinstance(value, Field)})
    if isinstance(session, World):
        ns.update(world=session, guest=session.driver)
    elif session.shell is not None:
        ns["guest"] = session.shell
    con.extras["py"] = ns
    return ns


BOUND = ("con", "session", "controller / hc", "devices", "trace", "mem", "guest",
         "TrbType, CC, Trb, trb_name, cc_name", "the TRB fields (IOC, CHAIN, SLOT_ID...)",
         "R (registers)", "render")


def _console_print(con: Console) -> Any:
    """`print` for py code: to the console's output of whoever runs it (the prompt, a script,
    an API request), not to the process's stdout."""
    def print_(*values: object, sep: str | None = " ", end: str | None = "\n",
               file: Any = None, flush: bool = False) -> None:
        if file is not None:
            builtins.print(*values, sep=sep, end=end, file=file, flush=flush)
            return
        text = (" " if sep is None else sep).join(str(v) for v in values)
        end = "\n" if end is None else end
        con.out.print(Text(text), end=end)
        sink = _printed.get()
        if sink is not None:
            sink.append(text + end)
    return print_


def _compile(node: ast.Module | ast.Expression, filename: str) -> CodeType:
    mode = "eval" if isinstance(node, ast.Expression) else "exec"
    return compile(node, filename, mode, flags=FLAGS)


async def _run(code: CodeType, ns: dict[str, Any]) -> Any:
    result = eval(code, ns)       # running the user's code is the point
    if code.co_flags & inspect.CO_COROUTINE:
        result = await result
    return result


async def run_source(source: str, ns: dict[str, Any]) -> tuple[bool, Any]:
    """Run `source` in `ns`; (whether it ended with an expression, that expression's value).
    Raises what the code raises (SyntaxError included)."""
    filename = f"{_FILE_PREFIX}{next(_runs)}>"
    lines = source.splitlines(keepends=True)
    linecache.cache[filename] = (len(source), None, lines, filename)   # tracebacks show lines
    tree = ast.parse(source, filename, "exec")
    last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    body = tree.body[:-1] if last is not None else tree.body
    if body:
        await _run(_compile(ast.Module(body=body, type_ignores=[]), filename), ns)
    if last is None:
        return False, None
    return True, await _run(_compile(ast.Expression(body=last.value), filename), ns)


def format_error(e: BaseException) -> str:
    """The traceback from the user's code on (the console's own frames left out)."""
    tb = e.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith(_FILE_PREFIX):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb)).rstrip()


def show_value(con: Console, value: Any, ns: dict[str, Any]) -> None:
    if value is None:
        return
    ns["_"] = value
    con.out.print(Text(pprint.pformat(value, width=max(40, (con.out.width or 100) - 1))))


async def run_line(con: Console, source: str, ns: dict[str, Any]) -> tuple[bool, Any]:
    """Run `source` and show its value; errors come back as PyError with the traceback."""
    try:
        has_value, value = await run_source(source, ns)
    except asyncio.CancelledError:
        raise
    except (Exception, SystemExit, KeyboardInterrupt) as e:   # the user's: never ours to die of
        raise PyError(format_error(e)) from None
    show_value(con, value, ns)
    return has_value, value


def _plain(value: Any) -> Any:
    """`value` itself if it is JSON (numbers, strings, lists, dicts of them), else None."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


# ---- the nested prompt --------------------------------------------------------------------------
class PythonCompleter(Completer):
    """Names and attributes from the py namespace (the standard library's rlcompleter)."""

    def __init__(self, ns: dict[str, Any]):
        self.ns = ns

    def get_completions(self, document: Document,
                        complete_event: CompleteEvent) -> Iterator[Completion]:
        word = document.get_word_before_cursor(pattern=_DOTTED)
        if not word:
            return
        yield from python_completions(self.ns, word)


_DOTTED = re.compile(r"[\w.]+")


def python_completions(ns: dict[str, Any], word: str) -> Iterator[Completion]:
    completer = rlcompleter.Completer(ns)
    seen = set()
    for state in range(200):
        try:
            found = completer.complete(word, state)
        except Exception:           # an attribute that raises while it is looked at
            return
        if found is None:
            return
        if found not in seen:
            seen.add(found)
            yield Completion(found, start_position=-len(word))


def _lexer() -> Any:
    """Python colouring if Pygments is there (rich brings it)."""
    from prompt_toolkit.lexers import PygmentsLexer
    try:
        return PygmentsLexer.from_filename("code.py", sync_from_start=False)
    except ImportError:
        return None


def _history() -> PromptHistory:
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    try:
        return FileHistory(PY_HISTORY_FILE)
    except OSError:
        return InMemoryHistory()


async def repl(con: Console, ns: dict[str, Any], *, input: Input | None = None,
               output: Output | None = None, history: PromptHistory | None = None) -> None:
    """A Python prompt on the console's loop until Ctrl-D; each complete statement runs as
    `py` runs it, errors print their traceback and the prompt goes on."""
    from prompt_toolkit import PromptSession

    session: PromptSession[str] = PromptSession(
        history=history if history is not None else _history(), lexer=_lexer(),
        completer=PythonCompleter(ns), complete_while_typing=False, input=input, output=output)
    con.out.print(Text(f"Python on the session's loop; bound: {', '.join(BOUND)}.  Top-level "
                       f"await works.  Ctrl-D returns to the console.", style="dim"))
    checker = codeop.CommandCompiler()
    checker.compiler.flags |= FLAGS
    lines: list[str] = []
    while True:
        try:
            line = await session.prompt_async("... " if lines else ">>> ")
        except KeyboardInterrupt:
            lines = []
            continue
        except EOFError:
            break
        lines.append(line)
        source = "\n".join(lines)
        try:
            if checker(source, "<py>", "single") is None:
                continue                     # a block goes on: read more
        except (SyntaxError, ValueError, OverflowError):
            pass                             # running it reports the error
        lines = []
        if not source.strip():
            continue
        try:
            await run_line(con, source, ns)
        except PyError as e:
            con.out.print(Text(str(e), style="red"))


# ==== py =========================================================================================
p = parser("py", "Python with the live session bound, on the console's loop.\n"
                 "`py CODE` runs the rest of the line (`;` and quotes are Python's) and prints\n"
                 "the value of a final expression; `py` alone at the console opens a Python\n"
                 "prompt (Ctrl-D returns).  Top-level `await` works; names persist.\n"
                 f"Bound: {', '.join(BOUND)}.",
           """py hc.slots[1].state           # the controller's slot 1: its state
              py [s.port.number for s in hc.slots.values()]
              py x = hc.interrupters[0]; x.posted, x.erdp
              py print(TRB_NAMES[TrbType.NORMAL], IOC.of(0x20))
              py await session.settle(1)     # let the session run for up to a second
              py devices[1].move(10, 20)     # drive the tablet on port 1 directly
              py --json hc.usbsts            # the value as data
              py                             # a Python prompt (interactive console)""")
p.add_argument("code", nargs="?", help="Python: statements, or an expression to show")


def _py_complete(con: Console, words: list[str]) -> list[str]:
    current = words[-1] if words else ""
    return [c.text for c in python_completions(namespace(con), current)] if current else []


@command(p, SESSION, raw=True, complete=_py_complete)
async def py(con: Console, args: Namespace) -> None:
    ns = namespace(con)
    if not args.code:
        if not con.at_prompt:
            raise ValueError("py CODE: which code? (`py` alone opens a Python prompt at the "
                             "interactive console)")
        await repl(con, ns)
        return
    printed: list[str] = []
    token = _printed.set(printed)
    try:
        has_value, value = await run_line(con, args.code, ns)
    finally:
        _printed.reset(token)
    con.data({"ok": True, "value": _plain(value), "repr": repr(value) if has_value else None,
              "type": type(value).__name__ if has_value else None,
              "output": "".join(printed)})


__all__ = ["PyError", "PythonCompleter", "format_error", "namespace", "repl", "run_line",
           "run_source"]
