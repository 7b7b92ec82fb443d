"""Achieved TFLOP/s beside the floor ratio, from margin-bench JSON files (the GPU session's last table).

A fused step does the work of four B x C x d GEMMs, 8 B C d FLOP, whatever the method; TFLOP/s is that over
the median forward + backward time, so it compares directly with the machine's GEMM peak.

    python -m bench throughput run1.json [run2.json ...] > tables.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def step_flop(row: dict) -> float:
    return 8.0 * row["batch"] * row["classes"] * row["dim"]


def markdown(paths) -> str:
    lines = []
    for path in map(Path, paths):
        lines += [f"## {path.name}", ""]
        if not path.exists():
            lines += ["(missing: that run did not finish)", ""]
            continue
        data = json.loads(path.read_text())
        lines += [f"`{data.get('command', '')}`", "", "| loss | B | C | d | dtype | method | total ms | x floor | TFLOP/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in data.get("rows", []):
            total = (row.get("total") or {}).get("median_ms")
            if row.get("status") != "ok" or not total:
                lines.append(f"| {row.get('loss')} | {row.get('batch')} | {row.get('classes')} | {row.get('dim')} | "
                             f"{row.get('dtype')} | {row.get('method')} | {row.get('status')} | - | - |")
                continue
            ratio = row.get("floor_ratio")
            lines.append(f"| {row['loss']} | {row['batch']} | {row['classes']:.0e} | {row['dim']} | {row['dtype']} | "
                         f"{row['method']} | {total:.3g} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                         f"{step_flop(row) / (total * 1e-3) / 1e12:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(markdown(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
