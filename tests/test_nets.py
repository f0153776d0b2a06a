"""ODENet's constructor options that are not covered with the flow: the time-gate init and
the gains and the scale rate."""

import math

import pytest
import torch

import pyro_cnf
from pyro_cnf import ODENet


@pytest.mark.parametrize("scale", [0.0, 0.1, 3.0, 10.0])
def test_time_gate_slopes_have_the_requested_std(scale):
    torch.manual_seed(0)
    net = ODENet(2, (512, 512), time_gate_scale=scale)
    gate = net.time_gate.detach() * net.time_gain  # stored divided by the time gain
    assert gate.numel() == 512 + 512 + 2
    assert gate.std().item() == pytest.approx(scale, rel=0.1, abs=1e-12)
    assert gate.mean().abs().item() <= 0.15 * scale + 1e-12
    # only the slopes: the gate biases and time shifts still start at zero
    assert not net.time_gate_bias.detach().any() and not net.time_shift.detach().any()


def test_default_init_is_unchanged():
    # The default draws exactly what ODENet drew before the arguments existed: torch's
    # linear layers, then the slopes; the time and hidden gains only divide what is stored.
    torch.manual_seed(3)
    net = ODENet(3, (8, 8), zero_init=False)
    torch.manual_seed(3)
    again = ODENet(3, (8, 8), zero_init=False, time_gate_scale=0.1)
    assert torch.equal(net.time_gate, again.time_gate)
    torch.manual_seed(3)
    drawn = [torch.nn.Linear(lin.in_features, lin.out_features) for lin in net.linears]
    torch.testing.assert_close(net.time_gate.detach() * net.time_gain, torch.randn(8 + 8 + 3) * 0.1)
    torch.testing.assert_close(net.linears[1].weight.detach() * net.hidden_gain, drawn[1].weight.detach())
    for i in (0, 2):
        assert torch.equal(net.linears[i].weight, drawn[i].weight)


def test_steep_gates_make_a_new_field_time_dependent():
    torch.manual_seed(0)
    x = torch.randn(256, 2)

    def spread(scale):
        net = ODENet(2, (64, 64), zero_init=False, time_gate_scale=scale)
        with torch.no_grad():
            f0, f1 = net(torch.tensor(0.0), x), net(torch.tensor(1.0), x)
        return ((f1 - f0).norm() / f0.norm()).item()

    assert spread(10.0) > 5 * spread(0.1)


def test_time_gate_scale_is_not_architecture():
    # A checkpoint of a net with another init scale loads (same architecture).
    a = ODENet(2, (16, 16), time_gate_scale=10.0)
    b = ODENet(2, (16, 16))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.time_gate, b.time_gate)


@pytest.mark.parametrize("bad", [-1.0, -1e-9, math.nan, math.inf, "big", None])
def test_bad_time_gate_scale_raises(bad):
    with pytest.raises(ValueError, match="time_gate_scale must be a finite number >= 0"):
        ODENet(2, (8,), time_gate_scale=bad)


class TestInputGain:
    """``input_gain`` c: the first layer computes c (W h + b), gated; everything else as is."""

    @pytest.mark.parametrize("hidden", [(16,), (16, 16), (16, 16, 16)])
    def test_is_the_first_layer_scaled_and_traced_exactly(self, hidden):
        torch.manual_seed(0)
        plain = ODENet(3, hidden, context_dim=2, zero_init=False, input_gain=1.0).double()
        gained = ODENet(3, hidden, context_dim=2, zero_init=False, input_gain=4.0).double()
        gained.load_state_dict({**plain.state_dict(), "_extra_state": gained.get_extra_state()})
        with torch.no_grad():  # the same map as the plain net with its first layer times 4
            plain.linears[0].weight.mul_(4)
            plain.linears[0].bias.mul_(4)
        x, c, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64), torch.tensor(0.3)
        t = t.double()
        f, div = gained.divergence(t, x, c)
        torch.testing.assert_close(f, plain(t, x, c))
        torch.testing.assert_close(gained(t.expand(5), x, c), f)  # the per-row-time path too
        jac = torch.stack([torch.autograd.functional.jacobian(lambda v: gained(t, v[None], c[i : i + 1])[0], x[i])
                           for i in range(5)])
        torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(-1))


class TestGains:
    """``time_gain`` and ``hidden_gain``: the same new map, learning faster under Adam; all
    three gains are architecture."""

    ONES = dict(input_gain=1.0, time_gain=1.0, hidden_gain=1.0)

    @pytest.mark.parametrize("hidden", [(16,), (16, 16), (16, 16, 16)])
    def test_do_not_change_a_new_map(self, hidden):
        x, c = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        t = torch.tensor(0.7, dtype=torch.float64)
        outputs = []
        for gains in ({"time_gain": 1.0, "hidden_gain": 1.0}, {"time_gain": 7.0, "hidden_gain": 3.0}):
            torch.manual_seed(0)
            net = ODENet(3, hidden, context_dim=2, zero_init=False, time_gate_scale=3.0, **gains).double()
            outputs.append((*net.divergence(t, x, c), net(t.expand(5), x, c)))
        for a, b in zip(*outputs):
            torch.testing.assert_close(a, b)

    @pytest.mark.parametrize("hidden", [(16,), (16, 16), (16, 16, 16)])
    def test_trained_parameters_are_traced_exactly(self, hidden):
        torch.manual_seed(0)
        net = ODENet(3, hidden, context_dim=2, zero_init=False).double()
        with torch.no_grad():  # away from the initial gates and shifts
            net.time_gate_bias.normal_(std=0.1)
            net.time_shift.normal_(std=0.1)
        x, c = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        t = torch.tensor(0.3, dtype=torch.float64)
        f, div = net.divergence(t, x, c)
        torch.testing.assert_close(net(t.expand(5), x, c), f)
        jac = torch.stack([torch.autograd.functional.jacobian(lambda v: net(t, v[None], c[i : i + 1])[0], x[i])
                           for i in range(5)])
        torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(-1))

    def test_one_adam_step_moves_the_effective_parameters_gain_times_lr(self):
        # The net computes with c * p for a stored p; Adam's first step moves every stored
        # parameter by lr (times the sign of its gradient), so c * p moves by c * lr.
        torch.manual_seed(0)
        net = ODENet(2, (8, 8), zero_init=False, time_gain=10.0, hidden_gain=4.0).double()
        factors = {"time_gate": 10, "time_gate_bias": 10, "time_shift": 10, "linears.1.weight": 4, "linears.1.bias": 4}

        def effective():
            return {k: v.detach() * factors.get(k, 1) for k, v in net.state_dict().items() if k != "_extra_state"}

        before = effective()
        lr = 1e-3
        optimizer = torch.optim.Adam(net.parameters(), lr=lr, eps=1e-30)
        x, t = torch.randn(64, 2, dtype=torch.float64), torch.rand(64, dtype=torch.float64)
        net(t, x).pow(3).sum().backward()
        optimizer.step()
        after = effective()
        for name, was in before.items():
            moved = (after[name] - was).abs()
            torch.testing.assert_close(moved[moved > 0], torch.full_like(moved[moved > 0], factors.get(name, 1) * lr))
        # the same map as a net without time and hidden gains that holds the effective values
        plain = ODENet(2, (8, 8), time_gain=1.0, hidden_gain=1.0).double()
        plain.load_state_dict({**after, "_extra_state": plain.get_extra_state()})
        torch.testing.assert_close(plain(t, x), net(t, x))
        torch.testing.assert_close(plain.divergence(t[0], x)[1], net.divergence(t[0], x)[1])

    def test_are_architecture_and_old_checkpoints_load_as_gains_one(self):
        for name in self.ONES:
            a = ODENet(2, (8, 8), **{**self.ONES, name: 4.0})
            with pytest.raises(ValueError, match=f"{name}: checkpoint 4.0, this net 1.0"):
                ODENet(2, (8, 8), **self.ONES).load_state_dict(a.state_dict())
        old = ODENet(2, (8, 8), **self.ONES).state_dict()
        for name in self.ONES:  # a checkpoint written before the options
            del old["_extra_state"][name]
        ODENet(2, (8, 8), **self.ONES).load_state_dict(old)
        with pytest.raises(ValueError, match="input_gain: checkpoint 1.0, this net 16.0.*input_gain=1.0, time_gain"):
            ODENet(2, (8, 8)).load_state_dict(old)

    @pytest.mark.parametrize("name", ["input_gain", "time_gain", "hidden_gain"])
    @pytest.mark.parametrize("bad", [0.0, -2.0, math.inf, math.nan, "4", True])
    def test_bad_gain_raises(self, name, bad):
        with pytest.raises(ValueError, match=f"{name} must be a finite number > 0"):
            ODENet(2, (8,), **{name: bad})


class TestScaleRate:
    """``scale_rate`` r: the field is a + r tanh(s / r) * x, from the 2d outputs (a, s)."""

    @staticmethod
    def sharp(net: ODENet) -> ODENet:
        torch.manual_seed(1)
        with torch.no_grad():  # far from the identity and into tanh's curvature
            for linear in net.linears:
                linear.weight.normal_(std=1.5)
                linear.bias.normal_(std=1.0)
            net.time_gate_bias.normal_(std=0.5)
            net.time_shift.normal_(std=0.5)
        return net.double()

    @pytest.mark.parametrize("hidden", [(), (16,), (16, 16), (8, 16, 8), (8, 8, 8, 8)])
    @pytest.mark.parametrize("grad", [False, True])
    def test_divergence_and_jvp_are_exact(self, hidden, grad):
        net = self.sharp(ODENet(3, hidden, context_dim=2, zero_init=False, scale_rate=0.7))
        x, c = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
        v, t = torch.randn(6, 3, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
        x.requires_grad_(grad)  # a differentiated trace may take another contraction
        f, div = net.divergence(t, x, c)
        f_jvp, jv = net.jvp(t, x, v, c)
        f_both, div_both, jv_both = net.divergence_jvp(t, x, v, c)
        jac = torch.stack([torch.autograd.functional.jacobian(lambda y: net(t, y[None], c[i : i + 1])[0], x[i])
                           for i in range(6)])
        torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(-1))
        torch.testing.assert_close(jv, (jac @ v.unsqueeze(-1)).squeeze(-1))
        for a, b in ((f_jvp, f), (f_both, f), (div_both, div), (jv_both, jv), (net(t.expand(6), x, c), f)):
            torch.testing.assert_close(a, b)
        a, s = (net.linears[0](torch.cat((x, c), -1)) if not hidden else None), None
        if a is not None:  # no hidden layer: the formula itself, gates and shifts folded by hand
            gate, shift = net._time(t)
            a, s = torch.addcmul(shift, a, gate).split(3, -1)
            torch.testing.assert_close(f, a + 0.7 * torch.tanh(s / 0.7) * x)

    def test_constant_rates_give_the_analytic_flow(self):
        # f = k * x with k = r tanh(s / r): x_T = x_0 exp(k T), log p(x_0) = log N(x_T) + T sum(k)
        net = ODENet(2, (), scale_rate=2.0, input_gain=1.0).double()
        s = torch.tensor([3.0, -1.0], dtype=torch.float64)
        with torch.no_grad():
            net.linears[0].bias[2:] = s
            net.time_gate.zero_()  # gates sigma(0) = 1/2 with no time dependence; hence s / 2 below
        k = 2.0 * torch.tanh(s / 2 / 2.0)
        flow = pyro_cnf.ContinuousFlow(net, T=1.5, rtol=1e-9, atol=1e-9).double().eval()
        x = torch.randn(7, 2, dtype=torch.float64)
        z, logdet = flow(x)
        torch.testing.assert_close(z, x * torch.exp(1.5 * k))
        torch.testing.assert_close(logdet, torch.full((7,), 1.5 * k.sum().item(), dtype=torch.float64))
        torch.testing.assert_close(flow(z, reverse=True)[0], x)

    def test_a_funnel_map_is_a_linear_field(self):
        # s_i = w z for i >= 1 and everything else 0: z stays put and x_i(T) = x_i(0) exp(T k(z))
        # with k(z) = r tanh(w z / r), the map of an affine autoregressive layer (a funnel's
        # scale); log|det| = (d - 1) T k(z)
        d, r, w, T = 4, 3.0, 0.8, 1.3
        net = ODENet(d, (), scale_rate=r, input_gain=1.0).double()
        with torch.no_grad():
            net.linears[0].weight[d + 1 :, 0] = 2 * w  # gates sigma(0) = 1/2 halve it
            net.time_gate.zero_()
        flow = pyro_cnf.ContinuousFlow(net, T=T, rtol=1e-9, atol=1e-9).double().eval()
        x = torch.randn(6, d, dtype=torch.float64)
        k = r * torch.tanh(w * x[:, :1] / r)
        y, logdet = flow(x)
        torch.testing.assert_close(y, torch.cat((x[:, :1], x[:, 1:] * torch.exp(T * k)), -1))
        torch.testing.assert_close(logdet, (d - 1) * T * k[:, 0])

    def test_a_new_field_is_zero_and_the_flow_the_identity(self):
        net = ODENet(3, (8, 8), scale_rate=4.0)
        x = torch.randn(5, 3)
        f, div = net.divergence(torch.tensor(0.5), x)
        assert net.linears[-1].out_features == 6
        assert torch.equal(f, torch.zeros_like(x)) and torch.equal(div, torch.zeros(5))

    def test_is_architecture_and_old_checkpoints_load_as_rate_zero(self):
        with pytest.raises(ValueError, match="scale_rate: checkpoint 4.0, this net 0.0"):
            ODENet(2, (8, 8)).load_state_dict(ODENet(2, (8, 8), scale_rate=4.0).state_dict())
        old = ODENet(2, (8, 8)).state_dict()
        del old["_extra_state"]["scale_rate"]  # a checkpoint written before the option
        ODENet(2, (8, 8)).load_state_dict(old)

    def test_closed_form_is_still_the_cheaper_exact_trace_of_a_guide(self):
        for grad in (False, True):
            costs = ODENet(10, (64, 64), scale_rate=4.0).trace_costs(grad)
            assert costs["closed"] > ODENet(10, (64, 64)).trace_costs(grad)["closed"]
            assert costs["closed"] < costs["exact"]

    @pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan, "4", True])
    def test_bad_scale_rate_raises(self, bad):
        with pytest.raises(ValueError, match="scale_rate must be a finite number >= 0"):
            ODENet(2, (8,), scale_rate=bad)
