"""Flow matching: the path, its velocity, the loss's minimiser, couplings, and training
into a flow whose exact likelihood matches the data's."""

import itertools
import math

import pytest
import torch
from torch import nn

import pyro_cnf
from pyro_cnf import ContinuousFlow, ODENet
from pyro_cnf.flow_matching import conditional_path, flow_matching_loss, minibatch_ot_pairing


# The schedules, written out again from the paper's formulas with time reversed (data at
# s = 0, noise at s = 1): s -> (alpha, sigma, dalpha/ds, dsigma/ds).
def ot(s, sm):
    return 1 - s, sm + (1 - sm) * s, -torch.ones_like(s), (1 - sm) * torch.ones_like(s)


def cosine(s, sm):
    h = math.pi / 2
    cos, sin = torch.cos(h * s), torch.sin(h * s)
    return cos, sm + (1 - sm) * sin, -h * sin, (1 - sm) * h * cos


SCHEDULES = {"ot": ot, "cosine": cosine}


def generator(seed):
    return torch.Generator().manual_seed(seed)


class Recorder(nn.Module):
    """Returns zeros and keeps what it was called with."""

    def forward(self, t, x, *context):
        self.t, self.x, self.context = t, x, context[0] if context else None
        return torch.zeros_like(x)


class GaussianOptimum(nn.Module):
    r"""For data N(m(c), std^2 I) the loss's minimiser E[u_t | x_t = y] in closed form:
    x_t = a x + b z is Gaussian, so E[x | y] = m + a std^2 / v (y - a m) and
    E[z | y] = b / v (y - a m) with v = a^2 std^2 + b^2; u = (a' x + b' z) / T.

    ``perturb(t, y)`` is added to it; ``theta`` (scale, shift) parametrises the family
    ``u* + theta_0 * k(t) (y - a m) + theta_1`` whose optimum is theta = 0."""

    def __init__(self, mean, std, path, sigma_min, T, perturb=None, theta=(0.0, 0.0)):
        super().__init__()
        self.mean, self.std, self.schedule = mean, std, SCHEDULES[path]
        self.sigma_min, self.T, self.perturb = sigma_min, T, perturb
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, t, y, context=None):
        m = self.mean(context)
        a, b, da, db = self.schedule(t / self.T, self.sigma_min)
        k = (da * a * self.std**2 + db * b) / (a * a * self.std**2 + b * b) / self.T
        f = da * m / self.T + k * (y - a * m)
        f = f + self.theta[0] * k * (y - a * m) + self.theta[1]
        return f if self.perturb is None else f + self.perturb(t, y)


MEANS = {
    "unconditional": (lambda c: torch.tensor([2.0, -1.0], dtype=torch.float64), None),
    "conditional": (lambda c: c * torch.tensor([2.0, -1.0], dtype=torch.float64), 1),
}


def gaussian_batch(kind, n, seed):
    mean, c_dim = MEANS[kind]
    g = generator(seed)
    context = None if c_dim is None else torch.rand(n, 1, generator=g, dtype=torch.float64) * 4 - 2
    x = mean(context) + 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, context


class TestPath:
    @pytest.mark.parametrize("path", SCHEDULES)
    def test_endpoints_data_at_zero_base_at_T(self, path):
        x, z = torch.randn(5, 3), torch.randn(5, 3)
        T = 2.5
        x0, _ = conditional_path(x, z, torch.zeros(5, 1), path=path, sigma_min=0.01, T=T)
        xT, _ = conditional_path(x, z, torch.full((5, 1), T), path=path, sigma_min=0.01, T=T)
        torch.testing.assert_close(x0, x + 0.01 * z)
        torch.testing.assert_close(xT, z)

    @pytest.mark.parametrize("path", SCHEDULES)
    @pytest.mark.parametrize("T", [1.0, 0.3])
    def test_velocity_is_the_time_derivative(self, path, T):
        x, z = torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
        t = T * torch.rand(7, 1, dtype=torch.float64).clamp(0.01, 0.99)
        h = 1e-6
        plus, _ = conditional_path(x, z, t + h, path=path, sigma_min=0.05, T=T)
        minus, _ = conditional_path(x, z, t - h, path=path, sigma_min=0.05, T=T)
        _, u = conditional_path(x, z, t, path=path, sigma_min=0.05, T=T)
        torch.testing.assert_close(u, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-6)


class TestLoss:
    @pytest.mark.parametrize("path", SCHEDULES)
    def test_the_field_sees_the_path_point_and_regresses_on_its_velocity(self, path):
        x, z = torch.randn(50, 2, dtype=torch.float64), torch.randn(50, 2, dtype=torch.float64)
        t = 3.0 * torch.rand(50, dtype=torch.float64)
        field = Recorder()
        loss = flow_matching_loss(field, x, path=path, sigma_min=0.1, T=3.0, t=t, noise=z)
        a, b, da, db = SCHEDULES[path](t[:, None] / 3.0, 0.1)
        assert field.t.shape == (50, 1)
        torch.testing.assert_close(field.t[:, 0], t)
        torch.testing.assert_close(field.x, a * x + b * z)
        u = (da * x + db * z) / 3.0  # a zero field leaves the target's mean square
        torch.testing.assert_close(loss, u.pow(2).sum(-1).mean())

    def test_random_draws_are_uniform_times_and_standard_normal_noise(self):
        field, x = Recorder(), torch.zeros(20000, 1, dtype=torch.float64)
        flow_matching_loss(field, x, sigma_min=0.0, T=2.0, generator=generator(0))
        t = field.t[:, 0]
        z = (field.x / (t / 2.0)[:, None]).squeeze(-1)  # data at 0: x_t = (t / T) z
        assert 0 <= t.min() and t.max() <= 2.0
        assert abs(t.mean() - 1.0) < 0.02 and abs(t.var() - 4 / 12) < 0.02
        assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03

    def test_generator_makes_the_loss_reproducible(self):
        field, x = ODENet(2, (8,), zero_init=False), torch.randn(30, 2)
        first = flow_matching_loss(field, x, generator=generator(1))
        assert first == flow_matching_loss(field, x, generator=generator(1))
        assert first != flow_matching_loss(field, x, generator=generator(2))

    @pytest.mark.parametrize("path", SCHEDULES)
    @pytest.mark.parametrize("kind", MEANS)
    def test_excess_loss_of_a_field_is_its_squared_distance_to_the_marginal_velocity(self, path, kind):
        # L(v) - L(u*) = E||v - u*||^2 (the cross term vanishes because u* = E[u | x_t]):
        # u* minimises the loss, and it is the marginal velocity of THIS time convention.
        x, context = gaussian_batch(kind, 200_000, seed=3)
        mean = MEANS[kind][0]
        T, sm = 2.0, 0.05
        g = generator(4)
        t = T * torch.rand(len(x), 1, generator=g, dtype=x.dtype)
        z = torch.randn(x.shape, generator=g, dtype=x.dtype)
        kw = dict(context=context, path=path, sigma_min=sm, T=T, t=t, noise=z)
        best = flow_matching_loss(GaussianOptimum(mean, 0.5, path, sm, T), x, **kw)
        x_t, _ = conditional_path(x, z, t, path=path, sigma_min=sm, T=T)
        perturbations = (
            lambda t, y: 0.3 + 0 * y,
            lambda t, y: 0.2 * y,
            lambda t, y: torch.sin(3 * t) * y.flip(-1),
        )
        for perturb in perturbations:
            worse = flow_matching_loss(GaussianOptimum(mean, 0.5, path, sm, T, perturb), x, **kw)
            excess = perturb(t, x_t).pow(2).sum(-1).mean()
            assert worse > best
            torch.testing.assert_close(worse - best, excess, rtol=0.05, atol=0)

    @pytest.mark.parametrize("path", SCHEDULES)
    def test_gradient_vanishes_in_expectation_at_the_optimum(self, path):
        def gradients(theta):
            grads = []
            for seed in range(12):
                x, _ = gaussian_batch("unconditional", 10_000, seed)
                field = GaussianOptimum(MEANS["unconditional"][0], 0.5, path, 1e-4, 1.0, theta=theta)
                flow_matching_loss(field, x, path=path, generator=generator(100 + seed)).backward()
                grads.append(field.theta.grad)
            grads = torch.stack(grads)
            return grads.mean(0), grads.std(0) / math.sqrt(len(grads))

        mean, se = gradients((0.0, 0.0))
        assert (mean.abs() < 4 * se).all(), (mean, se)
        theta = torch.tensor([0.3, -0.2], dtype=torch.float64)
        mean, se = gradients(theta.tolist())
        assert mean @ theta > 10 * se.norm()  # downhill points back to theta = 0


class TestCoupling:
    def test_pairing_is_the_optimal_assignment(self):
        x, z = torch.randn(6, 2), torch.randn(6, 2)
        cost = lambda perm: (x - z[list(perm)]).pow(2).sum()  # noqa: E731
        best = min(cost(p) for p in itertools.permutations(range(6)))
        perm = minibatch_ot_pairing(x, z)
        assert sorted(perm.tolist()) == list(range(6))
        torch.testing.assert_close(cost(perm.tolist()), best)

    @pytest.mark.parametrize("path", SCHEDULES)
    def test_minibatch_ot_lowers_the_batch_transport_cost(self, path):
        x = torch.randn(256, 2, generator=generator(0), dtype=torch.float64) * 0.3
        z = torch.randn(256, 2, generator=generator(1), dtype=torch.float64)
        t = torch.full((256,), 0.5, dtype=torch.float64)
        a, b, _, _ = SCHEDULES[path](t[:, None], 0.0)

        def paired_noise(coupling):
            field = Recorder()
            flow_matching_loss(field, x, path=path, sigma_min=0.0, coupling=coupling, t=t, noise=z)
            return (field.x - a * x) / b  # recover the base sample each row was paired with

        independent, coupled = paired_noise("independent"), paired_noise("minibatch_ot")
        torch.testing.assert_close(independent, z)
        torch.testing.assert_close(coupled.sort(0).values, z.sort(0).values)  # a re-pairing of z
        cost_ind = (x - independent).pow(2).sum(-1).mean()
        cost_ot = (x - coupled).pow(2).sum(-1).mean()
        assert cost_ot < 0.6 * cost_ind  # population values: 2.18 and 2 (1 - 0.3)^2 = 0.98
        torch.testing.assert_close(cost_ot, (x - z[minibatch_ot_pairing(x, z)]).pow(2).sum(-1).mean())

    def test_context_pairs_only_rows_of_the_same_context(self):
        g = generator(0)
        label = torch.randint(0, 3, (60, 1), generator=g).double()
        x, z = torch.randn(60, 2, generator=g) + 4 * label, torch.randn(60, 2, generator=g)
        perm = minibatch_ot_pairing(x, z, label)
        assert sorted(perm.tolist()) == list(range(60))
        assert (label[perm] == label).all()
        assert (perm != torch.arange(60)).any()
        for k in range(3):  # optimal within each context
            rows = (label[:, 0] == k).nonzero().squeeze(-1)
            inner = minibatch_ot_pairing(x[rows], z[rows])
            torch.testing.assert_close(z[perm[rows]], z[rows][inner])
        distinct = torch.randn(60, 1)  # a continuous context: nothing to re-pair
        assert (minibatch_ot_pairing(x, z, distinct) == torch.arange(60)).all()


class TestConditional:
    def test_context_reaches_the_field_row_by_row(self):
        x, c = torch.randn(40, 2), torch.randn(40, 3)
        field = Recorder()
        field.context_dim = 3
        flow_matching_loss(field, x, context=c, coupling="minibatch_ot")
        assert field.context is c

    def test_trains_the_field_of_a_conditional_cnf(self):
        transform = pyro_cnf.ConditionalCNF(2, context_dim=3, hidden_dims=(16, 16))
        field = transform.flow.vector_field
        x, c = torch.randn(32, 2), torch.randn(32, 3)
        flow_matching_loss(field, x, context=c).backward()
        assert all(p.grad is not None for p in field.parameters())


class TestErrors:
    @pytest.mark.parametrize(
        "kwargs, error, match",
        [
            (dict(x_data=[[0.0, 1.0]]), TypeError, "torch.Tensor"),
            (dict(x_data=torch.zeros(4, 2, dtype=torch.int64)), TypeError, "float32 or float64"),
            (dict(x_data=torch.zeros(4)), ValueError, r"shape \(N >= 1, 2\)"),
            (dict(x_data=torch.zeros(4, 3)), ValueError, r"shape \(N >= 1, 2\)"),
            (dict(x_data=torch.zeros(0, 2)), ValueError, r"shape \(N >= 1, 2\)"),
            (dict(x_data=torch.tensor([[0.0, math.nan]])), ValueError, "NaN"),
            (dict(context=torch.zeros(4, 1)), ValueError, "not conditional"),
            (dict(path="vp"), ValueError, "path must be one of"),
            (dict(coupling="sinkhorn"), ValueError, "coupling must be one of"),
            (dict(sigma_min=1.0), ValueError, r"sigma_min must be in \[0, 1\)"),
            (dict(sigma_min=-0.1), ValueError, r"sigma_min must be in \[0, 1\)"),
            (dict(T=0.0), ValueError, r"T must be a finite number > 0"),
            (dict(T=math.inf), ValueError, r"T must be a finite number > 0"),
            (dict(t=torch.rand(3)), ValueError, r"shape \(4,\) or \(4, 1\)"),
            (dict(t=torch.rand(4, 2)), ValueError, r"shape \(4,\) or \(4, 1\)"),
            (dict(t=torch.full((4,), 1.5)), ValueError, r"in \[0, T\]"),
            (dict(t=torch.full((4,), math.nan)), ValueError, r"in \[0, T\]"),
            (dict(noise=torch.randn(4, 3)), ValueError, "noise must be"),
            (dict(noise=torch.randn(4, 2, dtype=torch.float64)), ValueError, "noise must be"),
            (dict(noise=torch.full((4, 2), math.nan)), ValueError, "noise contains NaN"),
            (dict(x_data=torch.zeros(4, 2, dtype=torch.float64)), TypeError, "parameters are torch.float32"),
        ],
    )
    def test_unconditional_field(self, kwargs, error, match):
        kwargs = {"x_data": torch.randn(4, 2), **kwargs}
        with pytest.raises(error, match=match):
            flow_matching_loss(ODENet(2, (8,)), **kwargs)

    @pytest.mark.parametrize(
        "context, error, match",
        [
            (None, ValueError, "is conditional"),
            ([[0.0]] * 4, TypeError, "context must be a torch.Tensor"),
            (torch.zeros(4, 3, dtype=torch.float64), TypeError, "expected torch.float32"),
            (torch.zeros(5, 3), ValueError, r"shape \(4, 3\), one row per row of x_data"),
            (torch.zeros(3), ValueError, r"shape \(4, 3\), one row per row of x_data"),
            (torch.zeros(4, 2), ValueError, r"shape \(4, 3\), one row per row of x_data"),
            (torch.full((4, 3), math.inf), ValueError, "context contains NaN or inf"),
        ],
    )
    def test_conditional_field(self, context, error, match):
        with pytest.raises(error, match=match):
            flow_matching_loss(ODENet(2, (8,), context_dim=3), torch.randn(4, 2), context=context)

    @pytest.mark.parametrize(
        "x, z, context",
        [
            (torch.zeros(4, 2), torch.zeros(5, 2), None),
            (torch.zeros(4), torch.zeros(4), None),
            (torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(3, 1)),
        ],
    )
    def test_pairing_shapes(self, x, z, context):
        with pytest.raises(ValueError, match="must have"):
            minibatch_ot_pairing(x, z, context)

    def test_a_flow_instead_of_its_field(self):
        with pytest.raises(TypeError, match="pass flow.vector_field"):
            flow_matching_loss(ContinuousFlow(ODENet(2, (8,))), torch.randn(4, 2))

    def test_a_field_of_the_wrong_shape(self):
        class FirstCoordinate(nn.Module):
            def forward(self, t, x):
                return x[:, :1] * t

        with pytest.raises(ValueError, match=r"expected the shape of x, \(4, 2\)"):
            flow_matching_loss(FirstCoordinate(), torch.randn(4, 2))


def fm_field(d, context_dim=0):
    # Steep initial time gates make the field strongly t-dependent from the start, which
    # flow matching needs (with ODENet's default 0.1 the regression stalls near t = 0);
    # 10 saturates most gates away from t = 0 and fits the data's offset slowly here.
    torch.manual_seed(0)
    return ODENet(d, (32, 32), context_dim=context_dim, activation="silu", time_gate_scale=3.0)


def train(field, sample, steps, batch_size, **kwargs):
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(field.parameters(), lr=1e-2)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    for _ in range(steps):
        x, context = sample(batch_size)
        optimizer.zero_grad()
        flow_matching_loss(field, x, context=context, **kwargs).backward()
        optimizer.step()
        decay.step()


@pytest.mark.slow
@pytest.mark.parametrize("coupling, steps, batch_size", [("independent", 500, 512), ("minibatch_ot", 300, 128)])
def test_trained_flow_has_the_data_density_and_maps_data_to_the_base(coupling, steps, batch_size):
    # The flow of the trained field, integrated from data at t = 0, must land on N(0, I)
    # and give the data's log-density: a time flip would leave the data near (3, -1) and
    # break both. (Untrained, KL(data || model) is about 6 nats.)
    mean, std = torch.tensor([3.0, -1.0]), torch.tensor([0.5, 1.5])
    field = fm_field(2)
    train(field, lambda n: (mean + std * torch.randn(n, 2), None), steps, batch_size, coupling=coupling)
    flow = ContinuousFlow(field, trace="exact", rtol=1e-6, atol=1e-6).eval()
    x = mean + std * torch.randn(4000, 2, generator=generator(1))
    with torch.no_grad():
        z, ladj = flow(x)
    assert (z.mean(0).abs() < 0.15).all() and ((z.std(0) - 1).abs() < 0.3).all()
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) + ladj
    error = torch.distributions.Normal(mean, std).log_prob(x).sum(-1) - log_p
    assert -0.03 < error.mean() < 0.1  # KL(data || model) >= 0, up to Monte Carlo error
    assert error.abs().median() < 0.25


@pytest.mark.slow
def test_trained_conditional_cnf_has_the_conditional_density():
    # x | c ~ N(2c, 0.5^2) with c ~ U(-1, 1), trained through a Pyro ConditionalCNF's field,
    # scored through the Pyro distribution (exact closed-form trace).
    import pyro.distributions as dist

    def sample(n, g=None):
        c = 2 * torch.rand(n, 1, generator=g) - 1
        return 2 * c + 0.5 * torch.randn(n, 1, generator=g), c

    flow = ContinuousFlow(fm_field(1, context_dim=1), rtol=1e-6, atol=1e-6)
    transform = pyro_cnf.ConditionalCNF(1, context_dim=1, flow=flow)
    train(flow.vector_field, sample, 500, 512)
    base = dist.Normal(torch.zeros(1), torch.ones(1)).to_event(1)
    x, c = sample(4000, generator(1))
    with torch.no_grad():
        log_p = dist.ConditionalTransformedDistribution(base, [transform]).condition(c).log_prob(x)
    error = torch.distributions.Normal(2 * c, 0.5).log_prob(x)[:, 0] - log_p
    assert -0.03 < error.mean() < 0.1
    assert error.abs().median() < 0.25
