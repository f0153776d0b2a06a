"""Training helpers: the shared loops, and the resumable, checkpointed trainer."""

import math
import os

import pytest
import torch

from pyro_cnf import ContinuousFlow, ODENet
from pyro_cnf.training.trainer import fit_density, nll, progress_loop
from tests.fields import QuadraticField


def standard_normal_flow_log_prob(flow):
    def log_prob(x, context=None):
        z, ladj = flow(x, context)
        return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) + ladj

    return log_prob


# --- progress_loop, nll, fit_density ---------------------------------------------------------


def test_progress_loop_runs_start_to_steps_and_returns_metrics():
    seen = []
    history = progress_loop(lambda i: seen.append(i) or {"i": i, "half": i / 2}, 7, start=3, disable=True)
    assert seen == [3, 4, 5, 6]
    assert history == [{"i": float(i), "half": i / 2} for i in seen]
    assert progress_loop(lambda i: {}, 3, start=3, disable=True) == []
    with pytest.raises(ValueError, match="steps must be >= start"):
        progress_loop(lambda i: {}, 2, start=3)


def test_nll_matches_manual_computation_in_any_batching():
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    normal = torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), scale)
    data = torch.randn(103, 2, dtype=torch.float64) * scale
    manual = -normal.log_prob(data).sum(-1).mean().item()
    for batch_size in (1, 10, 103, 4096):
        assert nll(lambda x, c: normal.log_prob(x).sum(-1), data, batch_size=batch_size) == pytest.approx(manual, abs=1e-12)


def test_nll_passes_context_row_by_row():
    data, context = torch.zeros(5, 1), torch.arange(5.0).unsqueeze(-1)
    # log p(x | c) = -c: the NLL is the mean context
    assert nll(lambda x, c: -c.squeeze(-1), data, context, batch_size=2) == pytest.approx(2.0)


def test_fit_density_decreases_nll_of_a_cnf():
    torch.manual_seed(0)
    data = torch.randn(512, 2) * torch.tensor([0.5, 1.5]) + torch.tensor([2.0, -1.0])
    flow = ContinuousFlow(ODENet(2, (16, 16)), method="rk4", steps=2)
    log_prob = standard_normal_flow_log_prob(flow)
    before = nll(log_prob, data)
    history = fit_density(log_prob, flow.parameters(), data, steps=40, batch_size=64, lr=3e-2, desc="")
    after = nll(log_prob, data)
    assert len(history) == 40 and set(history[0]) == {"loss", "nll"}
    # the exact NLL of the data-generating Gaussian bounds what a model can reach
    entropy = 0.5 * 2 * math.log(2 * math.pi * math.e) + math.log(0.5 * 1.5)
    assert after < before - 1.0 and after > entropy - 0.1


def test_fit_density_adds_the_penalty_and_seeds_its_minibatches():
    data = torch.randn(64, 1)

    def run(seed):
        mu = torch.nn.Parameter(torch.zeros(1))
        seen = []

        def log_prob(x, c):
            seen.append(x.clone())
            return -(x - mu).pow(2).sum(-1)

        history = fit_density(log_prob, [mu], data, steps=3, batch_size=8, seed=seed, desc="",
                              penalty=lambda: mu.pow(2).sum() + 1.0)
        return seen, history

    a, history = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert history[0]["loss"] == pytest.approx(history[0]["nll"] + history[0]["penalty"])
    assert history[0]["penalty"] == pytest.approx(1.0)  # mu = 0 at the first step


def test_fit_density_bad_input():
    mu = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match=r"shape \(N >= 1, d\)"):
        fit_density(lambda x, c: x.sum(-1), [mu], torch.zeros(3), steps=1)
    with pytest.raises(ValueError, match="one row per data row"):
        fit_density(lambda x, c: x.sum(-1), [mu], torch.zeros(3, 1), context=torch.zeros(2, 1), steps=1)


# --- Trainer -----------------------------------------------------------------------------------


from pyro_cnf import SolverError  # noqa: E402
from pyro_cnf.training.trainer import Trainer, TrainingError, save_atomic, step_seed  # noqa: E402


def small_flow(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("method", "rk4")
    kw.setdefault("steps", 2)
    return ContinuousFlow(ODENet(2, (8, 8), zero_init=False), **kw)


def gaussian_batches(step):
    g = torch.Generator().manual_seed(step_seed(0, step))
    return torch.randn(32, 2, generator=g) * 0.5 + 1.0


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_flow_log_prob_is_the_change_of_variables():
    flow = small_flow(method="dopri5", steps=None, rtol=1e-7, atol=1e-7).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    z, ladj = flow(x)
    manual = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) + ladj
    assert torch.allclose(flow.log_prob(x), manual, atol=1e-12)


def test_step_seed_streams_are_distinct_and_fixed():
    seeds = {step_seed(s, i) for s in range(5) for i in range(100)}
    assert len(seeds) == 500 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(3, 7) == step_seed(3, 7)


@pytest.mark.parametrize(
    "objective, kw",
    [("mle", {}), ("mle", {"regularize": True}), ("flow_matching", {})],
)
def test_resumed_run_repeats_the_uninterrupted_run(tmp_path, objective, kw):
    penalty = {"lambda_kinetic": 0.1, "lambda_jacobian": 0.1} if kw else {}

    def trainer(path, seed, batches=gaussian_batches):
        flow = small_flow(seed, **kw)
        return Trainer(flow, batches, objective=objective, lr=1e-2, checkpoint=path, checkpoint_every=4,
                       disable=True, **penalty)

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
    assert torch.allclose(flat(second.flow), flat(whole.flow), atol=1e-6)
    assert len(second.history) == 12 and [h["step"] for h in second.history] == list(range(12))


def test_checkpoint_holds_model_optimizer_step_rng_and_config(tmp_path):
    trainer = Trainer(small_flow(), gaussian_batches, checkpoint=tmp_path / "c.pt", checkpoint_every=3,
                      config={"dataset": "gauss", "hidden": [8, 8]}, disable=True)
    trainer.fit(5)
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["step"] == 5 and state["config"] == {"dataset": "gauss", "hidden": [8, 8]}
    assert set(state) >= {"flow", "optimizer", "rng", "history", "skipped"}
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state())
    assert state["optimizer"]["state"][0]["step"] == 5
    assert list(tmp_path.iterdir()) == [tmp_path / "c.pt"]  # no temporary file left


def test_periodic_held_out_nll_is_the_exact_nll(tmp_path):
    eval_data = gaussian_batches(-1)
    exact = small_flow(method="dopri5", steps=None, rtol=1e-6, atol=1e-6)
    trainer = Trainer(small_flow(), gaussian_batches, eval_data=eval_data, eval_every=2, disable=True)
    trainer.eval_flow = ContinuousFlow(trainer.flow.vector_field, rtol=1e-6, atol=1e-6)
    trainer.fit(4)
    assert [("eval_nll" in h) for h in trainer.history] == [False, True, False, True]
    exact.load_state_dict(trainer.flow.state_dict())
    assert trainer.history[-1]["eval_nll"] == pytest.approx(nll(lambda x, c: exact.log_prob(x), eval_data), abs=1e-4)
    assert trainer.flow.training  # evaluation leaves the training mode as it was


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"step": 1}, path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would have made it

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]


def blowing_up_at(bad_step):
    def batches(step):
        x = 0.1 * gaussian_batches(step)
        return x + 100.0 if step == bad_step else x

    return batches


def test_solver_error_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    flow = ContinuousFlow(QuadraticField(), rtol=1e-5, atol=1e-5)
    trainer = Trainer(flow, blowing_up_at(6), lr=1e-2, checkpoint=path, checkpoint_every=5, disable=True)
    with pytest.raises(TrainingError, match="solver failed at step 6.*checkpoint of step 5") as info:
        trainer.fit(10)
    assert isinstance(info.value.__cause__, SolverError)
    assert info.value.step == 6 and info.value.checkpoint_step == 5
    state = torch.load(path, weights_only=True)
    assert state["step"] == 5 and len(state["history"]) == 5
    assert list(tmp_path.iterdir()) == [path]


def test_solver_error_skip_drops_the_batch_and_counts_it(tmp_path):
    flow = ContinuousFlow(QuadraticField(), rtol=1e-5, atol=1e-5)
    trainer = Trainer(flow, blowing_up_at(3), lr=1e-2, on_solver_error="skip", checkpoint=tmp_path / "c.pt",
                      disable=True)
    before = {}

    def watch(step):
        before[step] = flow.vector_field.w.item()
        return blowing_up_at(3)(step)

    trainer.batches = watch
    trainer.fit(6)
    assert trainer.step == 6 and trainer.skipped == 1
    assert trainer.history[3] == {"step": 3.0, "skipped": 1.0}
    assert before[4] == before[3]  # no update from the dropped batch
    assert torch.load(tmp_path / "c.pt", weights_only=True)["skipped"] == 1


def test_non_finite_loss_stops_without_overwriting_the_checkpoint(tmp_path):
    path = tmp_path / "c.pt"

    def batches(step):  # |z|^2 overflows float32 at step 4
        return torch.full((4, 2), 1e30) if step == 4 else gaussian_batches(step)

    trainer = Trainer(small_flow(), batches, checkpoint=path, checkpoint_every=3, disable=True)
    with pytest.raises(TrainingError, match=r"loss is (inf|nan) at step 4; stopped without saving.*step 3 in") as info:
        trainer.fit(8)
    assert info.value.step == 4 and info.value.checkpoint_step == 3
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 3 and len(saved["history"]) == 3
    # the model has moved on by one step since the checkpoint, which still holds step 3
    reloaded = small_flow(seed=5)
    reloaded.load_state_dict(saved["flow"])
    assert not torch.equal(flat(reloaded), flat(trainer.flow))
    assert list(tmp_path.iterdir()) == [path]


def test_trainer_bad_settings():
    with pytest.raises(ValueError, match="objective must be one of"):
        Trainer(small_flow(), gaussian_batches, objective="elbo")
    with pytest.raises(ValueError, match="regularize=True"):
        Trainer(small_flow(), gaussian_batches, lambda_kinetic=0.1)
    with pytest.raises(ValueError, match="on_solver_error"):
        Trainer(small_flow(), gaussian_batches, on_solver_error="retry")
    with pytest.raises(ValueError, match="eval_data"):
        Trainer(small_flow(), gaussian_batches, eval_every=10)
    with pytest.raises(TypeError, match="ContinuousFlow"):
        Trainer(ODENet(2), gaussian_batches)
    trainer = Trainer(small_flow(), gaussian_batches, disable=True)
    trainer.fit(2)
    with pytest.raises(ValueError, match=r"steps \(1\) is below the steps already done \(2\)"):
        trainer.fit(1)


def test_adjoint_backward_failure_stops_or_skips(tmp_path):
    def failing_adjoint():
        torch.manual_seed(0)
        net = ODENet(2, (8, 8), zero_init=False)
        return ContinuousFlow(net, adjoint=True, rtol=1e-7, atol=1e-7, adjoint_options={"max_num_steps": 2})

    trainer = Trainer(failing_adjoint(), gaussian_batches, checkpoint=tmp_path / "c.pt", disable=True)
    with pytest.raises(TrainingError, match="solver failed at step 0.*adjoint \\(backward\\) solve") as info:
        trainer.fit(2)
    assert isinstance(info.value.__cause__, SolverError)
    flow = failing_adjoint()
    start = [p.detach().clone() for p in flow.parameters()]
    trainer = Trainer(flow, gaussian_batches, on_solver_error="skip", disable=True)
    trainer.fit(2)
    assert trainer.skipped == 2 and trainer.step == 2
    assert all(torch.equal(a, b) for a, b in zip(start, flow.parameters()))
