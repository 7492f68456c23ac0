"""Sphinx configuration for kernelattn.

Build (offline): ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
Intersphinx is opt-in (``KERNELATTN_DOCS_ONLINE=1``) because a failed
inventory fetch is a warning that ``-W`` turns into an error.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import kernelattn

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))  # for _ext

project = "kernelattn"
author = "kernelattn developers"
copyright = "2026, kernelattn developers"
release = version = kernelattn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # serves MathJax from the build, so formulas render offline
    "sphinx.ext.intersphinx",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "matplotlib.sphinxext.plot_directive",
    "_ext.support_matrix",
]

exclude_patterns = ["_build", "examples", "**.ipynb_checkpoints"]
templates_path = []
html_static_path = ["_static"]
html_css_files = ["kernelattn.css"]
html_js_files = ["kernelattn.js"]
html_theme = "pydata_sphinx_theme"
html_title = f"kernelattn {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
}
html_show_sourcelink = False
# Top-level pages without sub-pages would show an empty "Section Navigation" column.
html_sidebars = {page: [] for page in ("install", "benchmarks", "dev/*", "genindex", "search",
                                       "sg_execution_times", "auto_examples/sg_execution_times")}

autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]
plot_include_source = False

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"/(train_|_)",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
}

intersphinx_mapping = {}
if os.environ.get("KERNELATTN_DOCS_ONLINE") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "torch": ("https://pytorch.org/docs/stable", None),
        "jax": ("https://docs.jax.dev/en/latest", None),
    }
