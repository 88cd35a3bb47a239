"""Sphinx configuration of useroom's documentation.

Build with ``python3 -m sphinx -W -b html docs /tmp/docs-out``; the API
page imports the package, so install it first (``pip install -e .``).
"""

from __future__ import annotations

import os
import sys

# The package lives in src/; an editable install finds it too, but a plain
# checkout with the native core built in place should build the docs as well.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src")))

import useroom  # noqa: E402  (after the path is set)

project = "useroom"
author = "the useroom authors"
copyright = "the useroom authors"
release = useroom.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

html_theme = "alabaster"
html_title = "useroom"
