"""Instructions per TD for a fixed amount of work, counted by valgrind (callgrind): the same on
every run, whatever else the machine does, so two trees compare to the percent where the
seconds of `throughput.py` drift by tens of percent.

    python bench/instructions.py                       # this tree: bulk IN 1 KiB, OUT 64 KiB
    python bench/instructions.py --vs /path/to/other   # and another checkout, side by side

Each figure is (instructions with N batches of 128 TDs - instructions with none) / (N * 128),
with PYTHONHASHSEED fixed; the guest's share is included, as in throughput.py.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
BATCH = 128
CASES = (("in", 1024), ("out", 65536))

WORK = f"""
import sys
tree, direction, size, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path[:0] = [tree, tree + "/bench"]
import throughput
bus, drv, dev = throughput.setup(ring_trbs={BATCH} + 16)
ep = dev.endpoint(0x81 if direction == "in" else 0x01)
buf, payload = drv.alloc.buffer(size), bytes(size)
def one():
    with drv.batch():
        tds = [ep.submit(length=size, buffer=buf, fetch_data=False) if direction == "in"
               else ep.submit(payload, buffer=buf) for _ in range({BATCH})]
    drv.wait_all(tds)
for _ in range(3 + batches):      # three batches warm up either way
    one()
"""


def count(tree: Path, direction: str, size: int, batches: int, script: Path) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         str(script), str(tree), direction, str(size), str(batches)],
        capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, check=True)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise SystemExit(f"valgrind said no count:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def per_td(tree: Path, direction: str, size: int, batches: int, script: Path) -> float:
    return (count(tree, direction, size, batches, script)
            - count(tree, direction, size, 0, script)) / (batches * BATCH)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vs", type=Path, help="another checkout of xhcidbg to compare with")
    ap.add_argument("--batches", type=int, default=10, help="batches of 128 TDs (default 10)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "work.py"
        script.write_text(WORK)
        for direction, size in CASES:
            mine = per_td(HERE, direction, size, args.batches, script)
            line = f"bulk {direction} {size >> 10:>2} KiB: {mine:10.0f} instructions/TD"
            if args.vs is not None:
                other = per_td(args.vs.resolve(), direction, size, args.batches, script)
                line += f"   {args.vs}: {other:10.0f}   ratio {mine / other:.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
