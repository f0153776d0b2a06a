"""Continuous normalizing flows for Pyro and nflows.

The core (:class:`ContinuousFlow`, :class:`ODENet`, :func:`flow_matching_loss`) needs only
torch. The adapters load their library on first use: :class:`CNF`, :class:`ConditionalCNF`,
:class:`ConditionedCNF`, :func:`cnf` and :func:`conditional_cnf` from :mod:`pyro_cnf.pyro`
(Pyro), :class:`CNFTransform` and :class:`CNFFlow` from :mod:`pyro_cnf.nflows` (nflows). Training lives in
:mod:`pyro_cnf.training`, the toy densities and the demo in :mod:`pyro_cnf.toy`.
"""

from __future__ import annotations

import importlib
from typing import Any

from .flow import AUTO_EXACT_MAX_DIM, ContinuousFlow, FlowStats, SolverError, default_flow
from .flow_matching import flow_matching_loss
from .nets import ACTIVATIONS, ODENet

#: Names resolved on first access, so that ``import pyro_cnf`` imports neither Pyro nor nflows.
_ADAPTERS = {
    "CNF": "pyro",
    "ConditionalCNF": "pyro",
    "ConditionedCNF": "pyro",
    "cnf": "pyro",
    "conditional_cnf": "pyro",
    "CNFTransform": "nflows",
    "CNFFlow": "nflows",
}

__all__ = [
    "ACTIVATIONS",
    "AUTO_EXACT_MAX_DIM",
    "ContinuousFlow",
    "FlowStats",
    "ODENet",
    "SolverError",
    "default_flow",
    "flow_matching_loss",
    *_ADAPTERS,
]


def __getattr__(name: str) -> Any:
    if name in _ADAPTERS:
        value = getattr(importlib.import_module(f".{_ADAPTERS[name]}", __name__), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ADAPTERS))
