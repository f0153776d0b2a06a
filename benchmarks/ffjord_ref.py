"""An FFJORD-reference-style CNF, written for these benchmarks.

It follows the structure of the FFJORD reference implementation (Grathwohl et al., 2019;
rtqichen/ffjord, ``lib/layers/odefunc.py`` and ``cnf.py``) without copying it: the
augmented state ``(x, delta_logp)`` goes to ``torchdiffeq.odeint``; the exact divergence is a
Python loop of ``d`` autograd calls (one per output coordinate), the Hutchinson estimate
one vector-Jacobian product with noise drawn once per solve; ``d delta_logp / dt = -div``,
so that ``log p(x) = log p_base(z) - delta_logp(T)``.

One deliberate departure, in the peer's favour: the reference always builds the double
graph (``create_graph=True``); here it is built only when gradients are enabled, so
evaluation under ``no_grad`` is cheaper than in the original.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchdiffeq import odeint


def brute_force_divergence(f: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    """Tr(df/dx) from ``d`` autograd calls, one row of the Jacobian's diagonal each."""
    div = torch.zeros_like(f[:, 0])
    for i in range(x.shape[1]):
        (row,) = torch.autograd.grad(f[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
        div = div + row[:, i]
    return div


def hutchinson_divergence(f: Tensor, x: Tensor, e: Tensor, create_graph: bool) -> Tensor:
    (e_jac,) = torch.autograd.grad(f, x, e, create_graph=create_graph)
    return (e_jac * e).sum(-1)


class RefODEFunc(nn.Module):
    """Augmented dynamics ``(x, delta_logp) -> (f, -div)`` with a counter of evaluations."""

    def __init__(self, field: nn.Module, divergence: str = "exact", noise: str = "gaussian") -> None:
        super().__init__()
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
        self.field = field
        self.divergence = divergence
        self.noise = noise
        self.nfe = 0
        self._e: Tensor | None = None

    def before_odeint(self) -> None:
        self.nfe = 0
        self._e = None

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        self.nfe += 1
        x = state[0]
        create_graph = torch.is_grad_enabled()
        if self.divergence == "hutchinson" and self._e is None:  # fixed for the whole solve
            self._e = torch.randn_like(x) if self.noise == "gaussian" else torch.randint_like(x, 0, 2) * 2 - 1
        with torch.enable_grad():
            if not (create_graph and x.requires_grad):
                x = x.detach().requires_grad_()
            f = self.field(t, x)
            if self.divergence == "exact":
                div = brute_force_divergence(f, x, create_graph)
            else:
                div = hutchinson_divergence(f, x, self._e, create_graph)
        return f, -div


class RefCNF(nn.Module):
    """``forward(x) -> (z, delta_logp)``, data at 0 to base at ``T``."""

    def __init__(self, field: nn.Module, divergence: str = "exact", T: float = 1.0,
                 method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                 options: dict | None = None) -> None:
        super().__init__()
        self.odefunc = RefODEFunc(field, divergence)
        self.T, self.method, self.rtol, self.atol = T, method, rtol, atol
        self.options = options

    @property
    def nfe(self) -> int:
        return self.odefunc.nfe

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.odefunc.before_odeint()
        t = torch.tensor([0.0, self.T], dtype=x.dtype)
        z, delta_logp = odeint(self.odefunc, (x, x.new_zeros(x.shape[0])), t, rtol=self.rtol,
                               atol=self.atol, method=self.method, options=self.options)
        return z[-1], delta_logp[-1]
