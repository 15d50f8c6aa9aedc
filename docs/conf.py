"""Sphinx configuration of the tucker_peft documentation site.

Build (strict, as CI does)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

API pages: one small ``docs/api/<module>.rst`` per module. The API index
picks them up by glob, so adding a module is adding its file. A module named
in ``OPTIONAL_MODULES`` is left out of the build (its page excluded, with an
info line) while it, or a third-party package it needs, cannot be imported;
any other import error fails the build.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from sphinx.util import logging

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # document the checkout, also without `pip install -e .`

import tucker_peft  # noqa: E402

logger = logging.getLogger("tucker_peft.docs")

# -- project -----------------------------------------------------------------
project = "tucker_peft"
author = "tucker_peft contributors"
copyright = "tucker_peft contributors"  # noqa: A001
release = tucker_peft.__version__
version = ".".join(release.split(".")[:2])

# -- extensions ----------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "assets/*.md",  # tables included by pages, not pages themselves
    "gpu/*",        # raw logs and JSON rows, linked as downloads
    "examples/*",
]
templates_path: list[str] = []

# -- API modules ---------------------------------------------------------------
#: Modules that may be missing (being written, or needing a framework that the
#: docs environment lacks). Every other ``docs/api/<module>.rst`` must import.
OPTIONAL_MODULES = {
    "tucker_peft.backends.torch",
    "tucker_peft.cli",
}


def _importable(modname: str) -> bool:
    """Whether an optional module can be documented; real bugs still raise."""
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        ours = missing == modname or modname.startswith(missing + ".")
        if ours or not missing.startswith("tucker_peft"):
            logger.info("docs: leaving %s out of the API reference (%s)", modname, exc)
            return False
        raise
    if getattr(mod, "__file__", None) is None:  # a folder without __init__.py yet
        logger.info("docs: leaving %s out of the API reference (no __init__.py)", modname)
        return False
    return True


API_MODULES = sorted(p.stem for p in (HERE / "api").glob("tucker_peft*.rst"))
for _mod in API_MODULES:
    if _mod in OPTIONAL_MODULES and not _importable(_mod):
        exclude_patterns.append(f"api/{_mod}.rst")

# -- autodoc / numpydoc ----------------------------------------------------------
autodoc_default_options = {
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "none"          # numpydoc's Parameters sections carry the types
autodoc_class_signature = "mixed"
autodoc_mock_imports = ["cupy", "cupyx"]  # never needed at import time; mocked to be safe
autosummary_generate = False
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_attributes_as_param_list = True

# -- MyST ------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# -- HTML --------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"tucker_peft {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "header_links_before_dropdown": 7,
    "secondary_sidebar_items": ["page-toc"],
}
html_sidebars = {"index": [], "getting_started": []}
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_copy_source = False
