"""One contract, both adapters: every check runs against the Pyro and the nflows adapter,
unconditional and conditional (in the spirit of Pyro's ``TransformTests`` and nflows'
``TransformTest``).

An adapter is described by how it maps data to base and back, and by its library's own
distribution (log_prob and sample); the checks below are written once against that."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro.distributions as dist
import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from torch import nn

from pyro_cnf import CNF, CNFTransform, ConditionalCNF, ContinuousFlow, ODENet

D, C = 2, 3
TIGHT = dict(rtol=1e-10, atol=1e-10, train_rtol=None, train_atol=None)  # as accurate in training


def base(dtype=torch.float64):
    return dist.Normal(torch.zeros(D, dtype=dtype), torch.ones(D, dtype=dtype)).to_event(1)


@dataclass
class Adapter:
    """How a test reaches an adapter: ``to_base(t, x, c) -> (z, log|det dz/dx|)``,
    ``to_data(t, z, c) -> (x, log|det dx/dz|)``, and its library's distribution."""

    name: str
    conditional: bool
    make: Callable[[ContinuousFlow], object]
    to_base: Callable
    to_data: Callable
    log_prob: Callable
    sample: Callable  # (t, n, c) -> (samples, the base draw they came from)


def _pyro_sample(t, n, c):
    """``n`` samples (per context row) through Pyro's distribution, the base draw they came
    from and the context row of each, all as rows."""
    d = dist.TransformedDistribution(base(torch.float32), [t]) if c is None else \
        dist.ConditionalTransformedDistribution(base(torch.float32), [t]).condition(c)
    shape = (n,) if c is None else (n, c.shape[0])  # one draw per context row
    state = torch.get_rng_state()
    x = d.sample(shape)
    torch.set_rng_state(state)
    z = base(torch.float32).sample(shape)
    rows = None if c is None else c.expand(n, *c.shape).reshape(-1, C)
    return x.reshape(-1, D), z.reshape(-1, D), rows


def _nflows_sample(t, n, c):
    """The same through nflows' ``Flow.sample``: its noise is one randn of all rows, and
    each context row is repeated for its ``n`` samples."""
    flow = Flow(t, StandardNormal([D]))
    state = torch.get_rng_state()
    x = flow.sample(n, context=c)
    torch.set_rng_state(state)
    k = 1 if c is None else c.shape[0]
    z = torch.randn(k * n, D)
    return x.reshape(-1, D), z, None if c is None else c.repeat_interleave(n, 0)


def _pyro_inverse(transform, x):
    z = transform.inv(x)
    return z, -transform.log_abs_det_jacobian(z, x)


def _pyro_forward(transform, z):
    x = transform(z)
    return x, transform.log_abs_det_jacobian(z, x)


ADAPTERS = [
    Adapter(
        "pyro", False, lambda flow: CNF(D, flow=flow),
        to_base=lambda t, x, c: _pyro_inverse(t, x),
        to_data=lambda t, z, c: _pyro_forward(t, z),
        log_prob=lambda t, x, c: dist.TransformedDistribution(base(x.dtype), [t]).log_prob(x),
        sample=_pyro_sample,
    ),
    Adapter(
        "pyro_conditional", True, lambda flow: ConditionalCNF(D, C, flow=flow),
        to_base=lambda t, x, c: _pyro_inverse(t.condition(c), x),
        to_data=lambda t, z, c: _pyro_forward(t.condition(c), z),
        log_prob=lambda t, x, c: dist.ConditionalTransformedDistribution(base(x.dtype), [t]).condition(c).log_prob(x),
        sample=_pyro_sample,
    ),
    Adapter(
        "nflows", False, lambda flow: CNFTransform(D, flow=flow),
        to_base=lambda t, x, c: t(x),
        to_data=lambda t, z, c: t.inverse(z),
        log_prob=lambda t, x, c: Flow(t, StandardNormal([D])).log_prob(x),
        sample=_nflows_sample,
    ),
    Adapter(
        "nflows_conditional", True, lambda flow: CNFTransform(D, context_dim=C, flow=flow),
        to_base=lambda t, x, c: t(x, c),
        to_data=lambda t, z, c: t.inverse(z, c),
        log_prob=lambda t, x, c: Flow(t, StandardNormal([D])).log_prob(x, context=c),
        sample=_nflows_sample,
    ),
]


def field(adapter: Adapter, seed: int = 0) -> ODENet:
    torch.manual_seed(seed)
    return ODENet(D, (16, 16), context_dim=C if adapter.conditional else 0, zero_init=False).double()


def context(adapter: Adapter, n: int = 4):
    # nflows takes one context row per input row; Pyro's condition() broadcasts them alike
    return torch.randn(n, C, dtype=torch.float64) if adapter.conditional else None


class LinearWithContext(nn.Module):
    """f = A x, ignoring the context: the map is expm(A T) and log|det| = T tr A."""

    def __init__(self, A: torch.Tensor, context_dim: int):
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.input_dim, self.context_dim = A.shape[0], context_dim

    def forward(self, t, x, *context):
        return x @ self.A.t()


pytestmark = pytest.mark.parametrize("adapter", ADAPTERS, ids=[a.name for a in ADAPTERS])


def test_conventions_on_a_linear_field(adapter):
    # data -> base is the solve from 0 to T: z = expm(A T) x, log|det dz/dx| = T tr A
    A = 0.5 * torch.randn(D, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    T = 0.7
    flow = ContinuousFlow(LinearWithContext(A, C if adapter.conditional else 0), T=T, trace="exact", **TIGHT)
    t, x, c = adapter.make(flow), torch.randn(4, D, dtype=torch.float64), context(adapter)
    z, ladj = adapter.to_base(t, x, c)
    torch.testing.assert_close(z, x @ torch.linalg.matrix_exp(A * T).t())
    torch.testing.assert_close(ladj, (T * torch.trace(A)).expand(4))
    x2, ladj2 = adapter.to_data(t, z, c)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ladj2, -ladj)


def test_log_det_is_the_log_det_of_the_autograd_jacobian(adapter):
    t = adapter.make(ContinuousFlow(field(adapter), **TIGHT))
    x, c = torch.randn(3, D, dtype=torch.float64), context(adapter, 3)
    for to, point in ((adapter.to_base, x), (adapter.to_data, x)):
        _, ladj = to(t, point, c)
        for i in range(3):
            ci = None if c is None else c[i : i + 1]
            jac = torch.autograd.functional.jacobian(lambda v: to(t, v[None], ci)[0][0], point[i])
            torch.testing.assert_close(ladj[i], torch.linalg.slogdet(jac)[1], rtol=1e-7, atol=1e-7)


def test_inverse_undoes_forward(adapter):
    t = adapter.make(ContinuousFlow(field(adapter), **TIGHT))
    x, c = 2 * torch.randn(5, D, dtype=torch.float64), context(adapter, 5)
    z, ladj = adapter.to_base(t, x, c)
    x2, ladj2 = adapter.to_data(t, z, c)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ladj2, -ladj)
    assert not torch.allclose(z, x)  # a non-trivial map


def test_log_prob_is_base_log_prob_plus_log_det(adapter):
    t = adapter.make(ContinuousFlow(field(adapter), **TIGHT))
    x, c = torch.randn(5, D, dtype=torch.float64), context(adapter, 5)
    z, ladj = adapter.to_base(t, x, c)
    torch.testing.assert_close(adapter.log_prob(t, x, c), base().log_prob(z) + ladj)


def test_sampling_maps_the_base_draw_to_data(adapter):
    t = adapter.make(ContinuousFlow(field(adapter).float(), **TIGHT))
    c = None if not adapter.conditional else torch.randn(2, C)
    with torch.no_grad():
        samples, noise, rows = adapter.sample(t, 3, c)
        expected, _ = adapter.to_data(t, noise, rows)
    torch.testing.assert_close(samples, expected)
    assert not torch.allclose(samples, noise)


def test_gradients_reach_every_parameter(adapter):
    t = adapter.make(ContinuousFlow(field(adapter).float()))
    x = torch.randn(6, D)
    c = None if not adapter.conditional else torch.randn(6, C, requires_grad=True)
    adapter.log_prob(t, x, c).sum().backward()
    for p in t.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    if c is not None:
        assert c.grad is not None and c.grad.abs().sum() > 0


def test_state_dict_round_trip(adapter):
    t = adapter.make(ContinuousFlow(field(adapter, seed=1)))
    fresh = adapter.make(ContinuousFlow(field(adapter, seed=2)))
    x, c = torch.randn(4, D, dtype=torch.float64), context(adapter)
    assert not torch.allclose(adapter.log_prob(fresh, x, c), adapter.log_prob(t, x, c))
    fresh.load_state_dict(t.state_dict())
    torch.testing.assert_close(adapter.log_prob(fresh, x, c), adapter.log_prob(t, x, c))


def test_context_matters_and_is_required(adapter):
    t = adapter.make(ContinuousFlow(field(adapter)))
    x = torch.randn(4, D, dtype=torch.float64)
    if not adapter.conditional:
        if adapter.name == "nflows":  # Pyro's unconditional transforms take no context at all
            with pytest.raises(ValueError, match="not conditional"):
                t(x, torch.randn(4, C, dtype=torch.float64))
        return
    c = context(adapter)
    assert not torch.allclose(adapter.log_prob(t, x, c), adapter.log_prob(t, x, c + 1))
    with pytest.raises(ValueError, match="conditional: pass context"):
        adapter.to_base(t, x, None)
