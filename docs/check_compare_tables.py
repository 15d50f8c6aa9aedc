"""Flag the tables of docs/compare.md whose recorded configuration differs from what their command runs today.

Every table is listed in ``docs/assets/compare_tables.json`` with the command
it names and the configuration it was run with. For each, this script
resolves the configuration the command has now
(:func:`tucker_peft.cli._compare.effective_config`: task defaults, library
defaults such as ``scale_rule``) and lists the differences. A stale table
must say so: its section in docs/compare.md carries a ``**Stale**`` line.

    python docs/check_compare_tables.py       # exit 1 if a stale table is not marked (or a current one is)
    python docs/check_compare_tables.py --record 'COMMAND' assets/X_results.json   # after rerunning a table

``tests/test_compare_docs.py`` runs the same check.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
MANIFEST = DOCS / "assets" / "compare_tables.json"
PAGE = DOCS / "compare.md"
#: The settings that change a table's numbers (threads, output folder and the like do not).
KEYS = ("task", "kinds", "steps", "batch_size", "seeds", "budgets", "alpha", "scale_rule", "lrs", "data", "stack",
        "reference")
STALE_MARK = "**Stale**"


def current_config(command: str) -> dict[str, Any]:
    """The configuration ``command`` (``tucker-peft compare ...``) resolves to today."""
    from tucker_peft.cli._compare import effective_config

    argv = shlex.split(command)
    if argv[:2] != ["tucker-peft", "compare"]:
        raise ValueError(f"expected a command starting with 'tucker-peft compare', got {command!r}")
    return effective_config(argv[2:])


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``'key: recorded → current'`` for every setting in :data:`KEYS` that differs."""
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731  (tuples vs lists)
    return [f"{k}: {recorded.get(k)!r} → {current.get(k)!r}" for k in KEYS
            if norm(recorded.get(k)) != norm(current.get(k))]


def section_text(page: str, heading: str) -> str:
    """The text under the Markdown heading ``heading`` up to the next heading of the same or a higher level."""
    m = re.search(r"^(#+) " + re.escape(heading) + r"\s*$", page, re.M)
    if not m:
        raise ValueError(f"docs/compare.md has no heading {heading!r}")
    level = len(m.group(1))
    nxt = re.compile(r"^#{1,%d} " % level, re.M).search(page, m.end())
    return page[m.end(): nxt.start() if nxt else len(page)]


def check(manifest: Path = MANIFEST, page: Path = PAGE) -> list[dict[str, Any]]:
    """One dict per table: section, command, ``diffs`` (empty: current), ``marked`` (the section says stale)."""
    tables = json.loads(manifest.read_text(encoding="utf-8"))["tables"]
    text = page.read_text(encoding="utf-8")
    out = []
    for t in tables:
        diffs = differences(t["config"], current_config(t["command"]))
        out.append({"section": t["section"], "command": t["command"], "diffs": diffs,
                    "marked": STALE_MARK in section_text(text, t["section"])})
    return out


def record(command: str, results: str, manifest: Path = MANIFEST) -> None:
    """Store the configuration of ``results`` (a results.json, relative to docs/) for the table of ``command``."""
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    entry = next((t for t in doc["tables"] if t["command"] == command), None)
    if entry is None:
        raise SystemExit(f"no table with the command {command!r} in {manifest}")
    cfg = json.loads((DOCS / results).read_text(encoding="utf-8"))["config"]
    entry["config"] = {k: cfg.get(k) for k in KEYS}
    entry["results"] = Path(results).name
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(manifest)


def main() -> int:
    if sys.argv[1:2] == ["--record"] and len(sys.argv) == 4:
        record(sys.argv[2], sys.argv[3])
        return 0
    bad = 0
    for r in check():
        state = "STALE" if r["diffs"] else "current"
        print(f"{state:7}  {r['command']}  [{r['section']}]")
        for d in r["diffs"]:
            print(f"         {d}")
        if bool(r["diffs"]) != r["marked"]:
            bad += 1
            print("         ^ the section " + ("does not say" if r["diffs"] else "says") + f" {STALE_MARK}; fix docs/compare.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
