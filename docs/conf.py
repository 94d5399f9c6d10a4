"""Sphinx configuration of globular's documentation (``scripts/docs`` builds it, offline)."""

from __future__ import annotations

project = "globular"
author = "the globular developers"
copyright = "2026, the globular developers"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx_click"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "examples"]
myst_heading_anchors = 3  # `page.md#a-heading` links
myst_enable_extensions = ["colon_fence"]
suppress_warnings = ["myst.header"]  # pages carved from one document keep their heading levels

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}

html_theme = "pydata_sphinx_theme"
html_title = "globular"
html_static_path = ["_static"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": [],
}

linkcheck_ignore = [r"https?://.*"]  # offline: links inside the site only
