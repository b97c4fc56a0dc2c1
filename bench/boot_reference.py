"""Reference figures on QEMU's own xHCI: boot to all devices enumerated, and dd 256 MiB O_DIRECT.

    python bench/boot_reference.py [--runs N]
"""
import argparse
import asyncio
import statistics

from xhcidbg.guestkit.reference import measure


async def run(runs: int) -> None:
    results = []
    for i in range(runs):
        figures = await measure(progress=i == 0)
        print(f"run {i + 1}:")
        print("  " + "\n  ".join(figures.lines()))
        results.append(figures)
    if runs > 1:
        def med(values):
            return statistics.median(values)
        print(f"median of {runs}:"
              f" enumerated {med([f.enumerated_wall_s for f in results]):.2f} s wall,"
              f" {med([f.enumerated_guest_s for f in results]):.2f} s guest"
              f" (kernel log {med([f.enumerated_log_s or 0 for f in results]):.2f} s);"
              f" read {med([f.read.mb_per_s for f in results]):.0f} MB/s;"
              f" whole run {med([f.total_wall_s for f in results]):.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    asyncio.run(run(parser.parse_args().runs))
