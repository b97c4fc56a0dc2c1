"""The console's `fault` command on the in-process world, the toolbar's count, the capture's
packet comments (read back by tshark) and the shipped scenarios."""
import json
import os
import shutil
import subprocess

import pytest

from xhcidbg.faults import parse_rules
from xhcidbg.faults.cli import SCENARIOS
from xhcidbg.trace import dissector


def test_fault_add_list_log_and_the_toolbar(con, tmp_path):
    assert "faults: none" in con.toolbar_text()
    con.execute(f"trace start {tmp_path / 'f.pcapng'}")
    out = con.execute("fault add wobble: urb device=tablet nth=1 do corrupt offset=1 value=0x7f")
    assert "fault #1: wobble: urb device=tablet nth=1 do corrupt offset=1 value=0x7f" in out
    con.execute("tablet move 100 200")
    assert "faults: 1 rule, 1 injected" in con.toolbar_text()
    log = con.execute("fault log")
    assert "fault #1 wobble (corrupt, match 1)" in log and "bytes ['1:0x7f']" in log
    listed = con.execute("fault list")
    assert "wobble: urb device=tablet" in listed and "seed" in listed
    data = json.loads(con.execute("fault list --json"))
    assert data["rules"][0]["fired"] == 1 and data["injected"] == 1
    con.execute("trace stop")
    # stock tshark with our dissector: the injection is a record of its own, filterable by
    # rule, and its text is the packet comment
    assert shutil.which("tshark"), "these tests read captures with tshark: apt-get install tshark"
    r = subprocess.run(["tshark", "-X", f"lua_script:{dissector.REPO_COPY}",
                        "-r", str(tmp_path / "f.pcapng"), "-Y", "xhci.fault.rule == 1",
                        "-T", "fields", "-e", "xhci.fault.rule", "-e", "xhci.fault.match",
                        "-e", "frame.comment"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path)))
    [row] = [line.split("\t") for line in r.stdout.splitlines()]
    assert row[:2] == ["1", "1"] and row[2].startswith("fault #1 wobble (corrupt, match 1)"), \
        r.stderr
    con.execute("fault disable 1")
    assert "faults: 0 rules, 1 injected" in con.toolbar_text()
    assert "1 fault rule deleted" in con.execute("fault del wobble")


def test_a_bad_rule_in_the_console_says_where_and_what(con):
    out = con.execute("fault add urb ep=0x81 do explode")
    assert "expected an action" in out and "column 16" in out
    assert con.session.faults.rules == []


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.faults")), ids=lambda p: p.stem)
def test_every_shipped_scenario_parses_and_names_the_linux_code_it_drives(path):
    text = path.read_text()
    assert parse_rules("\n".join(line for line in text.splitlines()
                                 if not line.startswith("seed ")), source=str(path))
    assert "# drives:" in text and "xhci" in text


def test_a_bad_scenario_file_stops_the_command_with_file_line_and_column(tmp_path):
    import sys
    bad = tmp_path / "bad.faults"
    bad.write_text("# comment\nurb ep=0x81 nth=0 do stall\n")
    r = subprocess.run([sys.executable, "-m", "xhcidbg", "--faults", str(bad), "-c", "fault list"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"{bad}:2:13: nth=0: nth needs a count of 1 or more" in r.stderr
