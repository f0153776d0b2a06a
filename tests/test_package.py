"""The package as a whole: light to import, clean to compile."""

import os
import pathlib
import subprocess
import sys
import warnings

import pytest

import pyro_cnf

SOURCES = sorted(pathlib.Path(pyro_cnf.__file__).parent.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_sources_compile_without_warnings(path):
    # A non-raw docstring with "\\m" compiles with a SyntaxWarning (an error in a future
    # Python) and renders "\\t" as a tab: compiled here from source, not from a cached .pyc.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(path.read_text(), str(path), "exec")


def test_import_is_light_and_adapters_load_on_first_use():
    code = (
        "import sys, pyro_cnf\n"
        "print([m for m in ('pyro', 'nflows', 'torchdiffeq', 'scipy', 'matplotlib') if m in sys.modules])\n"
        "pyro_cnf.CNF(2)\n"
        "print('pyro' in sys.modules, 'nflows' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "True False"


def test_public_names():
    for name in pyro_cnf.__all__:
        assert getattr(pyro_cnf, name) is not None
    assert set(pyro_cnf.__all__) <= set(dir(pyro_cnf))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pyro_cnf.Nope  # noqa: B018


def test_benchmark_and_example_scripts_import():
    # The scripts are not imported by any other test; a module moved in the package must not
    # leave one of them broken (benchmarks/clients_sampling.py once was).
    root = pathlib.Path(__file__).parents[1]
    scripts = sorted(p for folder in ("benchmarks", "examples") for p in (root / folder).glob("*.py"))
    code = (
        "import importlib.util, pathlib, sys\n"
        "for path in map(pathlib.Path, sys.argv[1:]):\n"
        "    sys.path[:0] = [str(path.parent)]\n"
        "    spec = importlib.util.spec_from_file_location(path.stem, path)\n"
        "    module = sys.modules[path.stem] = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *map(str, scripts)], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_benchmark_runs_end_to_end(tmp_path):
    # importing is not enough: benchmarks/clients_sampling.py once imported fine and then
    # failed on a renamed result of benchmarks/trainers.py (a smoke run, tiny budgets)
    root = pathlib.Path(__file__).parents[1]
    command = [sys.executable, str(root / "benchmarks" / "clients_sampling.py"), "--budget", "0.3", "--samples", "32",
               "--repeats", "1", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=root, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nflows CNFFlow.sample" in (tmp_path / "report.md").read_text()
