"""Continuous normalizing flows for Pyro and nflows.

The core (:class:`ContinuousFlow`, :class:`ODENet`) imports neither; :class:`CNF`,
:class:`ConditionalCNF` and the factories adapt it to Pyro, :class:`CNFTransform` to nflows.
"""

from .flow import AUTO_EXACT_MAX_DIM, ContinuousFlow, SolverError, default_flow
from .flow_matching import flow_matching_loss
from .nets import ACTIVATIONS, ODENet
from .nflows_transform import CNFFlow, CNFTransform
from .pyro_transforms import CNF, ConditionalCNF, ConditionedCNF, cnf, conditional_cnf

__all__ = [
    "ACTIVATIONS",
    "AUTO_EXACT_MAX_DIM",
    "CNF",
    "CNFFlow",
    "CNFTransform",
    "ConditionalCNF",
    "ConditionedCNF",
    "ContinuousFlow",
    "ODENet",
    "SolverError",
    "cnf",
    "conditional_cnf",
    "default_flow",
    "flow_matching_loss",
]
