"""ODENet's constructor options that are not covered with the flow: the time-gate init."""

import math

import pytest
import torch

from pyro_cnf import ODENet


@pytest.mark.parametrize("scale", [0.0, 0.1, 3.0, 10.0])
def test_time_gate_slopes_have_the_requested_std(scale):
    torch.manual_seed(0)
    net = ODENet(2, (512, 512), time_gate_scale=scale)
    gate = net.time_gate.detach()
    assert gate.numel() == 512 + 512 + 2
    assert gate.std().item() == pytest.approx(scale, rel=0.1, abs=1e-12)
    assert gate.mean().abs().item() <= 0.15 * scale + 1e-12
    # only the slopes: the gate biases and time shifts still start at zero
    assert not net.time_gate_bias.detach().any() and not net.time_shift.detach().any()


def test_default_init_is_unchanged():
    # The default draws exactly what ODENet drew before the argument existed.
    torch.manual_seed(3)
    net = ODENet(3, (8, 8))
    torch.manual_seed(3)
    again = ODENet(3, (8, 8), time_gate_scale=0.1)
    assert torch.equal(net.time_gate, again.time_gate)
    torch.manual_seed(3)
    for lin in net.linears:  # the same stream: the linear layers are drawn first
        torch.nn.Linear(lin.in_features, lin.out_features)
    assert torch.equal(net.time_gate.detach(), torch.randn(8 + 8 + 3) * 0.1)


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
        plain = ODENet(3, hidden, context_dim=2, zero_init=False).double()
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

    def test_is_architecture_and_old_checkpoints_load_as_gain_one(self):
        a = ODENet(2, (8, 8), input_gain=4.0)
        with pytest.raises(ValueError, match="input_gain: checkpoint 4.0, this net 1.0"):
            ODENet(2, (8, 8)).load_state_dict(a.state_dict())
        old = ODENet(2, (8, 8)).state_dict()
        del old["_extra_state"]["input_gain"]  # a checkpoint written before the option
        ODENet(2, (8, 8)).load_state_dict(old)
        with pytest.raises(ValueError, match="input_gain: checkpoint 1.0, this net 4.0"):
            ODENet(2, (8, 8), input_gain=4.0).load_state_dict(old)

    @pytest.mark.parametrize("bad", [0.0, -2.0, math.inf, math.nan, "4", True])
    def test_bad_gain_raises(self, bad):
        with pytest.raises(ValueError, match="input_gain must be a finite number > 0"):
            ODENet(2, (8,), input_gain=bad)
