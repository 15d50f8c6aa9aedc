"""The documentation site builds strictly, and its runnable examples run.

* The Sphinx build (``python -m sphinx -W --keep-going -b html docs <tmp>``)
  must finish without a single warning; it takes 5-15 s on 2 cores. Skipped
  when the ``docs`` extra (sphinx, numpydoc, pydata-sphinx-theme, myst-parser)
  is not installed.
* Every fenced ```` ```python ```` block of the Markdown pages under ``docs/``
  runs as written (pages in ``ILLUSTRATIVE`` excepted). Blocks that must not
  run, such as the PyTorch-binding how-tos, are written as
  ```` ```{code-block} python ```` with ``:class: not-executed``; they are
  only compiled.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_DEPS = ("sphinx", "numpydoc", "pydata_sphinx_theme", "myst_parser")
#: Pages whose ```python blocks are fragments (undefined names, a GPU), not programs.
ILLUSTRATIVE = {"training.md"}
BUILD_TIMEOUT_S = 300

RUNNABLE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NOT_EXECUTED = re.compile(r"^```\{code-block\} python\n((?::[^\n]*\n)*)\n?(.*?)^```", re.S | re.M)


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts and p.parent.name != "assets")


def _blocks(pattern: re.Pattern[str], group: int, skip: set[str] = frozenset()) -> list:
    out = []
    for page in _pages():
        rel = page.relative_to(DOCS).as_posix()
        if rel in skip:
            continue
        for i, m in enumerate(pattern.finditer(page.read_text(encoding="utf-8"))):
            out.append(pytest.param(page, m.group(group), id=f"{rel}:{i}"))
    return out


def _missing_doc_deps() -> list[str]:
    return [m for m in DOC_DEPS if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    missing = _missing_doc_deps()
    if missing:
        pytest.skip(f"docs build needs {', '.join(missing)}: pip install -e \".[docs]\"")
    out = tmp_path_factory.mktemp("docs_html")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    return proc, out


def test_docs_build_strict(built_site):
    proc, out = built_site
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"sphinx -W failed (exit {proc.returncode}):\n{log}"
    for page in ("index", "getting_started", "concepts", "howto/index", "api/index", "results"):
        assert (out / f"{page}.html").is_file(), f"{page}.html missing from the site"
    assert (out / "_images" / "concepts_budget.png").is_file()


def test_api_reference_covers_the_public_namespace(built_site):
    proc, out = built_site
    if proc.returncode != 0:
        pytest.skip("the build failed; see test_docs_build_strict")
    import types

    import tucker_peft

    html = (out / "api" / "tucker_peft.html").read_text(encoding="utf-8")
    ids = set(re.findall(r'id="(tucker_peft\.[\w.]+)"', html))
    public = [n for n in tucker_peft.__all__
              if n != "__version__" and not isinstance(getattr(tucker_peft, n), types.ModuleType)]
    missing = [n for n in public if f"tucker_peft.{n}" not in ids]
    assert not missing, f"docs/api/tucker_peft.rst does not document {missing}"


@pytest.mark.parametrize("page, code", _blocks(RUNNABLE, 1, ILLUSTRATIVE))
def test_docs_python_block_runs(page, code, tmp_path, monkeypatch):
    for mod in re.findall(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", code, re.M):
        if mod != "tucker_peft":
            pytest.importorskip(mod)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    exec(compile(code, str(page), "exec", dont_inherit=True), {"__name__": "__docs__"})  # not this file's __future__ flags


@pytest.mark.parametrize("page, code", _blocks(NOT_EXECUTED, 2))
def test_docs_not_executed_block_compiles(page, code):
    compile(code, str(page), "exec")
