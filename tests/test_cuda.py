"""The core, the adapters and the Trainer on a CUDA device: results follow the input's device
and dtype and agree with the CPU. Skipped where no GPU is present (CI's machines have none)."""

import copy
import math

import pytest
import torch

from pyro_cnf import ContinuousFlow, ODENet
from pyro_cnf.training import FlowMatching, MaximumLikelihood, Trainer, nll
from tests.fields import LinearField, random_matrix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def test_linear_field_matches_the_analytic_map_in_both_modes():
    # f = A x: z = expm(A T) x and log|det| = T tr A, in training (1e-3) and eval (1e-5) solves
    A = random_matrix(3).to(CUDA)
    flow = ContinuousFlow(LinearField(A), T=0.7, trace="exact").to(CUDA)
    x = torch.randn(64, 3, dtype=torch.float64, device=CUDA)
    exact = x @ torch.linalg.matrix_exp(A * 0.7).t()
    for mode, tol in (("train", 1e-3), ("eval", 1e-5)):
        getattr(flow, mode)()
        z, ladj = flow(x)
        assert z.device.type == "cuda" and z.dtype == torch.float64
        assert (z - exact).abs().max() < 100 * tol
        torch.testing.assert_close(ladj, (0.7 * torch.trace(A)).expand(64), rtol=100 * tol, atol=100 * tol)


@pytest.mark.parametrize("hidden", [(16, 16), (16, 16, 16)])
@pytest.mark.parametrize("scale_rate", [0.0, 4.0])
def test_closed_form_trace_with_input_gain_matches_autograd(hidden, scale_rate):
    torch.manual_seed(0)
    net = ODENet(3, hidden, context_dim=2, zero_init=False, input_gain=16.0, scale_rate=scale_rate)
    net = net.double().to(CUDA)
    x, c = torch.randn(5, 3, dtype=torch.float64, device=CUDA), torch.randn(5, 2, dtype=torch.float64, device=CUDA)
    t = torch.tensor(0.3, dtype=torch.float64, device=CUDA)
    f, div = net.divergence(t, x, c)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: net(t, v[None], c[i : i + 1])[0], x[i])
                       for i in range(5)])
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(-1))
    cpu = copy.deepcopy(net).cpu()
    torch.testing.assert_close(f.cpu(), cpu(t.cpu(), x.cpu(), c.cpu()))


def test_log_prob_and_gradients_agree_with_the_cpu():
    torch.manual_seed(1)
    flow = ContinuousFlow(ODENet(2, (32, 32), zero_init=False, input_gain=4.0)).double()
    gpu = copy.deepcopy(flow).to(CUDA)
    x = torch.randn(128, 2, dtype=torch.float64)
    flow.eval()
    gpu.eval()
    lp, lp_gpu = flow.log_prob(x), gpu.log_prob(x.to(CUDA))
    torch.testing.assert_close(lp_gpu.cpu(), lp, rtol=1e-7, atol=1e-7)
    lp.sum().backward()
    lp_gpu.sum().backward()
    for p, q in zip(flow.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-6, atol=1e-6)


def test_adjoint_on_cuda_gives_the_direct_gradient():
    pytest.importorskip("torchdiffeq")
    torch.manual_seed(2)
    field = ODENet(2, (16, 16), zero_init=False).double().to(CUDA)
    tight = dict(rtol=1e-9, atol=1e-9, train_rtol=None, train_atol=None)
    direct = ContinuousFlow(field, **tight)
    adjoint = ContinuousFlow(copy.deepcopy(field), adjoint=True, **tight)
    x = torch.randn(16, 2, dtype=torch.float64, device=CUDA)
    direct.log_prob(x).sum().backward()
    adjoint.log_prob(x).sum().backward()
    for p, q in zip(direct.parameters(), adjoint.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", [MaximumLikelihood(), FlowMatching()])
def test_trainer_trains_on_cuda(objective):
    torch.manual_seed(3)
    flow = ContinuousFlow(ODENet(2, (32, 32))).to(CUDA)
    data = torch.randn(2000, 2) * torch.tensor([2.0, 0.5]) + 1.0  # a CPU tensor: the Trainer moves it

    def batches(step):
        g = torch.Generator().manual_seed(step)
        return data[torch.randint(len(data), (256,), generator=g)]

    before = nll(flow, data.to(CUDA))
    trainer = Trainer(flow, batches, objective, lr=1e-2, disable=True)
    trainer.fit(150)
    after = nll(flow, data.to(CUDA))
    assert all(p.device.type == "cuda" for p in flow.parameters())
    assert math.isfinite(after) and after < before - 0.3


def test_pyro_guide_svi_on_cuda():
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormalizingFlow

    import pyro_cnf

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2, device=CUDA), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1), 0.5), obs=torch.tensor(1.0, device=CUDA))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormalizingFlow(model, lambda d: pyro_cnf.cnf(d).to(CUDA))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(num_particles=16, vectorize_particles=True))
    losses = [svi.step() for _ in range(100)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20
    assert guide()["z"].device.type == "cuda"


def test_nflows_conditional_transform_on_cuda():
    pytest.importorskip("nflows")
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow

    import pyro_cnf

    torch.manual_seed(4)
    flow = Flow(pyro_cnf.CNFTransform(2, context_dim=3, zero_init=False), StandardNormal([2])).to(CUDA)
    x, c = torch.randn(64, 2, device=CUDA), torch.randn(64, 3, device=CUDA)
    flow.eval()
    lp = flow.log_prob(x, context=c)
    assert lp.shape == (64,) and lp.device.type == "cuda" and torch.isfinite(lp).all()
    z, ladj = flow._transform(x, context=c)
    back, ladj_back = flow._transform.inverse(z, context=c)
    torch.testing.assert_close(back, x, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ladj_back, -ladj, rtol=1e-3, atol=1e-3)
    samples = flow.sample(10, context=c[:4])
    assert samples.shape == (4, 10, 2) and samples.device.type == "cuda"
