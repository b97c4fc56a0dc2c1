"""`xhcidbg trace ...` subcommands and the `--trace FILE` option.

    trace start FILE [FILTER...] [--max-size N] [--max-time S] [--max-files N] [--snaplen N]
    trace stop | trace status
    trace show FILE [FILTER...] [--no-dma] [--limit N]
    trace stats FILE [FILTER...]
    trace install-dissector [--folder DIR]

The console, `xhcidbg serve` and `xhcidbg vm` take `--trace FILE` (`add_trace_option`; serve and
vm capture through `tracing`).

`start`, `stop` and `status` act on the running session's capture: their handlers take
`(args, session_trace)`, the session's `SessionTrace`; `show`, `stats` and `install-dissector`
take `(args, None)` and need none.  Every handler returns a process exit status.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .filters import KINDS, CaptureFilter, FilterError
from .filters import __doc__ as FILTER_HELP
from .pcapng import CaptureError
from .tracer import TraceError, Tracer, TraceStatus

if TYPE_CHECKING:
    from ..emu.controller import XhciController

P = TypeVar("P", bound=argparse.ArgumentParser)
Handler = Callable[[argparse.Namespace, "SessionTrace | None"], int]

def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 500k, 20M, 1G)") from None


class SessionTrace:
    """A session's capture: at most one tracer at a time on the session's controller.  The
    session owns it; `trace start/stop/status`, `--trace FILE` and `tracing` act on it."""

    def __init__(self, controller: XhciController):
        self.controller = controller
        self.tracer: Tracer | None = None

    def start(self, path: str, terms: list[str] | None = None, **options: Any) -> Tracer:
        if self.tracer is not None and self.tracer.status().running:
            raise TraceError(f"already tracing to {self.tracer.path}; `trace stop` first")
        self.tracer = Tracer(self.controller, path, CaptureFilter.parse(terms), **options).start()
        return self.tracer

    def stop(self) -> TraceStatus:
        if self.tracer is None:
            raise TraceError("no trace is running")
        tracer, self.tracer = self.tracer, None
        return tracer.stop()

    def status(self) -> TraceStatus | None:
        return None if self.tracer is None else self.tracer.status()

    @property
    def running(self) -> bool:
        return self.tracer is not None and self.tracer.status().running


def _tracer_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {}
    for name in ("max_bytes", "max_seconds", "max_files", "snaplen"):
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    return opts


def _cmd_start(args: argparse.Namespace, session: SessionTrace | None) -> int:
    if session is None:
        print("trace start: no controller is running in this session", file=sys.stderr)
        return 2
    t = session.start(args.file, args.filter, **_tracer_options(args))
    print(f"tracing to {t.path} ({t.filter})")
    return 0


def _cmd_stop(args: argparse.Namespace, session: SessionTrace | None) -> int:
    if session is None:
        raise TraceError("no trace is running")
    print(session.stop())
    return 0


def _cmd_status(args: argparse.Namespace, session: SessionTrace | None) -> int:
    st = None if session is None else session.status()
    print(st if st is not None else "not tracing")
    return 0


def _cmd_show(args: argparse.Namespace, session: SessionTrace | None) -> int:
    from .viewer import show
    reader = show(args.file, _view_filter(args.filter), dma=not args.no_dma, limit=args.limit)
    if reader.capture is not None:
        for line in reader.problems.lines(reader.capture):
            print(f"note: {line}", file=sys.stderr)
    return 0


def _cmd_stats(args: argparse.Namespace, session: SessionTrace | None) -> int:
    from .viewer import stats
    stats(args.file, _view_filter(args.filter))
    return 0


def _cmd_install(args: argparse.Namespace, session: SessionTrace | None) -> int:
    from .dissector import install
    dest = install(args.folder)
    print(f"installed the xhcidbg Wireshark dissector: {dest}\n"
          f"Wireshark and tshark load it at start; check with `tshark -G protocols | grep xhci`.")
    return 0


def _view_filter(terms: list[str]) -> CaptureFilter:
    flt = CaptureFilter.parse(terms)
    if not any(t.startswith("kind=") for t in terms):
        flt.kinds = frozenset(KINDS)
    return flt


def add_trace_commands(subparsers: argparse._SubParsersAction[P]) -> P:
    """Add `trace` with its subcommands; each leaf sets `func(args, session_trace) -> int`."""
    p = subparsers.add_parser("trace", help="capture to pcapng, view and summarise captures",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="trace_command", required=True, metavar="COMMAND")
    filter_help = "key=value terms: kind, bus, port, slot, ep, dci"

    s = sub.add_parser("start", help="start capturing to FILE (a file or a FIFO)",
                       epilog=FILTER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("file")
    s.add_argument("filter", nargs="*", metavar="FILTER", help=filter_help)
    s.add_argument("--max-size", dest="max_bytes", type=_size,
                   help="start a new file after this many bytes (e.g. 100M)")
    s.add_argument("--max-time", dest="max_seconds", type=float,
                   help="start a new file after this many seconds")
    s.add_argument("--max-files", type=int, help="keep only the newest N files")
    s.add_argument("--snaplen", type=int, help="bytes kept per usbmon record (default 65535)")
    s.set_defaults(func=_cmd_start)

    sub.add_parser("stop", help="stop capturing").set_defaults(func=_cmd_stop)
    sub.add_parser("status", help="what is being captured").set_defaults(func=_cmd_status)

    s = sub.add_parser("show", help="print a capture as Linux xhci tracepoints and usbmon text",
                       epilog=FILTER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("file")
    s.add_argument("filter", nargs="*", metavar="FILTER", help=filter_help)
    s.add_argument("--no-dma", action="store_true",
                   help="print TRBs without the @dma address (kernels before 6.13)")
    s.add_argument("--limit", type=int, help="stop after N records")
    s.set_defaults(func=_cmd_show)

    s = sub.add_parser("stats", help="transfers, bytes, errors and latency per endpoint")
    s.add_argument("file")
    s.add_argument("filter", nargs="*", metavar="FILTER", help=filter_help)
    s.set_defaults(func=_cmd_stats)

    s = sub.add_parser("install-dissector",
                       help="install the Wireshark Lua dissector for xhcidbg's xHCI records")
    s.add_argument("--folder", type=Path,
                   help="plugin folder (default: Wireshark's personal Lua plugin folder)")
    s.set_defaults(func=_cmd_install)
    return p


def add_trace_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--trace FILE` and `--trace-filter TERMS`: capture from the moment the controller starts
    (`start_option_trace` or `tracing` start it).  `parser` may be a group."""
    parser.add_argument("--trace", metavar="FILE",
                        help="capture to FILE (pcapng; a FIFO streams to `wireshark -k -i FILE`)")
    parser.add_argument("--trace-filter", metavar="TERMS", default="",
                        help="what to capture, e.g. \"kind=urb\" or \"slot=1 kind=trb,event\" "
                             "(default: everything but xurb)")


def start_option_trace(session: SessionTrace, path: str, terms: list[str]) -> Tracer:
    """Start the capture `--trace FILE --trace-filter TERMS` ask for; ValueError naming the
    option if the file cannot be written or the filter is wrong."""
    try:
        return session.start(path, terms)
    except (TraceError, FilterError) as e:
        raise ValueError(f"--trace {path}: {e}") from None


@contextlib.contextmanager
def tracing(session: SessionTrace, args: argparse.Namespace,
            say: Callable[[str], None] | None = None) -> Iterator[Tracer | None]:
    """Trace the session's controller to `args.trace` (filtered by `args.trace_filter`) for the
    duration of the `with` block, as the session's capture (so `trace status` / `trace stop`
    see it).  Does nothing when `args.trace` is unset.  Yields the Tracer (or None).

    Raises ValueError with a message for the user if the file cannot be written or the filter
    is wrong -- before the block runs, so start it before the guest.  On exit the capture is
    flushed and closed, and `say` gets one line: what was written, and any trouble (records
    dropped, a FIFO reader that went away)."""
    path = getattr(args, "trace", None)
    if not path:
        yield None
        return
    terms = (getattr(args, "trace_filter", "") or "").split()
    tracer = start_option_trace(session, path, terms)
    if say:
        say(f"tracing to {tracer.path} ({tracer.filter})")
    try:
        yield tracer
    finally:
        status = session.stop() if session.tracer is tracer else tracer.stop()
        if say:
            trouble = status.error or status.dropped
            say(("trace: " if not trouble else "trace WARNING: ") + str(status))


def run(args: argparse.Namespace, session: SessionTrace | None = None) -> int:
    """Run a parsed `trace` command (on `session`, the running session's capture, if any),
    turning our errors into messages and exit status 2."""
    func: Handler = args.func
    try:
        return func(args, session)
    except (TraceError, FilterError, CaptureError) as e:
        print(f"trace {args.trace_command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:          # `trace show FILE | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m xhcidbg.trace.cli show FILE`: the trace commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="xhcidbg")
    add_trace_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
