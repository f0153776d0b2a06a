"""Sphinx configuration: the API reference, built from the docstrings.

    python -m sphinx -W -b html docs out/docs
"""

project = "pyro_cnf"
author = "the pyro_cnf developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
# Each name documented where it is defined: a module's imports (re-exports) are skipped.
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Pyro and nflows base classes document themselves elsewhere; their inherited members would
# add hundreds of entries (and their own docstrings' warnings) to this reference.
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not a second description of each attribute
napoleon_custom_sections = [("Arguments", "params_style"), ("Shapes", "notes_style")]
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
