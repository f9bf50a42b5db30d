"""Sphinx configuration for trio_evlisten's documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Document the package from this checkout even if it is not installed.
sys.path.insert(0, str(HERE.parent))

project = "trio_evlisten"
author = "the trio_evlisten authors"
copyright = "2025, the trio_evlisten authors"
try:
    release = importlib.metadata.version("trio_evlisten")
except importlib.metadata.PackageNotFoundError:  # not installed: read the source
    from trio_evlisten import __version__ as release
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinxcontrib_trio",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_inv", "snippets", "Thumbs.db", ".DS_Store"]

# Literal blocks ("::") are shell sessions and output, not Python: every
# Python block in these pages is a file in snippets/ that tests/test_docs.py
# runs, included with literalinclude (which highlights it as Python).
highlight_language = "none"

# Every cross-reference must resolve, so a broken link to trio or the stdlib
# fails the build (-W) instead of silently rendering as plain text.
nitpicky = True
nitpick_ignore = [
    # Names that exist only under TYPE_CHECKING in the package, shown in
    # signatures as the package spells them; the prose documents them.
    ("py:class", "AcceptCallback"),
    ("py:class", "ErrorCallback"),
    ("py:class", "Address"),
    ("py:class", "SockArg"),
    ("py:class", "HandlerErrors"),
    ("py:class", "StdSocket"),
    ("py:class", "Network"),  # ipaddress.IPv4Network | IPv6Network
    ("py:class", "StreamClass"),  # type[SocketStream] | type[trio.SocketStream]
    ("py:class", "Buffer"),  # collections.abc.Buffer (typing_extensions on 3.11)
    # Python's docs list it as asyncio.BaseProtocol; autodoc names the
    # module that defines it, which the inventory does not have.
    ("py:class", "asyncio.protocols.BaseProtocol"),
]

# --- intersphinx, offline --------------------------------------------------
# No network at build time (CI reaches only the package registries), so each
# inventory is a committed file, made by docs/_inv/regenerate.sh:
#   _inv/python.inv: the Python 3.11 docs' objects.inv, from Debian's
#       python3-doc package (/usr/share/doc/python3.11/html/objects.inv);
#   _inv/trio.inv: objects.inv of trio 0.35.0's docs, built by Sphinx from
#       the docs/source tree in trio's sdist on PyPI.
# The URLs are where those same docs are published, so links are real.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3.11", str(HERE / "_inv" / "python.inv")),
    "trio": ("https://trio.readthedocs.io/en/v0.35.0", str(HERE / "_inv" / "trio.inv")),
}
intersphinx_timeout = 1

# --- autodoc / napoleon ----------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# The house style's extra docstring sections, rendered as headed prose.
napoleon_custom_sections = ["Error handling", "Resource handling"]

myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"trio_evlisten {release}"
