"""The table that the benchmarks timing settings side by side print: median of the repeats, ratio to a baseline."""

from __future__ import annotations

import statistics


def median_table(
    title: str, label: str, unit: str, runs: dict[str, list[float]], higher_is_faster: bool, digits: int = 0
) -> str:
    """A markdown table of ``runs`` (setting -> one value per repeat): the median, its speed-up over the first setting,
    and every repeat (``higher_is_faster``: steps/s, else seconds)."""
    base = statistics.median(next(iter(runs.values())))
    lines = [title, f"| {label} | {unit} | speed-up over the first | repeats |", "|---|---:|---:|---|"]
    for name, values in runs.items():
        med = statistics.median(values)
        speed_up = med / base if higher_is_faster else base / med
        lines.append(f"| {name} | {med:.{digits}f} | {speed_up:.2f}x | {', '.join(f'{v:.{digits}f}' for v in values)} |")
    return "\n".join(lines)
