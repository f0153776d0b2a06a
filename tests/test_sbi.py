"""The sbi helper: estimators built like sbi's, trained by sbi or by flow matching, sampled
through sbi's posterior without the trace; sbi stays an optional dependency."""

import math
import subprocess
import sys
from functools import partial

import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.transforms import CompositeTransform, ReversePermutation

from pyro_cnf import CNFFlow, CNFTransform
from pyro_cnf.sbi import Standardize, build_cnf_estimator, flow_matching_estimator, train_flow_matching

sbi = pytest.importorskip("sbi")


def data(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = 2 * torch.rand(n, 2, generator=g) - 1
    x = torch.cat([theta * 3 + 5, theta.sum(-1, keepdim=True) ** 2], -1) + 0.1 * torch.randn(n, 3, generator=g)
    return theta, x


def prior():
    from sbi.utils import BoxUniform

    return BoxUniform(-torch.ones(2), torch.ones(2))


class NoTracker:
    """sbi's tracker protocol, writing nothing (the default writes ./sbi-logs)."""

    log_dir = None

    def log_metric(self, *args, **kwargs): ...

    def log_metrics(self, *args, **kwargs): ...

    def log_params(self, *args, **kwargs): ...

    def add_figure(self, *args, **kwargs): ...

    def flush(self): ...


def solves(estimator, monkeypatch):
    """The ``logdet`` argument of each solve of the estimator's CNF."""
    flow = estimator.net._transform._transforms[-1].flow
    seen = []
    original = flow.forward

    def counted(*args, **kwargs):
        seen.append(kwargs.get("logdet", True))
        return original(*args, **kwargs)

    monkeypatch.setattr(flow, "forward", counted)
    return seen


def test_import_pyro_cnf_never_imports_sbi():
    code = "import sys, pyro_cnf, pyro_cnf.sbi; assert 'sbi' not in sys.modules, 'sbi imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


class TestBuild:
    def test_structure_and_z_scoring_match_sbis_own(self):
        from sbi.neural_nets.estimators import NFlowsFlow
        from sbi.utils.sbiutils import standardizing_net, standardizing_transform

        theta, x = data()
        est = build_cnf_estimator(theta, x, hidden_dims=(16,))
        assert isinstance(est, NFlowsFlow) and isinstance(est.net, CNFFlow)
        affine, cnf = est.net._transform._transforms
        assert isinstance(cnf, CNFTransform) and cnf.flow.vector_field.context_dim == 3
        theirs = standardizing_transform(theta)
        torch.testing.assert_close(affine(theta)[0], theirs(theta)[0])
        torch.testing.assert_close(affine(theta)[1], theirs(theta)[1])
        torch.testing.assert_close(est.net._embedding_net(x), standardizing_net(x)(x))

    def test_structured_z_scoring_matches_sbis(self):
        from sbi.utils.sbiutils import standardizing_net

        theta, x = data()
        est = build_cnf_estimator(theta, x, z_score_theta="none", z_score_x="structured", hidden_dims=(8,))
        assert isinstance(est.net._transform._transforms[0], CNFTransform)
        torch.testing.assert_close(est.net._embedding_net(x), standardizing_net(x, structured_dims=True)(x))

    def test_log_prob_is_the_cnf_density_of_the_z_scored_theta(self):
        theta, x = data()
        est = build_cnf_estimator(theta, x, hidden_dims=(16,), zero_init=False)
        affine, cnf = est.net._transform._transforms
        u, ladj_affine = affine(theta[:5])
        z, ladj = cnf.flow(u, est.net._embedding_net(x[:5]))
        expected = StandardNormal([2]).log_prob(z) + ladj + ladj_affine
        torch.testing.assert_close(est.log_prob(theta[:5].unsqueeze(0), x[:5])[0], expected)

    def test_field_and_flow_settings_and_embedding_net(self):
        theta, x = data()
        embed = torch.nn.Linear(3, 4)
        est = build_cnf_estimator(theta, x, hidden_dims=(8, 8), embedding_net=embed, activation="silu",
                                  time_gate_scale=10.0, method="rk4", steps=3)
        cnf = est.net._transform._transforms[-1]
        assert cnf.flow.vector_field.activation == "silu" and cnf.flow.vector_field.context_dim == 4
        assert (cnf.flow.method, cnf.flow.steps) == ("rk4", 3)
        assert est.embedding_net[1] is embed

    def test_bad_arguments(self):
        theta, x = data()
        with pytest.raises(ValueError, match="z_score_theta"):
            build_cnf_estimator(theta, x, z_score_theta="yes")
        with pytest.raises(ValueError, match="batch_theta"):
            build_cnf_estimator(theta[:, 0], x)
        with pytest.raises(ValueError, match="batch_x"):
            build_cnf_estimator(theta, x[:10])
        with pytest.raises(ValueError, match="finite rows"):
            build_cnf_estimator(theta[:1], x[:1])


class TestSbiTrainsIt:
    def test_npe_trains_and_the_posterior_samples_without_the_trace(self, monkeypatch):
        from sbi.inference import NPE

        theta, x = data(200)
        npe = NPE(prior(), density_estimator=partial(build_cnf_estimator, hidden_dims=(8,), method="rk4", steps=2),
                  show_progress_bars=False, tracker=NoTracker())
        with pytest.warns(UserWarning, match="Maximum number of epochs"):
            est = npe.append_simulations(theta, x).train(max_num_epochs=1, training_batch_size=50)
        posterior = npe.build_posterior()
        assert isinstance(est.net, CNFFlow)
        seen = solves(posterior.posterior_estimator, monkeypatch)  # sbi's posterior holds a copy
        samples = posterior.sample((20,), x=x[:1], show_progress_bars=False)
        assert samples.shape == (20, 2) and (samples.abs() <= 1).all()
        assert seen and not any(seen)  # sampling: trace-free solves only
        del seen[:]
        lp = posterior.log_prob(theta[:3], x=x[:1])
        assert torch.isfinite(lp).all() and True in seen


class TestFlowMatching:
    def test_rows_with_nan_are_left_out_with_a_warning(self):
        # Regression: z-scoring dropped them, then training died at a random step naming nothing
        theta, x = data(300)
        x[[3, 50, 77]] = float("nan")
        with pytest.warns(UserWarning, match=r"leaving out 3 of 300 rows .* \(rows \[3, 50, 77\]\)"):
            est = flow_matching_estimator(theta, x, hidden_dims=(8,), steps=200, batch_size=256)
        assert est.training_record["steps"] == 200 and all(map(math.isfinite, est.training_record["losses"]))
        with pytest.raises(ValueError, match="every row of theta or x holds NaN or inf"):
            train_flow_matching(est, theta[:2], x[[3, 50]], steps=1)

    def test_float64_simulations_give_a_float64_estimator(self):
        theta, x = (v.double() for v in data(200))
        est = flow_matching_estimator(theta, x, hidden_dims=(8,), steps=3, batch_size=32)
        assert est.training_record["steps"] == 3
        assert all(p.dtype == torch.float64 for p in est.parameters())
        assert est.log_prob(theta[:4].unsqueeze(0), condition=x[:4]).dtype == torch.float64

    def test_loss_decreases_and_direct_posterior_works(self, monkeypatch):
        from sbi.inference import DirectPosterior

        theta, x = data(500)
        est = flow_matching_estimator(theta, x, hidden_dims=(32, 32), steps=300, batch_size=128, seed=0,
                                      rtol=1e-4, atol=1e-4)
        losses = est.training_record["losses"]
        assert est.training_record["steps"] == 300 and len(losses) == 300
        assert sum(losses[-30:]) < sum(losses[:30])
        posterior = DirectPosterior(est, prior())
        seen = solves(est, monkeypatch)
        samples = posterior.sample((50,), x=x[:1], show_progress_bars=False)
        assert samples.shape == (50, 2) and not any(seen)
        # the posterior concentrates near the truth: theta = (x - 5) / 3 up to noise
        assert (samples.mean(0) - theta[0]).abs().max() < 0.3
        assert torch.isfinite(posterior.log_prob(theta[:1], x=x[:1])).all()

    def test_time_budget_and_constant_schedule(self):
        theta, x = data(100)
        est = build_cnf_estimator(theta, x, hidden_dims=(8,))
        record = train_flow_matching(est, theta, x, max_seconds=0.2, batch_size=16, schedule="constant",
                                     path="ot")
        assert record["steps"] >= 1 and record["cpu_seconds"] >= 0.2
        assert not est.training

    def test_trains_the_embedding_net_but_not_the_z_score(self):
        theta, x = data(100)
        embed = torch.nn.Linear(3, 3)
        est = build_cnf_estimator(theta, x, hidden_dims=(8,), embedding_net=embed)
        before = embed.weight.clone()
        affine = est.net._transform._transforms[0]
        shift = affine._shift.clone()
        train_flow_matching(est, theta, x, steps=3, batch_size=16)
        assert not torch.equal(embed.weight, before) and torch.equal(affine._shift, shift)

    def test_refuses_what_flow_matching_cannot_train(self):
        theta, x = data(50)
        est = build_cnf_estimator(theta, x, hidden_dims=(8,))
        with pytest.raises(ValueError, match="fit needs a budget"):
            train_flow_matching(est, theta, x)
        with pytest.raises(ValueError, match="schedule"):
            train_flow_matching(est, theta, x, steps=1, schedule="linear")
        with pytest.raises(ValueError, match="shape"):
            train_flow_matching(est, theta, x[:10], steps=1)
        est.net._transform = CompositeTransform([est.net._transform, ReversePermutation(2)])
        with pytest.raises(ValueError, match="last transform"):
            train_flow_matching(est, theta, x, steps=1)
        with pytest.raises(TypeError, match="NFlowsFlow"):
            train_flow_matching(torch.nn.Linear(2, 2), theta, x, steps=1)


def test_standardize_round_trips_through_the_state_dict():
    a = Standardize(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    b = Standardize(torch.zeros(2), torch.ones(2))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(torch.ones(1, 2)), a(torch.ones(1, 2)))
