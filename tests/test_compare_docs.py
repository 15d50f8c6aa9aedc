"""docs/compare.md's tables against the current defaults: a table whose configuration differs must say it is stale."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the library default of scale_rule lives in the torch binding's AdapterConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_compare_tables", ROOT / "docs" / "check_compare_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_stale_docs_table_says_so(checker):
    results = checker.check()
    assert results, "docs/assets/compare_tables.json lists no table"
    wrong = [(r["command"], r["diffs"]) for r in results if bool(r["diffs"]) != r["marked"]]
    assert not wrong, f"mark these sections of docs/compare.md '**Stale**' (or remove the mark): {wrong}"


def test_a_changed_default_flags_the_table(checker, tmp_path, monkeypatch):
    from tucker_peft.compare import MiniLMTask

    cmd = "tucker-peft compare --task minilm --kinds tucker,lora --lrs 1e-2"
    recorded = {k: v for k, v in checker.current_config(cmd).items() if k in checker.KEYS}
    manifest = tmp_path / "tables.json"
    manifest.write_text(json.dumps({"tables": [{"section": "A table", "command": cmd, "config": recorded}]}))
    page = tmp_path / "page.md"
    page.write_text("# Results\n\n## A table\n\n| a |\n\n## Next\n\n**Stale** (another section)\n")
    [r] = checker.check(manifest, page)
    assert r["diffs"] == [] and r["marked"] is False
    monkeypatch.setattr(MiniLMTask, "steps", 123)  # the task's default changes after the table was made
    [r] = checker.check(manifest, page)
    assert r["diffs"] == ["steps: 100 → 123"] and r["marked"] is False
    with pytest.raises(ValueError, match="no heading"):
        checker.section_text("# x\n", "A table")
