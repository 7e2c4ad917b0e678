"""Instructions per proxied exchange, counted by callgrind.

    python benchmarks/instructions.py [EXCHANGES]

Runs the micro-benchmark exchange of benchmarks/test_micro.py (a small GET
and its 19-byte response through a Downstream and a pooled Upstream, fake
transports, no network) under `valgrind --tool=callgrind`, once with zero
exchanges and once with EXCHANGES, and prints the difference per exchange:
the total and the functions that account for it. Instruction counts do not
depend on machine load, so this is the steady figure to compare builds with.
The fake transports' Python `write` methods are part of the count (about
2,500 instructions per exchange): they stand in for uvloop's C write.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

DRIVER = """
import sys
sys.path.insert(0, {here!r})
import test_micro
bench = test_micro.Bench()
for _ in range({count}):
    bench.exchange(test_micro.SMALL_GET, test_micro.SMALL_RESPONSE)
"""


def run(count: int, out: Path) -> None:
    driver = out.with_suffix(".py")
    driver.write_text(DRIVER.format(here=str(HERE), count=count))
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            os.path.realpath(sys.executable),
            str(driver),
        ],
        check=True,
        capture_output=True,
    )


def functions(path: Path) -> dict[str, int]:
    text = subprocess.run(
        ["callgrind_annotate", "--auto=no", "--threshold=100", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    counts: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(.*)", line)
        if match:
            name = re.sub(r" \[.*\]$", "", match.group(2))
            counts[name] = counts.get(name, 0) + int(match.group(1).replace(",", ""))
    return counts


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    with tempfile.TemporaryDirectory() as tmp:
        base, loaded = Path(tmp) / "zero.out", Path(tmp) / "many.out"
        run(0, base)
        run(count, loaded)
        before, after = functions(base), functions(loaded)
    total = after.pop("PROGRAM TOTALS") - before.pop("PROGRAM TOTALS")
    print(f"{total / count:,.0f} instructions per exchange ({count} exchanges)")
    print("\nself cost per exchange, largest first:")
    deltas = sorted(
        ((after.get(k, 0) - before.get(k, 0)) / count, k) for k in after
    )
    for value, name in reversed(deltas[-25:]):
        print(f"{value:8,.0f}  {name[:110]}")


if __name__ == "__main__":
    main()
