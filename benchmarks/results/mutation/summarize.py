"""Per-module counts of a mutmut run (`make mutation`), read from mutants/**/*.py.meta.

Prints a Markdown table: tried, killed, survived, timeout, no tests, not checked, and the
score killed / (tried - not checked) per module, then the names of the survivors.
Run from the repository root after `mutmut run`.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {1, 3}
TIMEOUT = {36, -24, 24, 152, 255}
NO_TESTS = {5, 33}


def status(code: int | None) -> str:
    if code is None:
        return "not checked"
    if code in KILLED:
        return "killed"
    if code == 0:
        return "survived"
    if code in TIMEOUT:
        return "timeout"
    if code in NO_TESTS:
        return "no tests"
    return f"other ({code})"


def main(root: Path = Path("mutants")) -> int:
    metas = sorted(root.rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/: run `make mutation` first", file=sys.stderr)
        return 1
    cols = ["killed", "survived", "timeout", "no tests", "not checked"]
    print("| module | mutants | " + " | ".join(cols) + " | other | score |")
    print("|---|---:|" + "---:|" * (len(cols) + 2))
    total: Counter = Counter()
    survivors: list[str] = []
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        c = Counter(status(v) for v in codes.values())
        total.update(c)
        survivors += sorted(k for k, v in codes.items() if status(v) == "survived")
        print(row(str(meta.relative_to(root))[: -len(".meta")], len(codes), c, cols))
    print(row("**all**", sum(total.values()), total, cols))
    print("\nsurvivors:")
    for s in survivors:
        print(" ", s)
    return 0


def row(name: str, n: int, c: Counter, cols: list[str]) -> str:
    other = n - sum(c[k] for k in cols)
    tried = n - c["not checked"]
    score = f"{100 * (c['killed'] + c['timeout']) / tried:.1f}%" if tried else "-"
    return f"| {name} | {n} | " + " | ".join(str(c[k]) for k in cols) + f" | {other} | {score} |"


if __name__ == "__main__":
    sys.exit(main())
