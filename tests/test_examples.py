"""The example scripts: each runs in-process on tiny settings and writes its figure and
finite metrics; the closed-form pieces they rely on are checked against first principles."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pyro
import pytest
import torch

import pyro_cnf

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    """Import examples/<name>.py as a module (the examples are scripts, not a package)."""
    module_name = f"_example_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[module_name] = module
    return sys.modules[module_name]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def finite_numbers(tree):
    """Every number in a nested dict/list of metrics."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in finite_numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in finite_numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def check_outputs(out, figure, metrics):
    assert (out / figure).stat().st_size > 0
    assert json.loads((out / "metrics.json").read_text()) == metrics
    numbers = finite_numbers(metrics)
    assert numbers and all(math.isfinite(x) for x in numbers)


class TestSviGuide:
    def test_smoke(self, tmp_path):
        metrics = load("svi_guide").main(
            ["--steps", "3", "--particles", "4", "--eval-particles", "16", "--hidden", "8", "--out", str(tmp_path)]
        )
        check_outputs(tmp_path, "samples.png", metrics)
        assert set(metrics["elbo"]) == {"AutoNormal", "AutoIAFNormal", "CNF"}

    @pytest.mark.parametrize("target", ["funnel", "banana"])
    def test_closed_form_density_is_the_models(self, target):
        script = load("svi_guide")
        trace = pyro.poutine.trace(script.model).get_trace(target)
        z1, z2 = trace.nodes["z1"]["value"], trace.nodes["z2"]["value"]
        torch.testing.assert_close(script.log_density(target, z1, z2), trace.log_prob_sum())

    def test_banana_is_normalised(self):
        # the ELBO's ceiling is 0 only if the evidence is 1; the banana is smooth enough for a
        # grid (the funnel's neck is not: its normalisation rests on the trace test above)
        script = load("svi_guide")
        z1 = torch.linspace(-12, 12, 961, dtype=torch.float64)
        z2 = torch.linspace(-6, 40, 1841, dtype=torch.float64)
        g1, g2 = torch.meshgrid(z1, z2, indexing="ij")
        p = script.log_density("banana", g1, g2).exp()
        mass = torch.trapezoid(torch.trapezoid(p, z2, dim=1), z1)
        assert mass.item() == pytest.approx(1.0, abs=2e-3)


class TestBayesianRegression:
    def test_smoke(self, tmp_path):
        metrics = load("bayesian_regression").main(
            ["--steps", "3", "--features", "4", "--hidden", "8", "--draws", "50",
             "--nuts-samples", "10", "--nuts-warmup", "10", "--out", str(tmp_path)]
        )
        check_outputs(tmp_path, "posterior.png", metrics)
        for name in ("AutoNormal", "CNF", "NUTS"):
            assert 0 <= metrics[name]["accuracy"] <= 1 and metrics[name]["log_lik"] < 0

    def test_vectorised_particles_score_like_separate_runs(self):
        # Pyro puts particles left of the data plate (dim -1); the batched model must score
        # each particle's (w, b) exactly as an unbatched run does, not broadcast them together
        script = load("bayesian_regression")
        X, y = torch.randn(7, 3), (torch.rand(7) < 0.5).float()
        w, b = torch.randn(5, 1, 3), torch.randn(5, 1)

        def log_joint(w, b):
            conditioned = pyro.poutine.condition(script.model, {"w": w, "b": b})
            return pyro.poutine.trace(conditioned).get_trace(X, y).log_prob_sum()

        with pyro.plate("particles", 5, dim=-2):
            batched = log_joint(w, b)
        torch.testing.assert_close(batched, sum(log_joint(w[i, 0], b[i, 0]) for i in range(5)))

    def test_predictive_of_a_point_mass(self):
        script = load("bayesian_regression")
        X, y = torch.randn(50, 2), (torch.rand(50) < 0.5).float()
        theta = torch.tensor([[1.0, -2.0, 0.5]]).expand(3, 3)  # three identical draws
        p = torch.sigmoid(X @ theta[0, :2] + theta[0, 2])
        metrics = script.predictive(theta, X, y)
        assert metrics["accuracy"] == pytest.approx(((p > 0.5).float() == y).float().mean().item())
        assert metrics["log_lik"] == pytest.approx(torch.distributions.Bernoulli(p).log_prob(y).mean().item(), rel=1e-5)


class TestNflowsStack:
    def test_smoke(self, tmp_path):
        metrics = load("nflows_stack").main(
            ["--steps", "2", "--max-images", "100", "--batch-size", "32", "--layers", "1", "--hidden", "16",
             "--cnf-hidden", "16", "--tol", "1e-3", "--out", str(tmp_path)]
        )
        check_outputs(tmp_path, "samples.png", metrics)
        assert metrics["MAF+CNF"]["parameters"] > metrics["MAF"]["parameters"]

    def test_logit_log_det_and_inverse(self):
        script = load("nflows_stack")
        u = torch.rand(3, script.DIM, dtype=torch.float64) * 16 / 17  # pixel values below 16, unclamped
        s, ladj = script.to_logit(u)
        for i in range(3):
            jac = torch.autograd.functional.jacobian(lambda v: script.to_logit(v)[0], u[i])
            torch.testing.assert_close(ladj[i], torch.linalg.slogdet(jac)[1])
        torch.testing.assert_close(script.from_logit(s), u * script.LEVELS)

    def test_dequantised_pixels_fill_their_bins(self):
        script = load("nflows_stack")
        pixels = torch.randint(0, script.LEVELS, (1000, 4)).float()
        u = script.dequantise(pixels, torch.Generator().manual_seed(0))
        assert torch.equal((u * script.LEVELS).floor(), pixels)


class TestConditionalDensity:
    def test_smoke(self, tmp_path):
        metrics = load("conditional_density").main(
            ["--steps", "2", "--n-train", "64", "--n-test", "32", "--hidden", "8", "--tol", "1e-3",
             "--out", str(tmp_path)]
        )
        check_outputs(tmp_path, "conditionals.png", metrics)
        # the same field, seed and minibatches through either adapter: the same conditional density
        pyro_nll, nflows_nll = (metrics[k]["test_nll"] for k in ("Pyro ConditionalCNF", "nflows CNFTransform"))
        assert pyro_nll == pytest.approx(nflows_nll, abs=1e-4)

    @pytest.mark.parametrize("x", [-1.0, 0.3, 2.0])
    def test_true_conditional_is_normalised(self, x):
        script = load("conditional_density")
        axis = torch.linspace(-6, 6, 601, dtype=torch.float64)
        g2, g1 = torch.meshgrid(axis, axis, indexing="ij")
        y = torch.stack([g1, g2], -1).reshape(-1, 2)
        p = script.true_log_prob(y, torch.full((len(y), 1), x, dtype=torch.float64)).exp().reshape(601, 601)
        assert torch.trapezoid(torch.trapezoid(p, axis), axis).item() == pytest.approx(1.0, abs=1e-4)

    def test_sampler_and_closed_form_agree_on_the_second_moment(self):
        # E[|y|^2 | x] = r(x)^2 + 2 s^2 for the law the sampler draws from ...
        script = load("conditional_density")
        y, x = script.sample(40000, torch.Generator().manual_seed(0))
        residual = y.pow(2).sum(-1) - (script.radius(x).squeeze(-1) ** 2 + 2 * script.NOISE**2)
        assert residual.mean().abs() < 4 * residual.std() / 200
        # ... and for the density written in closed form, by quadrature at x = 1.5
        axis = torch.linspace(-6, 6, 601, dtype=torch.float64)
        g2, g1 = torch.meshgrid(axis, axis, indexing="ij")
        grid = torch.stack([g1, g2], -1).reshape(-1, 2)
        p = script.true_log_prob(grid, torch.full((len(grid), 1), 1.5, dtype=torch.float64)).exp()
        moment = torch.trapezoid(torch.trapezoid((p * grid.pow(2).sum(-1)).reshape(601, 601), axis), axis)
        assert moment.item() == pytest.approx(2.25**2 + 2 * script.NOISE**2, rel=1e-4)


class TestSbiPosterior:
    def test_smoke(self, tmp_path):
        pytest.importorskip("sbi")
        script = load("sbi_posterior")
        metrics = script.main(
            ["--budget", "0.5", "--simulations", "300", "--observations", "1", "--posterior-samples", "100",
             "--hidden", "8", "--fm-hidden", "8", "8", "--out", str(tmp_path)]
        )
        check_outputs(tmp_path, "posteriors.png", metrics)
        for method in script.METHODS:
            assert 0.3 <= metrics[method]["c2st_mean"] <= 1 and metrics[method]["sample_cpu_s"] >= 0

    def test_exact_posterior_is_normalised_and_its_sampler_agrees(self):
        script = load("sbi_posterior")
        g = torch.Generator().manual_seed(0)
        x_o = script.simulate(torch.tensor([[0.2, -0.6]]), g)
        accept = script.acceptance(x_o, g)
        axis = torch.linspace(-1, 1, 1501, dtype=torch.float64)
        g1, g2 = torch.meshgrid(axis, axis, indexing="ij")
        p = script.reference_log_prob(torch.stack([g1, g2], -1), x_o.double(), accept).exp()
        assert torch.trapezoid(torch.trapezoid(p, axis), axis).item() == pytest.approx(1.0, abs=5e-3)
        mean = [torch.trapezoid(torch.trapezoid(p * c, axis), axis).item() for c in (g1, g2)]
        draws = script.reference_samples(x_o, 50_000, g)
        assert draws.abs().max() <= 1
        torch.testing.assert_close(draws.mean(0).double(), torch.tensor(mean, dtype=torch.float64), atol=0.02, rtol=0)

    def test_reference_draws_simulate_back_to_the_observation(self):
        # every exact draw solves x_o = p + shift(theta) for one moon point p
        script = load("sbi_posterior")
        g = torch.Generator().manual_seed(1)
        x_o = script.simulate(torch.tensor([[0.5, 0.1]]), g)
        theta = script.reference_samples(x_o, 200, g)
        q = x_o - script._shift(theta) - torch.tensor([script.SHIFT, 0.0])
        assert (q[:, 0] > 0).all() and ((q.norm(dim=-1) - script.R_MEAN).abs() < 6 * script.R_STD).all()

    def test_c2st_separates_what_differs(self):
        script = load("sbi_posterior")
        a, b = torch.randn(400, 2), torch.randn(400, 2)
        assert script.c2st(a, b) < 0.6 < 0.9 < script.c2st(a, b + 3)


class TestNeutraHmc:
    def test_smoke(self, tmp_path):
        metrics = load("neutra_hmc").main(
            ["--dim", "3", "--steps", "3", "--particles", "4", "--hidden", "8", "--warmup", "10", "--samples", "30",
             "--max-tree-depth", "3", "--solvers", "rk4x2", "--out", str(tmp_path)]
        )
        check_outputs(tmp_path, "samples.png", metrics)
        assert {"plain NUTS", "NeuTra CNF, rk4x2"} <= set(metrics)
        assert metrics["NeuTra CNF, rk4x2"]["solves_per_draw"] >= 1

    def test_log_density_is_the_models(self):
        script = load("neutra_hmc")
        trace = pyro.poutine.trace(script.model).get_trace(2)
        z1, z2 = trace.nodes["z1"]["value"], trace.nodes["z2"]["value"][0]
        torch.testing.assert_close(script.log_density(z1, z2), trace.log_prob_sum())

    def test_solver_names_and_settings(self):
        script = load("neutra_hmc")
        assert script.parse_solver("rk4x4") == {"method": "rk4", "steps": 4}
        assert script.parse_solver("dopri5x2") == {"method": "dopri5", "steps": 2}
        assert script.parse_solver("dopri5@1e-3") == {"method": "dopri5", "steps": None, "rtol": 1e-3, "atol": 1e-3}
        with pytest.raises(ValueError):
            script.parse_solver("rk4 x4")
        flow = pyro_cnf.ContinuousFlow(pyro_cnf.ODENet(2, (8,)))
        with script.solver(flow, script.parse_solver("rk4x4")):
            assert (flow.method, flow.steps) == ("rk4", 4)
        assert (flow.method, flow.steps) == ("dopri5", None)
        with pytest.raises(ValueError), script.solver(flow, {"method": "rk4", "steps": None}):
            pass
        assert flow.method == "dopri5"
