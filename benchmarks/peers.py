"""Every implementation behind one interface: ``log_prob(x) -> (log p(x), nfe)`` and
``sample(n) -> (x, nfe)``, all integrating a given field ``f(t, x)`` from data (t=0) to
base (t=T=1) and back."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import pyro_cnf
from common import Counted, FieldOnly, normal_log_prob
from ffjord_ref import RefCNF

#: (implementation, trace) pairs of W1; trace "exact" means the exact divergence,
#: by whatever means the implementation has.
IMPLS = ("pyro_cnf", "pyro_cnf_vjp", "pyro_cnf_tdq", "zuko", "torchdyn", "ffjord_ref")


@dataclass
class LogProb:
    """A ready-to-time log-density: ``fn(x)`` returns ``(log p(x), nfe)``."""

    impl: str
    trace: str
    fn: Callable[[Tensor], tuple[Tensor, int]]


def pyro_cnf_log_prob(field: nn.Module, trace: str, rtol: float, atol: float, vjp: bool = False,
                      name: str = "pyro_cnf", **kw) -> LogProb:
    # given tolerances apply to a differentiated solve too, as the peers' (no looser training solve)
    flow = pyro_cnf.ContinuousFlow(FieldOnly(field) if vjp else field, trace=trace, rtol=rtol, atol=atol, **kw)

    def fn(x: Tensor) -> tuple[Tensor, int]:
        z, ladj = flow(x)
        return normal_log_prob(z) + ladj, flow.nfe

    return LogProb(name, trace, fn)


def zuko_log_prob(field: nn.Module, trace: str, rtol: float, atol: float) -> LogProb:
    from zuko.transforms import FreeFormJacobianTransform

    counted = Counted(field)
    transform = FreeFormJacobianTransform(counted, 0.0, 1.0, phi=(), atol=atol, rtol=rtol, exact=trace == "exact")

    def fn(x: Tensor) -> tuple[Tensor, int]:
        counted.calls = 0
        z, ladj = transform.call_and_ladj(x)
        return normal_log_prob(z) + ladj, counted.calls

    return LogProb("zuko", trace, fn)


class TimeInjected(nn.Module):
    """torchdyn calls its CNF's net with ``x`` alone and sets ``.t`` on every submodule
    that has one; this feeds that ``t`` to ``f(t, x)``."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.t = torch.tensor(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.field(self.t, x)


def torchdyn_log_prob(field: nn.Module, trace: str, rtol: float, atol: float) -> LogProb:
    from torchdyn.core import NeuralODE
    from torchdyn.models.cnf import CNF, autograd_trace, hutch_trace

    d = field.input_dim
    if trace == "exact":
        cnf = CNF(TimeInjected(field), trace_estimator=autograd_trace)
    else:
        noise = torch.distributions.MultivariateNormal(torch.zeros(d), torch.eye(d))
        cnf = CNF(TimeInjected(field), trace_estimator=hutch_trace, noise_dist=noise)
    with contextlib.redirect_stdout(io.StringIO()):  # torchdyn prints a notice about wrapping
        node = NeuralODE(cnf, solver="dopri5", sensitivity="autograd", atol=atol, rtol=rtol, return_t_eval=False)
    t_span = torch.tensor([0.0, 1.0])

    def fn(x: Tensor) -> tuple[Tensor, int]:
        node.vf.nfe = 0
        sol = node(torch.cat([x.new_zeros(x.shape[0], 1), x], 1), t_span)[-1]
        # torchdyn integrates -tr J in column 0: log p(x) = log p(z) - that.
        return normal_log_prob(sol[:, 1:]) - sol[:, 0], int(node.vf.nfe)

    return LogProb("torchdyn", trace, fn)


def ffjord_ref_log_prob(field: nn.Module, trace: str, rtol: float, atol: float) -> LogProb:
    cnf = RefCNF(field, divergence=trace, rtol=rtol, atol=atol)

    def fn(x: Tensor) -> tuple[Tensor, int]:
        z, delta_logp = cnf(x)
        return normal_log_prob(z) - delta_logp, cnf.nfe

    return LogProb("ffjord_ref", trace, fn)


def make_log_prob(impl: str, field: nn.Module, trace: str, rtol: float, atol: float) -> LogProb:
    if impl == "pyro_cnf":
        return pyro_cnf_log_prob(field, trace, rtol, atol)
    if impl == "pyro_cnf_vjp":
        return pyro_cnf_log_prob(field, trace, rtol, atol, vjp=True, name=impl)
    if impl == "pyro_cnf_tdq":  # the same computation on torchdiffeq's dopri5: the solver's share
        return pyro_cnf_log_prob(field, trace, rtol, atol, backend="torchdiffeq", name=impl)
    if impl == "zuko":
        return zuko_log_prob(field, trace, rtol, atol)
    if impl == "torchdyn":
        return torchdyn_log_prob(field, trace, rtol, atol)
    if impl == "ffjord_ref":
        return ffjord_ref_log_prob(field, trace, rtol, atol)
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")
