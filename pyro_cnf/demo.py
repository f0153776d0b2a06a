"""``python -m pyro_cnf.demo``: the 2-D toy demo's command line; the code is :mod:`pyro_cnf.toy.demo`."""

import sys

from .toy.demo import build_parser, main, run

__all__ = ["build_parser", "main", "run"]

if __name__ == "__main__":
    sys.exit(run())
