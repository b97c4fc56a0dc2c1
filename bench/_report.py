"""Side-by-side figures: this run against a saved reference run (bench/reference/NAME.json)."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

REFERENCE_DIR = Path(__file__).parent / "reference"


def report(name: str, figures: dict[str, float], units: dict[str, str], argv: list[str],
           save: bool) -> None:
    ref_path = REFERENCE_DIR / f"{name}.json"
    reference = json.loads(ref_path.read_text())["figures"] if ref_path.exists() else {}
    width = max(len(k) for k in figures)
    print(f"\n{name}: this run vs reference ({ref_path.name if reference else 'none saved'})")
    print(f"  {'figure':<{width}}  {'this run':>14}  {'reference':>14}  {'ratio':>6}")
    for key, value in figures.items():
        ref = reference.get(key)
        ratio = f"{value / ref:5.2f}x" if ref else "     -"
        ref_s = f"{ref:14.1f}" if ref else f"{'-':>14}"
        print(f"  {key:<{width}}  {value:14.1f}  {ref_s}  {ratio}  {units.get(key, '')}")
    print(f"\nreproduce: {sys.executable} {' '.join(argv)}")
    if save:
        REFERENCE_DIR.mkdir(exist_ok=True)
        ref_path.write_text(json.dumps({"figures": figures, "python": sys.version.split()[0],
                                        "machine": platform.machine()}, indent=1) + "\n")
        print(f"saved as the new reference: {ref_path}")
