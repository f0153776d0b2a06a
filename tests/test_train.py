"""Training: the helpers, the objectives, and the one resumable, checkpointed Trainer."""

import datetime
import math
import subprocess
import sys
import warnings
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import numpy
import pytest
import torch
from torch import nn

from pyro_cnf import CNFTransform, ContinuousFlow, ODENet, SolverError, default_flow
from pyro_cnf.flow_matching import flow_matching_loss
from pyro_cnf.presets import PRESETS, Preset
from pyro_cnf.training import (
    SCHEDULES,
    CheckpointError,
    Checkpointing,
    Evaluation,
    FlowMatching,
    MaximumLikelihood,
    Trainer,
    TrainingError,
    cosine_decay,
    load_checkpoint,
    nll,
    progress_loop,
    step_seed,
)
from tests.fields import NoDivergence, QuadraticField

#: ODENet's gains off: a field for fast fixed grids, built without a preset.
GAINS_OFF = {"input_gain": 1.0, "time_gain": 1.0, "hidden_gain": 1.0}


def small_flow(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("method", "rk4")
    kw.setdefault("steps", 2)
    # fast fixed grids, so no gains (Trainer warns of them there)
    return ContinuousFlow(ODENet(2, (8, 8), zero_init=False, **GAINS_OFF), **kw)


def gaussian_batches(step):
    g = torch.Generator().manual_seed(step_seed(0, step))
    return torch.randn(32, 2, generator=g) * 0.5 + 1.0


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


class ConditionalGaussian(nn.Module):
    """p(x | c) = N(x; W c + b, diag(exp(2 s))): not a flow, trained through log_prob(x, c)."""

    def __init__(self, d=2, c=1):
        super().__init__()
        self.mean = nn.Linear(c, d)
        self.log_scale = nn.Parameter(torch.zeros(d))

    def log_prob(self, x, context):
        return torch.distributions.Normal(self.mean(context), self.log_scale.exp()).log_prob(x).sum(-1)


def test_maximum_likelihood_on_a_fixed_grid_warns_of_the_gains_only():
    gained = ContinuousFlow(ODENet(2, (8,)), method="rk4", steps=4)
    with pytest.warns(UserWarning, match="gains .* fixed grid of 4 steps.*preset='density_fixed_grid'"):
        Trainer(gained, gaussian_batches)
    quiet = [
        (default_flow(2, (8,), preset="demo"), MaximumLikelihood()),  # its 4-step grid without gains
        (ContinuousFlow(ODENet(2, (8,))), MaximumLikelihood()),  # adaptive
        (gained, FlowMatching()),  # no solve while training
    ]
    for model, objective in quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Trainer(model, gaussian_batches, objective)


def test_trainer_takes_lr_and_schedule_from_the_given_preset_the_flows_or_density():
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow

    fm = default_flow(2, (8,), preset="flow_matching")
    in_nflows = Flow(CNFTransform(2, (8,), preset="density_high_lr"), StandardNormal([2]))
    mine = Preset("mine", {}, lr=0.3, lr_range=(0.1, 0.5), reason="a test's", training={"schedule": "cosine"})
    cases = [
        (Trainer(fm, gaussian_batches, lr=0.05, schedule="constant"), 0.05, "constant"),  # explicit wins
        (Trainer(fm, gaussian_batches, lr=0.05), 0.05, PRESETS["flow_matching"].training["schedule"]),
        (Trainer(fm, gaussian_batches, preset="density_high_lr"), PRESETS["density_high_lr"].lr, "constant"),
        (Trainer(small_flow(), gaussian_batches, preset=mine), 0.3, "cosine"),
        (Trainer(fm, gaussian_batches), PRESETS["flow_matching"].lr, "cosine"),  # the flow's preset
        (Trainer(in_nflows, gaussian_batches), 1e-2, "constant"),  # the flow inside nflows' Flow
        (Trainer(small_flow(), gaussian_batches), PRESETS["density"].lr, "constant"),  # built without a preset
    ]
    for trainer, lr, schedule in cases:
        assert (trainer.lr, trainer.factor) == (lr, SCHEDULES[schedule])
    with pytest.raises(ValueError, match=r"Trainer: unknown preset 'fast'; expected one of \[.*'density_high_lr'"):
        Trainer(fm, gaussian_batches, lr=0.05, schedule="constant", preset="fast")  # checked though unused
    custom = default_flow(2, (8,), preset=mine)
    with pytest.raises(ValueError, match="built from the preset 'mine', which is not in .*pass that Preset"):
        Trainer(custom, gaussian_batches)
    assert Trainer(custom, gaussian_batches, preset=mine).lr == 0.3


def test_import_pyro_cnf_leaves_training_and_the_toy_layer_alone():
    # the layers above the core load only when asked for
    code = "import sys, pyro_cnf; print(sorted(m for m in sys.modules if m.startswith(('pyro_cnf', 'matplotlib'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pyro_cnf.training" not in loaded and "pyro_cnf.toy" not in loaded and "matplotlib" not in loaded


# --- progress_loop, nll, step_seed, the row check -----------------------------------------------


def test_progress_loop_runs_start_to_steps_and_returns_metrics():
    seen = []
    history = progress_loop(lambda i: seen.append(i) or {"i": i, "half": i / 2}, 7, start=3, disable=True)
    assert seen == [3, 4, 5, 6]
    assert history == [{"i": float(i), "half": i / 2} for i in seen]
    assert progress_loop(lambda i: {}, 3, start=3, disable=True) == []
    with pytest.raises(ValueError, match="steps must be >= start"):
        progress_loop(lambda i: {}, 2, start=3)


def test_progress_loop_stops_when_the_step_returns_none():
    assert len(progress_loop(lambda i: None if i == 5 else {"i": i}, None, start=2, disable=True)) == 3


def test_nll_matches_manual_computation_in_any_batching():
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    normal = torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), scale)
    data = torch.randn(103, 2, dtype=torch.float64) * scale
    manual = -normal.log_prob(data).sum(-1).mean().item()
    for batch_size in (1, 10, 103, 4096):
        value = nll(lambda x: normal.log_prob(x).sum(-1), data, batch_size=batch_size)
        assert value == pytest.approx(manual, abs=1e-12)


def test_nll_passes_context_row_by_row():
    data, context = torch.zeros(5, 1), torch.arange(5.0).unsqueeze(-1)
    # log p(x | c) = -c: the NLL is the mean context
    assert nll(lambda x, c: -c.squeeze(-1), data, context, batch_size=2) == pytest.approx(2.0)


def test_nll_is_exact_and_repeatable_in_training_mode():
    # A field without a closed-form trace at d > AUTO_EXACT_MAX_DIM trains with
    # Hutchinson; nll() of the flow left in train mode must still be the exact, fixed number.
    torch.manual_seed(0)
    flow = ContinuousFlow(NoDivergence(ODENet(8, (16,), zero_init=False)), rtol=1e-6, atol=1e-6)
    data = torch.randn(20, 8)
    first, second = nll(flow, data), nll(flow, data)
    assert first == second and flow.training
    exact = ContinuousFlow(flow.vector_field, trace="exact", rtol=1e-6, atol=1e-6)
    assert first == pytest.approx(nll(exact, data), abs=1e-6)


def test_step_seed_streams_are_distinct_and_fixed():
    seeds = {step_seed(s, i) for s in range(5) for i in range(100)}
    assert len(seeds) == 500 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(3, 7) == step_seed(3, 7)


@pytest.mark.parametrize(
    "x, context, error, message",
    [
        (torch.zeros(3), None, ValueError, r"data must have shape \(N >= 1, d\), got \(3,\)"),
        (torch.zeros(0, 2), None, ValueError, r"shape \(N >= 1, d\), got \(0, 2\)"),
        ([[1.0]], None, TypeError, r"data must be a torch.Tensor, got list"),
        (torch.zeros(3, 1), torch.zeros(2, 1), ValueError, r"context must have shape \(3, c\), one row per row of data"),
        (torch.full((3, 1), math.nan), None, ValueError, r"data contains NaN or inf"),
    ],
)
def test_the_one_row_check(x, context, error, message):
    # the shared input checker (pyro_cnf.checks), as for the flow and flow matching
    with pytest.raises(error, match=message):
        nll(lambda x, c=None: x.sum(-1), x, context)


# --- objectives ------------------------------------------------------------------------------------


def test_maximum_likelihood_trains_any_model_with_log_prob_and_context():
    # x | c ~ N(2c - 1, 0.3^2): the trainer needs nothing but log_prob(x, context)
    def batches(step):
        g = torch.Generator().manual_seed(step_seed(0, step))
        c = torch.rand(128, 1, generator=g)
        return 2 * c - 1 + 0.3 * torch.randn(128, 1, generator=g), c

    torch.manual_seed(0)
    model = ConditionalGaussian(d=1)
    Trainer(model, batches, lr=5e-2, disable=True).fit(300)
    assert model.mean.weight.item() == pytest.approx(2.0, abs=0.15)
    assert model.mean.bias.item() == pytest.approx(-1.0, abs=0.1)
    assert model.log_scale.exp().item() == pytest.approx(0.3, abs=0.05)


def test_maximum_likelihood_trains_an_nflows_flow():
    from nflows.flows import MaskedAutoregressiveFlow

    torch.manual_seed(0)
    maf = MaskedAutoregressiveFlow(features=2, hidden_features=8, num_layers=1, num_blocks_per_layer=1)
    trainer = Trainer(maf, gaussian_batches, lr=1e-2, disable=True)
    history = trainer.fit(30)
    assert set(history[0]) == {"loss", "nll"} and history[-1]["loss"] < history[0]["loss"] - 0.5


def test_maximum_likelihood_of_a_flow_reports_nfe_and_rnode_penalties():
    objective = MaximumLikelihood(lambda_kinetic=0.1, lambda_jacobian=0.2)
    flow = small_flow(regularize=True)
    x = gaussian_batches(0)
    loss, metrics = objective.loss(flow, x, None)
    assert list(metrics) == ["loss", "nll", "nfe", "kinetic", "jacobian"] and metrics["nfe"] == 8  # rk4, 2 steps
    assert loss.item() == pytest.approx((metrics["nll"] + 0.1 * metrics["kinetic"] + 0.2 * metrics["jacobian"]).item())
    assert metrics["nll"].item() == pytest.approx(-flow.log_prob(x).mean().item(), rel=1e-5)


def test_objectives_check_their_settings_and_models():
    with pytest.raises(ValueError, match="lambda_kinetic must be a finite number >= 0"):
        MaximumLikelihood(lambda_kinetic=-1.0)
    with pytest.raises(ValueError, match="regularize=True, got regularize=False"):
        MaximumLikelihood(lambda_jacobian=0.1).metrics(small_flow())
    with pytest.raises(TypeError, match="needs a model with log_prob"):
        MaximumLikelihood().metrics(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="path must be one of"):
        FlowMatching(path="straight")
    with pytest.raises(ValueError, match="coupling must be one of"):
        FlowMatching(coupling="sinkhorn")
    with pytest.raises(ValueError, match="sigma_min must be in"):
        FlowMatching(sigma_min=1.0)
    with pytest.raises(ValueError, match="t_power must be"):
        FlowMatching(t_power=0)
    with pytest.raises(TypeError, match="vector field of a ContinuousFlow"):
        FlowMatching().metrics(ConditionalGaussian())


def test_maximum_likelihood_refuses_a_log_prob_of_the_wrong_shape():
    class Wrong(ConditionalGaussian):
        def log_prob(self, x):
            return super().log_prob(x, torch.zeros(len(x), 1)).unsqueeze(-1)

    with pytest.raises(ValueError, match=r"Wrong.log_prob returned \(32, 1\) for 32 rows; expected \(32,\)"):
        Trainer(Wrong(), gaussian_batches, disable=True).fit(1)


@pytest.mark.parametrize("path", ["ot", "cosine"])
@pytest.mark.parametrize("coupling", ["independent", "minibatch_ot"])
def test_flow_matching_is_flow_matching_loss_with_its_options(path, coupling):
    flow = small_flow(T=2.0)
    x = gaussian_batches(0)
    objective = FlowMatching(path=path, coupling=coupling, sigma_min=0.01)
    torch.manual_seed(3)
    loss, _ = objective.loss(flow, *objective.draw(flow, x, None))
    torch.manual_seed(3)  # the same draws, in the same order
    expected = flow_matching_loss(flow.vector_field, x, path=path, coupling=coupling, sigma_min=0.01, T=2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_flow_matching_t_power_puts_the_times_near_the_data():
    flow = small_flow(T=2.0)
    torch.manual_seed(0)
    _, _, t, _ = FlowMatching(t_power=3.0).draw(flow, torch.zeros(5, 2), None)
    torch.manual_seed(0)
    assert torch.equal(t, 2.0 * torch.rand(5, 1).pow(3.0))


# --- Trainer -----------------------------------------------------------------------------------


def test_flow_log_prob_is_the_change_of_variables():
    flow = small_flow(method="dopri5", steps=None, rtol=1e-7, atol=1e-7).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    z, ladj = flow(x)
    manual = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) + ladj
    assert torch.allclose(flow.log_prob(x), manual, atol=1e-12)


RESUMABLE = {
    "mle": ({}, {}),
    "rnode": ({"regularize": True}, {"objective": MaximumLikelihood(0.1, 0.1)}),
    "flow_matching": ({}, {"objective": FlowMatching()}),
    # the recipe's options: cosine path, minibatch OT, cosine schedule, weight average
    "fm_recipe": ({}, {"objective": FlowMatching(path="cosine", coupling="minibatch_ot"), "schedule": "cosine",
                       "ema": 0.9}),
}


@pytest.mark.parametrize("name", RESUMABLE)
def test_resumed_run_repeats_the_uninterrupted_run(tmp_path, name):
    flow_kw, trainer_kw = RESUMABLE[name]

    def trainer(path, seed, batches=gaussian_batches):
        return Trainer(small_flow(seed, **flow_kw), batches, lr=1e-2, checkpoint=Checkpointing(path, every=4),
                       disable=True, **trainer_kw)  # fmt: skip

    whole = trainer(tmp_path / "whole.pt", seed=0)
    whole.fit(12)

    def interrupted(step):
        if step == 7:
            raise KeyboardInterrupt
        return gaussian_batches(step)

    first = trainer(tmp_path / "part.pt", seed=0, batches=interrupted)
    with pytest.raises(KeyboardInterrupt):
        first.fit(12)
    # a fresh process: other initial weights and random state, everything comes from the file
    torch.manual_seed(123)
    second = trainer(tmp_path / "part.pt", seed=1)
    assert second.resume() and second.step == 4
    second.fit(12)
    # the probes of the RNODE penalty and flow matching's (t, noise) are random: the
    # checkpointed torch state makes them repeat as well
    assert [h["loss"] for h in second.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-6)
    assert torch.allclose(flat(second.model), flat(whole.model), atol=1e-6)
    assert torch.allclose(flat(second.eval_model), flat(whole.eval_model), atol=1e-6)
    assert len(second.history) == 12 and [h["step"] for h in second.history] == list(range(12))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_resumed_run_takes_the_new_learning_rate(tmp_path, schedule):
    path = tmp_path / "c.pt"
    Trainer(small_flow(), gaussian_batches, lr=0.5, checkpoint=Checkpointing(path), disable=True).fit(2)
    resumed = Trainer(small_flow(), gaussian_batches, lr=1e-5, schedule=schedule, checkpoint=Checkpointing(path),
                      disable=True)
    assert resumed.resume()
    before = flat(resumed.model).clone()
    resumed.fit(3)
    # Adam's first steps move each weight by about lr: 1e-5, not the checkpoint's 0.5
    assert (flat(resumed.model) - before).abs().max() < 1e-4
    assert all(group["lr"] <= 1e-5 for group in resumed.optimizer.param_groups)


@pytest.mark.parametrize("value", [
    Path("x"), numpy.float64(1.0), numpy.zeros(2), datetime.date(2026, 1, 1), Fraction(1, 3), range(3),
    frozenset({1}), defaultdict(int), {1: "int key"},
], ids=lambda v: type(v).__name__)
def test_a_config_the_checkpoint_could_not_load_is_refused_when_made(value):
    # Regression: saving pickled anything, loading (weights_only) refused it: progress out of reach
    with pytest.raises(TypeError, match=r"config\['bad'\].*(JSON values only|keys are strings)"):
        Checkpointing("c.pt", config={"bad": value})


def test_every_json_config_round_trips(tmp_path):
    config = {"lr": 1e-3, "hidden": [64, 64], "pair": (1, 2), "on": True, "none": None, "nested": {"a": ["b"]}}
    path = tmp_path / "c.pt"
    Trainer(small_flow(), gaussian_batches, checkpoint=Checkpointing(path, config=config), disable=True).fit(1)
    assert load_checkpoint(path, Trainer.STATE_KEYS)["config"] == config


def test_checkpoint_holds_model_optimizer_step_rng_and_config(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint = Checkpointing(path, every=3, config={"dataset": "gauss", "hidden": [8, 8]})
    trainer = Trainer(small_flow(), gaussian_batches, ema=0.5, checkpoint=checkpoint, disable=True)
    trainer.fit(5)
    state = load_checkpoint(path, Trainer.STATE_KEYS)
    assert state["step"] == 5 and state["config"] == {"dataset": "gauss", "hidden": [8, 8]}
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state())
    assert state["optimizer"]["state"][0]["step"] == 5
    assert state["ema"].keys() == state["model"].keys() and state["cpu_seconds"] == trainer.cpu_seconds > 0
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "c.pt"
    Trainer(small_flow(), gaussian_batches, checkpoint=Checkpointing(path), disable=True).fit(1)
    other = Trainer(ContinuousFlow(ODENet(2, (4,))), gaussian_batches, checkpoint=Checkpointing(path), disable=True)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: it does not fit this trainer: .*hidden_dims"):
        other.resume()
    averaged = Trainer(small_flow(), gaussian_batches, ema=0.5, checkpoint=Checkpointing(path), disable=True)
    with pytest.raises(CheckpointError, match=r"the state lacks a weight average \(ema\)"):
        averaged.resume()


def test_periodic_held_out_nll_is_the_exact_nll_of_the_scorer():
    eval_data = gaussian_batches(-1)
    exact = small_flow(method="dopri5", steps=None, rtol=1e-6, atol=1e-6)
    scorer = lambda flow: ContinuousFlow(flow.vector_field, rtol=1e-6, atol=1e-6)  # noqa: E731
    trainer = Trainer(small_flow(), gaussian_batches, evaluation=Evaluation(eval_data, every=2, scorer=scorer),
                      disable=True)  # fmt: skip
    trainer.fit(4)
    assert [("eval_nll" in h) for h in trainer.history] == [False, True, False, True]
    exact.load_state_dict(trainer.model.state_dict())
    assert trainer.history[-1]["eval_nll"] == pytest.approx(nll(exact, eval_data), abs=1e-4)
    assert trainer.evaluate() == trainer.history[-1]["eval_nll"]
    assert trainer.model.training  # evaluation leaves the training mode as it was


def test_evaluate_passes_the_context():
    model = ConditionalGaussian()
    data, context = torch.randn(7, 2), torch.randn(7, 1)
    trainer = Trainer(model, lambda step: (data, context), evaluation=Evaluation(data, context), disable=True)
    assert trainer.evaluate() == pytest.approx(-model.log_prob(data, context).mean().item(), rel=1e-6)


def test_cosine_schedule_spans_the_steps_and_a_callable_schedule_sees_the_fraction_done():
    lrs = []
    record = lambda trainer, metrics: lrs.append(trainer.optimizer.param_groups[0]["lr"])  # noqa: E731
    Trainer(small_flow(), gaussian_batches, lr=0.1, schedule="cosine", callbacks=[record], disable=True).fit(4)
    assert lrs == pytest.approx([0.1 * cosine_decay(i / 4) for i in range(4)])
    seen = []
    trainer = Trainer(small_flow(), gaussian_batches, schedule=lambda done: seen.append(done) or 1.0, disable=True)
    trainer.fit(5)
    assert seen == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])


def test_cpu_budget_counts_the_steps_alone_and_drives_the_schedule(monkeypatch):
    # A fake process clock: drawing data costs 100 s of it, a step 1 s. A budget of 3 s is
    # three steps, whatever the data cost (no real timing in a test).
    import pyro_cnf.training.trainer as trainer_module

    clock = [0.0]
    monkeypatch.setattr(trainer_module.time, "process_time", lambda: clock[0])

    class Timed(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = nn.Parameter(torch.zeros(2))

        def log_prob(self, x):
            clock[0] += 1.0
            return -(x - self.loc).pow(2).sum(-1)

    def slow(step):
        clock[0] += 100.0
        return gaussian_batches(step)

    seen = []
    trainer = Trainer(Timed(), slow, schedule=lambda done: seen.append(done) or 1.0, disable=True)
    trainer.fit(cpu_seconds=3.0)
    assert trainer.step == 3 and trainer.cpu_seconds == 3.0
    assert seen == [0.0, 1 / 3, 2 / 3]  # the schedule follows the budget spent


def test_a_callback_stops_training_after_its_step(tmp_path):
    path = tmp_path / "c.pt"
    stop_at_3 = lambda trainer, metrics: trainer.step == 3  # noqa: E731
    trainer = Trainer(small_flow(), gaussian_batches, checkpoint=Checkpointing(path, every=100), callbacks=[stop_at_3],
                      disable=True)  # fmt: skip
    assert len(trainer.fit(10)) == 3 and trainer.step == 3
    assert load_checkpoint(path, Trainer.STATE_KEYS)["step"] == 3  # saved at the end, as always


def test_ema_is_the_exponential_moving_average_of_the_weights():
    snapshots = []
    trainer = Trainer(small_flow(), gaussian_batches, lr=1e-2, ema=0.8,
                      callbacks=[lambda t, m: snapshots.append(flat(t.model))], disable=True)  # fmt: skip
    average = flat(trainer.model)
    trainer.fit(5)
    for weights in snapshots:
        average = 0.8 * average + 0.2 * weights
    assert torch.allclose(flat(trainer.eval_model), average, atol=1e-6)
    assert not any(p.requires_grad for p in trainer.eval_model.parameters())


def blowing_up_at(*bad_steps):
    def batches(step):
        x = 0.1 * gaussian_batches(step)
        return x + 100.0 if step in bad_steps else x

    return batches


def test_solver_error_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    flow = ContinuousFlow(QuadraticField(), rtol=1e-5, atol=1e-5)
    trainer = Trainer(flow, blowing_up_at(6), lr=1e-2, checkpoint=Checkpointing(path, every=5), disable=True)
    with pytest.raises(TrainingError, match="solver failed at step 6.*checkpoint of step 5") as info:
        trainer.fit(10)
    assert isinstance(info.value.__cause__, SolverError)
    assert info.value.step == 6 and info.value.checkpoint_step == 5
    state = load_checkpoint(path, Trainer.STATE_KEYS)
    assert state["step"] == 5 and len(state["history"]) == 5
    assert list(tmp_path.iterdir()) == [path]


def test_solver_error_skip_drops_the_batch_and_counts_it(tmp_path):
    flow = ContinuousFlow(QuadraticField(), rtol=1e-5, atol=1e-5)
    before = {}

    def watch(step):
        before[step] = flow.vector_field.w.item()
        return blowing_up_at(3)(step)

    trainer = Trainer(flow, watch, lr=1e-2, on_solver_error="skip", checkpoint=Checkpointing(tmp_path / "c.pt"),
                      disable=True)  # fmt: skip
    trainer.fit(6)
    assert trainer.step == 6 and trainer.skipped == 1
    assert trainer.history[3] == {"step": 3, "skipped": 1.0}
    assert before[4] == before[3]  # no update from the dropped batch
    assert load_checkpoint(tmp_path / "c.pt", Trainer.STATE_KEYS)["skipped"] == 1


def test_skip_stops_after_skip_limit_failures_in_a_row():
    # "skip" on a diverging run must not go on forever. Isolated failures are
    # skipped; skip_limit of them in a row stop training.
    flow = ContinuousFlow(QuadraticField(), rtol=1e-5, atol=1e-5)
    trainer = Trainer(flow, blowing_up_at(1, 3, 4, *range(6, 30)), on_solver_error="skip", disable=True)
    trainer.skip_limit = 3
    with pytest.raises(TrainingError, match=r"failed at 3 steps in a row, steps 6 to 8 \(the limit of") as info:
        trainer.fit(30)
    assert info.value.step == 8 and trainer.skipped == 6 and trainer.step == 8


def test_failed_periodic_evaluation_stops_or_is_recorded_as_nan():
    flow = ContinuousFlow(QuadraticField(), rtol=1e-5, atol=1e-5)
    evaluation = Evaluation(torch.full((4, 2), 100.0), every=2)
    with pytest.raises(TrainingError, match="failed evaluating the NLL after step 2"):
        Trainer(flow, blowing_up_at(), evaluation=evaluation, disable=True).fit(3)
    trainer = Trainer(flow, blowing_up_at(), evaluation=evaluation, on_solver_error="skip", disable=True)
    trainer.fit(3)
    assert math.isnan(trainer.history[1]["eval_nll"]) and trainer.skipped == 0


def test_non_finite_loss_stops_without_overwriting_the_checkpoint(tmp_path):
    path = tmp_path / "c.pt"

    def batches(step):  # |z|^2 overflows float32 at step 4
        return torch.full((4, 2), 1e30) if step == 4 else gaussian_batches(step)

    trainer = Trainer(small_flow(), batches, checkpoint=Checkpointing(path, every=3), disable=True)
    with pytest.raises(TrainingError, match=r"loss is (inf|nan) at step 4; stopped without saving.*step 3 in") as info:
        trainer.fit(8)
    assert info.value.step == 4 and info.value.checkpoint_step == 3
    saved = load_checkpoint(path, Trainer.STATE_KEYS)
    assert saved["step"] == 3 and len(saved["history"]) == 3
    # the model has moved on by one step since the checkpoint, which still holds step 3
    reloaded = small_flow(seed=5)
    reloaded.load_state_dict(saved["model"])
    assert not torch.equal(flat(reloaded), flat(trainer.model))
    assert list(tmp_path.iterdir()) == [path]


def test_trainer_bad_settings(tmp_path):
    flow = small_flow()
    with pytest.raises(TypeError, match="objective must be an Objective"):
        Trainer(flow, gaussian_batches, "flow_matching")
    with pytest.raises(ValueError, match="regularize=True"):
        Trainer(flow, gaussian_batches, MaximumLikelihood(lambda_kinetic=0.1))
    with pytest.raises(ValueError, match="on_solver_error"):
        Trainer(flow, gaussian_batches, on_solver_error="retry")
    with pytest.raises(ValueError, match="schedule must be one of"):
        Trainer(flow, gaussian_batches, schedule="linear")
    with pytest.raises(ValueError, match=r"ema must be in \[0, 1\)"):
        Trainer(flow, gaussian_batches, ema=1.0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        Trainer(flow, gaussian_batches, lr=float("nan"))
    with pytest.raises(TypeError, match="torch module with parameters"):
        Trainer(nn.Identity(), gaussian_batches)
    with pytest.raises(ValueError, match="every must be >= 1"):
        Checkpointing(tmp_path / "c.pt", every=0)
    with pytest.raises(ValueError, match=r"the evaluation data must have shape \(N >= 1, d\)"):
        Evaluation(torch.zeros(0, 2))
    trainer = Trainer(flow, gaussian_batches, disable=True)
    with pytest.raises(ValueError, match="fit needs a budget"):
        trainer.fit()
    trainer.fit(2)
    with pytest.raises(ValueError, match=r"steps \(1\) is below the steps already done \(2\)"):
        trainer.fit(1)
    with pytest.raises(ValueError, match=r"batches\(0\) must have shape \(N >= 1, d\), got \(2,\)"):
        Trainer(flow, lambda step: torch.zeros(2), disable=True).fit(1)
    with pytest.raises(ValueError, match=r"or a pair \(x, context\), got 3 items"):
        Trainer(flow, lambda step: (torch.zeros(2, 2),) * 3, disable=True).fit(1)


def test_unwritable_checkpoint_fails_before_the_first_step(tmp_path):
    # Regression: these used to surface only at the first save, after training had started
    flow = small_flow()
    with pytest.raises(FileNotFoundError, match="the directory .*missing does not exist"):
        Trainer(flow, gaussian_batches, checkpoint=Checkpointing(tmp_path / "missing" / "c.pt"))
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(IsADirectoryError, match="dir.pt: it is a directory"):
        Trainer(flow, gaussian_batches, checkpoint=Checkpointing(tmp_path / "dir.pt"))


def test_adjoint_backward_failure_stops_or_skips(tmp_path):
    def failing_adjoint():
        torch.manual_seed(0)
        net = ODENet(2, (8, 8), zero_init=False)
        return ContinuousFlow(net, adjoint=True, rtol=1e-7, atol=1e-7, train_rtol=None, train_atol=None, adjoint_options={"max_num_steps": 2})

    trainer = Trainer(failing_adjoint(), gaussian_batches, checkpoint=Checkpointing(tmp_path / "c.pt"), disable=True)
    with pytest.raises(TrainingError, match="solver failed at step 0.*adjoint \\(backward\\) solve") as info:
        trainer.fit(2)
    assert isinstance(info.value.__cause__, SolverError)
    flow = failing_adjoint()
    start = [p.detach().clone() for p in flow.parameters()]
    trainer = Trainer(flow, gaussian_batches, on_solver_error="skip", disable=True)
    trainer.fit(2)
    assert trainer.skipped == 2 and trainer.step == 2
    assert all(torch.equal(a, b) for a, b in zip(start, flow.parameters()))


def test_a_rate_outside_the_presets_range_names_the_preset_for_it():
    batches = lambda step: torch.randn(8, 2)  # noqa: E731
    with pytest.warns(UserWarning, match=r"lr=0.01 is outside .* preset 'density' .* preset='density_high_lr'"):
        Trainer(default_flow(2, (8,)), batches, lr=1e-2, disable=True)
    with pytest.warns(UserWarning, match=r"preset 'guide' was tuned at \(0.001-0.01\); its own rate is 0.005"):
        Trainer(default_flow(2, (8,), preset="guide"), batches, lr=0.1, disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(default_flow(2, (8,)), batches, lr=1e-3, disable=True)  # in range
        Trainer(ContinuousFlow(ODENet(2, (8,))), batches, lr=1e-2, disable=True)  # no preset: no advice


def test_a_model_moved_after_the_first_fit_trains_on():
    # Regression: model.double() after fit left Adam's moments in float32: a raw dtype error
    flow = small_flow()
    trainer = Trainer(flow, gaussian_batches, lr=1e-2, ema=0.5, disable=True)
    trainer.fit(2)
    flow.double()
    trainer.fit(4)
    moments = [v for state in trainer.optimizer.state.values() for k, v in state.items() if k != "step"]
    assert moments and all(v.dtype == torch.float64 for v in moments)
    assert all(p.dtype == torch.float64 for p in trainer.eval_model.parameters())
    assert math.isfinite(trainer.history[-1]["loss"])


@pytest.mark.parametrize("steps", [2.5, "3", True])
def test_fit_refuses_a_step_count_that_is_not_an_int(steps):
    with pytest.raises(TypeError, match="fit: steps must be an int"):
        Trainer(small_flow(), gaussian_batches, disable=True).fit(steps)


@pytest.mark.parametrize("factor", [float("nan"), -1.0, float("inf")])
def test_a_schedule_must_give_a_finite_factor_at_least_0(factor):
    # Regression: -1 was accepted (the loss climbed) and NaN reported as "parameters hold NaN"
    trainer = Trainer(small_flow(), gaussian_batches, schedule=lambda fraction: factor, disable=True)
    with pytest.raises(ValueError, match=r"the schedule gave the factor .* a schedule must give a finite number >= 0"):
        trainer.fit(1)
