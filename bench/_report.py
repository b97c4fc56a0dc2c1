"""Side-by-side figures: this run against a saved reference run (bench/reference/NAME.json)."""
from __future__ import annotations

import json
import platform
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

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


def side_by_side(rounds: Sequence[Mapping[str, Any]], rows: Sequence[tuple[Any, str, str]],
                 columns: tuple[str, str], ratio: tuple[str, str],
                 value: Callable[[Any, Any], float] = lambda figures, key: figures[key],
                 ) -> tuple[dict[str, float], dict[str, str]]:
    """Print, per row (key, label, unit), each side's median over `rounds` ({side: figures},
    `value(figures, key)` reading one), the ratio of the medians (ratio[0] / ratio[1]) and the
    lowest and highest of the rounds' own ratios: a round's two sides ran back to back, so its
    ratio holds when the machine drifts.  Returns the medians as report() figures and units."""
    top, bottom = ratio
    print(f"\nmedians of {len(rounds)} rounds (alternating {', '.join(columns)}; each round: "
          "the lowest and highest of the rounds' own ratios):")
    width = max(len(label) for _, label, _ in rows)
    heads = [f"{c:>{max(10, len(c))}}" for c in columns]
    quotient = f"{top}/{bottom}"
    q = max(12, len(quotient))
    print(f"  {'figure':<{width}}  {'  '.join(heads)}  {quotient:>{q}}  {'each round':>12}")
    figures: dict[str, float] = {}
    units: dict[str, str] = {}
    for key, label, unit in rows:
        med = {side: statistics.median(value(r[side], key) for r in rounds) for side in columns}
        shown = f"{med[top] / med[bottom]:11.2f}x" if med[bottom] else f"{'-':>12}"
        pairs = sorted(value(r[top], key) / value(r[bottom], key) for r in rounds
                       if value(r[bottom], key))
        spread = f"{pairs[0]:.2f}-{pairs[-1]:.2f}x" if pairs else "-"
        cells = "  ".join(f"{med[c]:{len(h)}.2f}" for c, h in zip(columns, heads, strict=True))
        print(f"  {label:<{width}}  {cells}  {shown:>{q}}  {spread:>12}  {unit}")
        for side in columns:
            figures[f"{side} {label} {unit}"] = med[side]
            units[f"{side} {label} {unit}"] = unit
    return figures, units
