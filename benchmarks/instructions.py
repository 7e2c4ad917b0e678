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


def run(count: int, out: Path, env: dict | None = None) -> None:
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
        env=env,
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


GROUPS = (
    ("llhttp", "llhttp, httptools' C parser"),
    ("/httptools/", "httptools' Cython glue (calls into Python callbacks)"),
    ("dynapm/_fast/heads", "DynaPM heads.pyx (head scanning in C)"),
    ("dynapm/_fast/proxy", "DynaPM proxy.pyx (the Cython hot path)"),
    ("_PyEval_EvalFrameDefault", "CPython bytecode (mostly the fake transports)"),
    ("Python-3", "CPython runtime: calls, objects, memory"),
    ("libpython", "CPython runtime: calls, objects, memory"),
    ("sysdeps", "libc: memcpy, memchr"),
    ("malloc", "libc: malloc"),
)


def group_of(name: str) -> str:
    for needle, group in GROUPS:
        if needle in name:
            return group
    return "other"


def measure(count: int = 3000, env: dict | None = None) -> dict:
    """Callgrind instructions per exchange: total, by group, top functions."""
    with tempfile.TemporaryDirectory() as tmp:
        base, loaded = Path(tmp) / "zero.out", Path(tmp) / "many.out"
        run(0, base, env)
        run(count, loaded, env)
        before, after = functions(base), functions(loaded)
    total = after.pop("PROGRAM TOTALS") - before.pop("PROGRAM TOTALS")
    per = {k: (after.get(k, 0) - before.get(k, 0)) / count for k in after}
    groups: dict[str, float] = {}
    for name, value in per.items():
        groups[group_of(name)] = groups.get(group_of(name), 0) + value
    top = sorted(per.items(), key=lambda pair: pair[1], reverse=True)[:15]
    return {
        "exchanges": count,
        "total": total / count,
        "groups": sorted(groups.items(), key=lambda pair: pair[1], reverse=True),
        "top": [(re.sub(r"^.*/(Python-3[^/]*|src|parser)/", "", k), v) for k, v in top],
    }


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    found = measure(count)
    print(f"{found['total']:,.0f} instructions per exchange ({count} exchanges)")
    print("\nby component:")
    for name, value in found["groups"]:
        print(f"{value:8,.0f}  {name}")
    print("\nself cost per exchange, largest first:")
    for name, value in found["top"]:
        print(f"{value:8,.0f}  {name[:110]}")


if __name__ == "__main__":
    main()
