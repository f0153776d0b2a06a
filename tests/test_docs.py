"""The API reference builds from the docstrings with warnings as errors (``sphinx -W``):
a broken reference, a malformed docstring or a module missing from ``docs/api.rst`` fails."""

import pathlib
import subprocess
import sys

import pyro_cnf

ROOT = pathlib.Path(__file__).parents[1]


def test_sphinx_builds_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_module_is_in_the_reference():
    documented = (ROOT / "docs" / "api.rst").read_text()
    package = pathlib.Path(pyro_cnf.__file__).parent
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name in ("pyro_cnf", "pyro_cnf.demo", "pyro_cnf.toy"):  # the index, the entry point, a namespace
            continue
        assert f".. automodule:: {name}\n" in documented, f"{name} is missing from docs/api.rst"
