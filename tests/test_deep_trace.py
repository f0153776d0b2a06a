"""ODENet's exact trace at every depth, both deep contractions, and the cost model behind
``trace="auto"``. Exactness is checked in float64 to 1e-10 against
``torch.autograd.functional.jacobian``; no test here reads a clock."""

import itertools

import pytest
import torch

from pyro_cnf import ACTIVATIONS, ContinuousFlow, ODENet
from pyro_cnf.trace import cheapest_exact

from .fields import ClosedLinearField, NoDivergence, random_matrix

#: Hidden widths of depth 0..5, all different so that a transposed weight cannot pass.
HIDDEN = [(), (7,), (6, 5), (5, 4, 6), (4, 3, 5, 2), (3, 5, 4, 6, 2)]
#: The contractions of 3+ hidden layers; shallower nets have one closed form.
DEEP_METHODS = ("tangents", "cyclic")


def cases():
    for hidden, d, context_dim in itertools.product(HIDDEN, (1, 2, 3, 8), (0, 2)):
        for method in DEEP_METHODS if len(hidden) >= 3 else ("closed",):
            name = f"{len(hidden)}x-d{d}-c{context_dim}-{method}"
            yield pytest.param(hidden, d, context_dim, method, id=name)


def make(hidden, d, context_dim, method, activation="softplus", n=5, seed=0):
    """A float64 net with ``method`` forced for 3+ hidden layers, and inputs. No scale rate:
    these are the contractions of the net's own Jacobian (the scale rate's term is checked
    in test_nets.py)."""
    torch.manual_seed(seed + 10 * len(hidden) + d)
    net = ODENet(d, hidden, context_dim, activation=activation, zero_init=False, scale_rate=0.0).double()
    with torch.no_grad():  # non-trivial time gates and shifts, so that folding them matters
        net.time_gate.normal_()
        net.time_gate_bias.normal_()
        net.time_shift.normal_()
    if method != "closed":
        net._deep_method = lambda grad: method  # instance attribute: shadows the cost model
    x = torch.randn(n, d, dtype=torch.float64)
    ctx = (torch.randn(n, context_dim, dtype=torch.float64),) if context_dim else ()
    return net, torch.tensor(0.37, dtype=torch.float64), x, ctx


def reference_trace(net, t, x, ctx, create_graph=False):
    jac = torch.autograd.functional.jacobian(lambda y: net(t, y, *ctx).sum(0), x, create_graph=create_graph)
    return torch.diagonal(jac, dim1=0, dim2=2).sum(-1)  # jac: (d, N, d)


def assert_exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hidden,d,context_dim,method", list(cases()))
def test_divergence_equals_autograd(hidden, d, context_dim, method):
    net, t, x, ctx = make(hidden, d, context_dim, method)
    expected = reference_trace(net, t, x, ctx)
    with torch.no_grad():  # the in-place path (nothing to differentiate)
        f, div = net.divergence(t, x, *ctx)
    assert_exact(f, net(t, x, *ctx))
    assert_exact(div, expected)
    f, div = net.divergence(t, x.clone().requires_grad_(), *ctx)  # the differentiable path
    assert div.requires_grad
    assert_exact(div.detach(), expected)


@pytest.mark.parametrize("hidden,d,context_dim,method", list(cases()))
def test_divergence_jvp_equals_autograd(hidden, d, context_dim, method):
    net, t, x, ctx = make(hidden, d, context_dim, method)
    v = torch.randn_like(x)
    with torch.no_grad():
        f, div, jv = net.divergence_jvp(t, x, v, *ctx)
    _, expected_jv = torch.func.jvp(lambda y: net(t, y, *ctx), (x,), (v,))
    assert_exact(f, net(t, x, *ctx))
    assert_exact(div, reference_trace(net, t, x, ctx))
    assert_exact(jv, expected_jv)


@pytest.mark.parametrize("method", DEEP_METHODS)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation(method, activation):
    net, t, x, ctx = make((4, 3, 5, 2), 3, 2, method, activation=activation)
    assert_exact(net.divergence(t, x, *ctx)[1], reference_trace(net, t, x, ctx))


@pytest.mark.parametrize(
    "hidden,d,context_dim,method",
    [pytest.param(h, d, c, m, id=f"{len(h)}x-d{d}-c{c}-{m}")
     for h, d, c in [((6, 5), 3, 0), ((5, 4, 6), 2, 0), ((5, 4, 6), 3, 2), ((4, 3, 5, 2), 3, 0),
                     ((3, 5, 4, 6, 2), 8, 2)]
     for m in (DEEP_METHODS if len(h) >= 3 else ("closed",))],
)
def test_gradient_of_the_trace_equals_autograd(hidden, d, context_dim, method):
    """Training differentiates the trace: its gradient w.r.t. every parameter, ``x`` and the
    context equals the gradient of the autograd reference (double backward)."""
    net, t, x, ctx = make(hidden, d, context_dim, method)
    weights = torch.randn(x.shape[0], dtype=torch.float64)
    inputs = [x.requires_grad_(), *(c.requires_grad_() for c in ctx)]
    wrt = [*net.parameters(), *inputs]

    f, div = net.divergence(t, x, *ctx)
    got = torch.autograd.grad((div * weights).sum() + f.pow(2).sum(), wrt)
    expected_div = reference_trace(net, t, x, ctx, create_graph=True)
    expected = torch.autograd.grad((expected_div * weights).sum() + net(t, x, *ctx).pow(2).sum(), wrt)
    for a, b in zip(got, expected):
        assert_exact(a, b)


@pytest.mark.parametrize("method", DEEP_METHODS)
def test_float32_and_device_follow_the_input(method):
    net, t, x, ctx = make((5, 4, 6, 3), 3, 2, method)
    expected = net.divergence(t, x, *ctx)[1]
    net32 = net.float()
    div = net32.divergence(t.float(), x.float(), *(c.float() for c in ctx))[1]
    assert div.dtype == torch.float32
    torch.testing.assert_close(div, expected.float(), rtol=1e-4, atol=1e-4)
    # nothing is created on a fixed device: the whole trace runs on the meta device
    meta = net32.to("meta")
    f, div = meta.divergence(t.float().to("meta"), x.float().to("meta"), *(c.float().to("meta") for c in ctx))
    assert div.device.type == "meta" and div.shape == (x.shape[0],)


def test_divergence_asks_the_model_whether_the_trace_is_differentiated():
    net, t, x, _ = make((5, 4, 6), 3, 0, "closed")
    asked = []
    net._deep_method = lambda grad: asked.append(grad) or "tangents"
    with torch.no_grad():
        net.divergence(t, x)  # sampling, evaluation
    net.divergence(t, x)  # the parameters require grad: training
    net.requires_grad_(False)
    net.divergence(t, x)  # a frozen net: nothing to differentiate
    net.divergence_jvp(t, x.requires_grad_(), x)  # but the input is differentiated
    assert asked == [False, True, False, True]


class TestCostModel:
    """The model's choices on pinned cases where the measured ratio is large (see
    benchmarks/trace_cost.py: batch 2000, one thread; the ratio is measured / measured)."""

    @pytest.mark.parametrize("grad", [False, True])
    @pytest.mark.parametrize("depth", [3, 4, 5])
    def test_small_d_carries_tangents(self, depth, grad):
        # d = 2, width 64: the cyclic contraction costs 5-20x the tangents
        assert ODENet(2, (64,) * depth)._deep_method(grad) == "tangents"
        assert ODENet(8, (64,) * depth)._deep_method(grad) == "tangents"

    @pytest.mark.parametrize("grad", [False, True])
    def test_d_above_h_closes_the_cycle(self, grad):
        # d = 128 > h = 64, three hidden layers: the tangents cost about 4x the cycle's
        # GEMM (two (N, 64 d) x (64 d, 64) products against one (N, 64^2) x (64^2, 64))
        assert ODENet(128, (64,) * 3)._deep_method(grad) == "cyclic"

    @pytest.mark.parametrize("grad", [False, True])
    @pytest.mark.parametrize("depth,d", [(2, 2), (2, 64), (3, 2), (3, 64), (4, 8), (4, 64), (5, 32)])
    def test_the_closed_form_beats_vjps(self, depth, d, grad):
        # batched VJPs measured at 2-10x the closed form, more when differentiated
        net = ODENet(d, (64,) * depth)
        costs = net.trace_costs(grad)
        assert costs["closed"] < costs["exact"]
        assert cheapest_exact(net, grad) == "closed"
        if depth >= 3:
            assert costs["closed"] == min(costs["tangents"], costs["cyclic"])

    def test_costs_are_in_forward_passes(self):
        costs = ODENet(2, (64, 64, 64)).trace_costs(False)
        assert 1 < costs["closed"] < 3  # the forward pass itself plus about one pass of tangents
        assert set(costs) == {"closed", "exact", "tangents", "cyclic"}
        assert set(ODENet(2, (64, 64)).trace_costs(False)) == {"closed", "exact"}


class TestAutoPicksByCost:
    def test_odenet_keeps_the_closed_form(self):
        flow = ContinuousFlow(ODENet(64, (64,) * 3))
        assert flow.trace_mode(64) == "closed"
        with torch.no_grad():
            assert flow.trace_mode(64) == "closed"

    def test_a_field_whose_closed_form_costs_more_gets_vjps(self):
        class Slow(ClosedLinearField):
            def trace_costs(self, grad):
                return {"closed": 50.0, "exact": 2.0 if grad else 1.5}

        field = Slow(random_matrix(3))
        flow = ContinuousFlow(field, trace="exact")
        assert cheapest_exact(field, False) == "exact"
        assert flow.trace_mode(3) == "exact"
        flow.trace = "auto"
        assert flow.trace_mode(3) == "exact"
        flow.trace = "hutchinson"
        assert flow.trace_mode(3) == "hutchinson"
        # and the VJP trace it then runs is exact: log|det| = t tr A
        flow.trace = "auto"
        x = torch.randn(4, 3, dtype=torch.float64)
        _, ladj = flow(x)
        expected = torch.diagonal(field.A).sum().detach().expand(4)
        torch.testing.assert_close(ladj, expected, rtol=1e-4, atol=1e-4)

    def test_without_costs_the_closed_form_is_trusted(self):
        field = ClosedLinearField(random_matrix(3))
        assert cheapest_exact(field, True) == cheapest_exact(field, False) == "closed"
        assert ContinuousFlow(field).trace_mode(3) == "closed"
        assert cheapest_exact(NoDivergence(ODENet(3, (8,))), False) == "exact"
