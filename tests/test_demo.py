"""The demo's command line, its outputs and their safety, and the plotting helpers it draws with."""

import json
import math
import os
import subprocess
import sys
import time

import matplotlib.image
import pytest
import torch

from pyro_cnf import ContinuousFlow, ODENet, SolverError
from pyro_cnf.demo import build_parser, main
from pyro_cnf.presets import PRESETS
from pyro_cnf.toy import demo
from pyro_cnf.toy.plots import density_grid, plot_flow, trajectories
from pyro_cnf.training import RunLock, Trainer, TrainingError, load_checkpoint, save_checkpoint

from .fields import LinearField, random_matrix

FAST = ["--batch-size", "32", "--hidden", "8,8", "--ode-steps", "2", "--eval-size", "300", "--eval-every", "2",
        "--eval-every-size", "50", "--eval-tol", "1e-5", "--checkpoint-every", "2", "--device", "cpu",
        "--plot-grid", "20", "--plot-samples", "300"]  # fmt: skip


def run_demo(tmp_path, *args):
    return main([*FAST, "--out", str(tmp_path), *args])


def checkpoint_of(out):
    return load_checkpoint(out / "checkpoint.pt", Trainer.STATE_KEYS)


# --- bad arguments -----------------------------------------------------------------------------


def error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("python -m pyro_cnf.demo: error: ")
    return lines[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "swissroll"], "argument --dataset: invalid choice: 'swissroll'"),
        (["--steps", "-5"], "argument --steps: expected an integer >= 0, got -5"),
        (["--steps", "ten"], "argument --steps: expected an integer, got 'ten'"),
        (["--lr", "0"], "argument --lr: expected a number > 0, got 0"),
        (["--rtol", "nan"], "argument --rtol: expected a number > 0, got nan"),
        (["--lambda-kinetic", "-1"], "argument --lambda-kinetic: expected a number >= 0, got -1"),
        (["--hidden", "64,x"], "argument --hidden: expected comma-separated integers"),
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
        (["--method", "leapfrog"], "argument --method: invalid choice"),
        (["--device", "tpu:0"], "argument --device"),
        # validated at parsing, not a traceback (or an overflow) later
        (["--seed", "1e23"], "argument --seed: expected an integer, got '1e23'"),
        (["--seed", str(10**23)], "argument --seed: expected an integer in [0, 9223372036854775807], got 1000"),
        (["--seed", "-1"], "argument --seed: expected an integer in [0, 9223372036854775807], got -1"),
        (["--objective", "flow_matching", "--lambda-kinetic", "0.1"],
         "argument --lambda-kinetic: the RNODE penalty applies to --objective mle only"),
        (["--path", "cosine"], "argument --path: applies to --objective flow_matching only"),
        (["--sigma-min", "1"], "argument --sigma-min: expected a number in [0, 1), got 1"),
        (["--ema", "1"], "argument --ema: expected a number in [0, 1), got 1"),
        (["--schedule", "linear"], "argument --schedule: invalid choice"),
        (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path), *args])
    assert info.value.code == 2
    assert message in error_line(capsys)
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as info:
        main(["--out", str(blocker / "demo")])
    assert info.value.code == 2
    assert "argument --out: cannot create" in error_line(capsys)


def test_resume_without_checkpoint_or_with_other_settings_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_demo(tmp_path, "--steps", "2", "--resume")
    assert info.value.code == 2 and "no checkpoint at" in error_line(capsys)
    assert run_demo(tmp_path, "--steps", "2") == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_demo(tmp_path, "--steps", "4", "--resume", "--lr", "0.1")
    assert info.value.code == 2
    assert "--lr 0.01 in the checkpoint, 0.1 now" in error_line(capsys)
    with pytest.raises(SystemExit) as info:
        run_demo(tmp_path, "--steps", "1", "--resume")
    assert info.value.code == 2 and "below the 2 steps of the checkpoint" in error_line(capsys)


def test_settings_a_run_does_not_use_do_not_block_its_resume(tmp_path, capsys):
    # an adaptive method's --rtol on an rk4 run, the solver under flow matching
    assert run_demo(tmp_path / "rk4", "--steps", "2") == 0
    assert run_demo(tmp_path / "rk4", "--steps", "3", "--resume", "--rtol", "0.1", "--eval-tol", "1e-4") == 0
    fm = ["--objective", "flow_matching"]
    assert run_demo(tmp_path / "fm", "--steps", "2", *fm) == 0
    assert run_demo(tmp_path / "fm", "--steps", "3", "--resume", "--method", "dopri5", *fm) == 0
    assert "trace" not in checkpoint_of(tmp_path / "fm")["config"]
    # ... while a cosine schedule spans --steps, which then must not change
    assert run_demo(tmp_path / "cos", "--steps", "2", "--schedule", "cosine") == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_demo(tmp_path / "cos", "--steps", "3", "--resume", "--schedule", "cosine")
    assert "--steps 2 in the checkpoint, 3 now" in error_line(capsys)


def test_an_existing_checkpoint_needs_resume_or_overwrite(tmp_path, capsys):
    # Regression: a second run on the same --out used to replace the checkpoint silently
    assert run_demo(tmp_path, "--steps", "4") == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_demo(tmp_path, "--steps", "2")
    assert info.value.code == 2
    assert (f"argument --out: '{tmp_path / 'checkpoint.pt'}' exists; pass --resume to continue that run or "
            "--overwrite to start over") in error_line(capsys)  # fmt: skip
    assert checkpoint_of(tmp_path)["step"] == 4
    assert run_demo(tmp_path, "--steps", "2", "--overwrite") == 0
    assert checkpoint_of(tmp_path)["step"] == 2


def test_overwrite_deletes_every_output_of_the_old_run(tmp_path, capsys, monkeypatch):
    # Regression: only checkpoint.pt went; an interrupted new run left the old metrics and picture
    assert run_demo(tmp_path, "--steps", "2") == 0
    assert {p.name for p in tmp_path.iterdir()} >= set(demo.OUTPUTS)

    def interrupted(self, steps):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    assert run_demo(tmp_path, "--steps", "2", "--overwrite") == 130
    assert not any((tmp_path / name).exists() for name in demo.OUTPUTS)


def test_a_locked_out_refuses_a_second_run_at_once(tmp_path, capsys):
    with RunLock(tmp_path) as lock:
        with pytest.raises(SystemExit) as info:
            run_demo(tmp_path, "--steps", "2")
    assert info.value.code == 2
    line = error_line(capsys)
    assert f"argument --out: {tmp_path} is in use by another run: {lock.path} is held by pid {os.getpid()}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, the lock file gone with its holder


def test_two_demos_on_one_out_do_not_interleave(tmp_path):
    command = [sys.executable, "-m", "pyro_cnf.demo", *FAST, "--checkpoint-every", "1", "--eval-every", "0",
               "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*command, "--steps", "1000000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "checkpoint.pt").exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run wrote no checkpoint"
            time.sleep(0.05)
        second = subprocess.run([*command, "--steps", "3", "--overwrite"], capture_output=True, text=True, env=env,
                                timeout=240)  # fmt: skip
        assert first.poll() is None  # still training, undisturbed
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
    assert second.returncode == 2
    assert f"is in use by another run: {tmp_path / '.lock'} is held by pid {first.pid} on " in second.stderr
    assert "pyro_cnf.demo" in second.stderr  # the holder's command line


def test_every_output_is_written_atomically_and_never_through_a_symlink(tmp_path):
    # Regression: a symlink planted at out/metrics.json made the demo overwrite its target
    targets = {name: tmp_path / f"precious-{name}" for name in ("metrics.json", "demo.png", "checkpoint.pt")}
    out = tmp_path / "out"
    out.mkdir()
    for name, target in targets.items():
        target.write_text("keep me")
        (out / name).symlink_to(target)
    assert run_demo(out, "--steps", "2", "--overwrite") == 0  # a checkpoint, even a planted one, needs it
    for name, target in targets.items():
        assert target.read_text() == "keep me" and not (out / name).is_symlink(), name
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "demo.png", "metrics.json"]


def test_unusable_checkpoint_is_refused_with_one_line(tmp_path, capsys):
    # Regression: OSError, EOFError, UnpicklingError or KeyError before
    assert run_demo(tmp_path, "--steps", "2") == 0
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    for data in (b"", good[: len(good) // 2], os.urandom(len(good)), good[:-1] + bytes([good[-1] ^ 1])):
        path.write_bytes(data)
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            run_demo(tmp_path, "--steps", "4", "--resume")
        assert info.value.code == 2
        line = error_line(capsys)
        assert f"argument --resume: cannot read checkpoint {path}: " in line
        assert line.endswith("it was not written by this program or is damaged")
    save_checkpoint({"step": 2}, path)  # sound, but not a trainer's
    with pytest.raises(SystemExit):
        run_demo(tmp_path, "--steps", "4", "--resume")
    assert "it has no 'model' entry" in error_line(capsys)


def test_a_checkpoint_that_cannot_be_written_stops_the_run_before_training(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").mkdir()
    with pytest.raises(SystemExit) as info:
        run_demo(tmp_path, "--steps", "2", "--overwrite")
    assert info.value.code == 2
    line = error_line(capsys)
    assert f"argument --out: cannot write {tmp_path / 'checkpoint.pt'}: it is a directory" in line


# --- runs --------------------------------------------------------------------------------------


def test_smoke_run_writes_picture_metrics_and_checkpoint(tmp_path, capsys):
    assert run_demo(tmp_path, "--steps", "3") == 0
    out = capsys.readouterr().out
    assert "held-out NLL (300 samples; dopri5, exact trace" in out and "true density's NLL" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["dataset"] == "checkerboard" and metrics["failure"] is None
    assert math.isfinite(metrics["held_out_nll"]) and metrics["true_nll"] == pytest.approx(math.log(32))
    assert [e["step"] for e in metrics["eval_history"]] == [2]
    assert all(math.isfinite(v) for v in (metrics["final_train_loss"], metrics["wall_seconds"]))
    state = checkpoint_of(tmp_path)
    assert state["step"] == 3 and state["config"]["hidden"] == [8, 8]
    image = matplotlib.image.imread(tmp_path / "demo.png")
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # four panels side by side
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "demo.png", "metrics.json"]


def test_resumed_demo_matches_the_uninterrupted_one(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_demo(whole, "--steps", "4") == 0
    assert run_demo(part, "--steps", "2") == 0
    assert run_demo(part, "--steps", "4", "--resume") == 0
    a, b = checkpoint_of(whole), checkpoint_of(part)
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-6)
    for name, value in a["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(value, b["model"][name], atol=1e-6), name
    metrics = json.loads((part / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["steps_this_run"] == 2


def test_flow_matching_objective_and_non_closed_form_dataset(tmp_path, capsys):
    assert run_demo(tmp_path, "--steps", "3", "--objective", "flow_matching", "--dataset", "moons") == 0
    assert "no closed form for moons" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["objective"] == "flow_matching" and metrics["true_nll"] is None
    assert math.isfinite(metrics["held_out_nll"]) and metrics["train_nfe"] == 0
    assert metrics["config"]["path"] == "ot" and metrics["config"]["coupling"] == "independent"


def test_the_flow_matching_recipe_runs_through_the_demo(tmp_path, monkeypatch):
    # the README's recipe (silu, cosine path, cosine schedule, weight average)
    fits, fit = [], Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, steps: fits.append(self) or fit(self, steps))
    recipe = ["--objective", "flow_matching", "--hidden", "8,8,8,8", "--activation", "silu", "--path", "cosine",
              "--coupling", "minibatch_ot", "--schedule", "cosine", "--ema", "0.9", "--lr", "0.02"]  # fmt: skip
    assert run_demo(tmp_path, "--steps", "3", *recipe) == 0
    (trainer,) = fits
    assert trainer.objective.path == "cosine" and trainer.objective.coupling == "minibatch_ot"
    assert trainer.ema == 0.9 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * 0.25)
    assert trainer.model.vector_field.activation == "silu"
    config = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert {k: config[k] for k in ("path", "coupling", "schedule", "ema", "activation")} == {
        "path": "cosine", "coupling": "minibatch_ot", "schedule": "cosine", "ema": 0.9, "activation": "silu"}


def parsed(*argv):
    """The demo's settings for ``argv``, its defaults filled in."""
    parser = build_parser()
    args = parser.parse_args(argv)
    demo._check_arguments(parser, args)
    return args


@pytest.mark.parametrize(
    "objective, low, high, activation", [("mle", 0.0, 0.5, "softplus"), ("flow_matching", 5.0, 20.0, "tanh")]
)
def test_flow_matching_starts_with_steep_time_gates(objective, low, high, activation):
    # the activation too depends on the objective: softplus for the 4-step rk4 grid of mle
    torch.manual_seed(0)
    args = parsed("--objective", objective)
    flow = demo._flow(args)
    assert flow.preset == args.preset == demo.DEMO_PRESETS[objective]
    field = flow.vector_field
    slopes = field.time_gate.detach() * field.time_gain  # stored divided by the time gain
    assert low < slopes.std().item() < high
    # no gains: the demo's lr 1e-2 and fixed grid suit the field without them
    assert (field.input_gain, field.time_gain, field.hidden_gain) == (1.0, 1.0, 1.0)
    assert flow.vector_field.activation == activation
    assert demo._flow(parsed("--objective", objective, "--activation", "elu")).vector_field.activation == "elu"
    assert demo.exact_flow(flow, 1e-6).vector_field is flow.vector_field


def test_the_preset_gives_the_defaults_and_the_options_given_win(capsys):
    density = PRESETS["density"]
    args = parsed("--preset", "density", "--steps", "2")
    flow = demo._flow(args)
    field = flow.vector_field
    assert flow.preset == "density" and args.steps == 2 and args.lr == density.lr
    assert (field.activation, field.input_gain, field.time_gain, field.hidden_gain) == tuple(
        density.field[k] for k in ("activation", "input_gain", "time_gain", "hidden_gain"))
    assert args.hidden == tuple(density.field["hidden_dims"]) and args.schedule == "constant"
    assert (flow.method, flow.steps, args.ode_steps) == ("dopri5", None, None)  # the solver's own, adaptive
    assert args.batch_size == PRESETS["demo"].training["batch_size"]  # the demo's, where the preset names none
    # solver tolerances: the solver's unless given, and then in training too
    assert (flow.train_rtol, flow.train_atol) == (ContinuousFlow(field).train_rtol, ContinuousFlow(field).train_atol)
    tight = demo._flow(parsed("--preset", "density", "--rtol", "1e-4", "--atol", "2e-4"))
    assert (tight.rtol, tight.atol, tight.train_rtol, tight.train_atol) == (1e-4, 2e-4, 1e-4, 2e-4)
    given = parsed("--preset", "density", "--lr", "0.05", "--hidden", "8", "--activation", "silu", "--steps", "3",
                   "--batch-size", "16", "--schedule", "cosine", "--method", "rk4", "--ode-steps", "3")  # fmt: skip
    flow = demo._flow(given)
    assert (given.lr, given.batch_size, given.schedule, given.steps) == (0.05, 16, "cosine", 3)
    assert (flow.vector_field.hidden_dims, flow.vector_field.activation) == ((8,), "silu")
    assert (flow.method, flow.steps, flow.vector_field.input_gain) == ("rk4", 3, density.field["input_gain"])
    assert demo._flow(parsed("--method", "euler")).steps == PRESETS["demo"].flow["steps"]  # the demo's grid
    fm = parsed("--objective", "flow_matching", "--preset", "flow_matching")
    assert (fm.path, fm.schedule, fm.lr) == ("cosine", "cosine", PRESETS["flow_matching"].lr)
    with pytest.raises(SystemExit):
        parsed("--preset", "density", "--method", "rk4")
    assert "argument --ode-steps: --method rk4 takes a grid, and --preset density names none" in error_line(capsys)
    for name in PRESETS:  # every preset gives every default
        for objective in demo.DEMO_PRESETS:
            args = parsed("--preset", name, "--objective", objective)
            assert None not in (args.lr, args.hidden, args.activation, args.steps, args.batch_size, args.schedule)


def test_a_run_stores_its_preset_and_resumes_only_under_it(tmp_path, capsys):
    assert run_demo(tmp_path, "--preset", "density_high_lr", "--steps", "2") == 0
    config = checkpoint_of(tmp_path)["config"]
    assert (config["preset"], config["lr"], config["activation"]) == ("density_high_lr", 1e-2, PRESETS["density_high_lr"].field["activation"])
    assert (config["method"], config["rtol"], config["atol"]) == ("dopri5", None, None)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_demo(tmp_path, "--steps", "3", "--resume", "--preset", "density")
    assert "--preset 'density_high_lr' in the checkpoint, 'density' now" in error_line(capsys)


def test_help_names_the_solvers_that_run_and_what_an_existing_out_does(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "dopri5, euler, midpoint, rk4 run on pyro_cnf's own Runge-Kutta solver, the others on torchdiffeq" in text
    assert "without --resume or --overwrite a run refuses to start when that checkpoint exists" in text
    assert "locked for the whole run" in text and "exit status: 0: done; 1: training stopped" in text
    # every option's default, those of the preset under each objective's own
    demo_, fm = PRESETS["demo"], PRESETS["demo_flow_matching"]
    assert "(default: demo for --objective mle, demo_flow_matching for --objective flow_matching)" in text
    assert f"Adam's learning rate (default: from --preset; {demo_.lr:g} with demo, {fm.lr:g} with demo_" in text
    assert (f"ODENet's activation (default: from --preset; {demo_.field['activation']} with demo, "
            f"{fm.field['activation']} with demo_flow_matching)") in text  # fmt: skip
    assert f"(default: from --preset; {demo_.flow['steps']} with demo, none with demo_flow_matching)" in text
    assert "conditional path (default: from --preset; ot with demo_flow_matching)" in text
    assert "(default: the solver's, 1e-05, 0.001 in training)" in text and "(default: 1e-06)" in text


@pytest.mark.parametrize(
    "error, status, message",
    [
        (TrainingError("the ODE solver failed at step 7: ...", 7, 6), 1, "error: the ODE solver failed at step 7"),
        (KeyboardInterrupt(), 130, "interrupted at step 0; no checkpoint yet in"),
    ],
)
def test_training_failures_end_with_a_message_not_a_traceback(tmp_path, capsys, monkeypatch, error, status, message):
    def fail(self, steps):
        raise error

    monkeypatch.setattr(Trainer, "fit", fail)
    assert run_demo(tmp_path, "--steps", "3") == status
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / ".lock").exists()  # the lock goes with the run


def test_a_failed_evaluation_is_recorded_in_metrics_and_exits_3(tmp_path, capsys, monkeypatch):
    # Regression: with --on-solver-error skip the NLL printed as nan, then plotting raised a
    # SolverError traceback, exit 1, no metrics.json. The evaluator's solver gives up here:
    # (a first step of 1e-3: a field this young would otherwise be solved in one step)
    options = {"max_num_steps": 1, "first_step": 1e-3}
    monkeypatch.setattr(demo, "exact_flow", lambda flow, tol: ContinuousFlow(flow.vector_field, options=options))
    assert run_demo(tmp_path, "--steps", "2", "--eval-every", "0", "--on-solver-error", "skip") == 3
    err = capsys.readouterr().err
    assert "error: the ODE solver failed evaluating the NLL after step 2" in err and "Traceback" not in err
    assert f"{tmp_path / 'metrics.json'} records it" in err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["held_out_nll"] is None and metrics["failure"]["stage"] == "evaluation"
    assert checkpoint_of(tmp_path)["step"] == 2 and not (tmp_path / "demo.png").exists()


def test_a_failed_picture_is_recorded_in_metrics_and_exits_3(tmp_path, capsys, monkeypatch):
    import pyro_cnf.toy.plots

    def fail(*args, **kwargs):
        raise SolverError("step size underflow while sampling")

    monkeypatch.setattr(pyro_cnf.toy.plots, "plot_flow", fail)
    assert run_demo(tmp_path, "--steps", "2") == 3
    err = capsys.readouterr().err
    assert f"error: drawing {tmp_path / 'demo.png'} failed: step size underflow while sampling" in err
    assert "Traceback" not in err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(metrics["held_out_nll"])
    assert metrics["failure"] == {"stage": "plot", "error": "SolverError: step size underflow while sampling"}


# --- plots -------------------------------------------------------------------------------------


def test_density_grid_of_the_identity_flow_is_the_standard_normal():
    axis, log_prob = density_grid(ContinuousFlow(ODENet(2, (8,))), lim=3.0, size=7)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    expected = -(x**2 + y**2) / 2 - math.log(2 * math.pi)
    assert torch.allclose(log_prob, expected, atol=1e-5)


def test_density_grid_is_in_image_order():
    # f = A x with A = diag(a, 0): the density is N(0, diag(e^{-2a}, 1)), wider along y
    field = LinearField(torch.diag(torch.tensor([1.0, 0.0])))
    axis, log_prob = density_grid(ContinuousFlow(field, rtol=1e-7, atol=1e-7), lim=2.0, size=5)
    assert log_prob[4, 2] > log_prob[2, 4]  # [y = 2, x = 0] is likelier than [y = 0, x = 2]


def test_trajectories_follow_the_exact_flow_of_a_linear_field():
    A = random_matrix(2, seed=3).float()
    flow = ContinuousFlow(LinearField(A), T=2.0, rtol=1e-7, atol=1e-7)
    z = torch.randn(6, 2)
    paths = trajectories(flow, z, times=5)
    assert paths.shape == (5, 6, 2) and torch.equal(paths[0], z)
    for k, t in enumerate(torch.linspace(2.0, 0.0, 5)):  # x(t) = expm(A (t - T)) z
        assert torch.allclose(paths[k], z @ torch.linalg.matrix_exp(A * (t - 2.0)).t(), atol=1e-4)


def test_plot_flow_writes_a_four_panel_png(tmp_path):
    flow = ContinuousFlow(ODENet(2, (8,), zero_init=False))
    fig = plot_flow(flow, torch.randn(200, 2), tmp_path / "f.png", grid_size=10, samples=200, paths=5, times=4,
                    title="t")  # fmt: skip
    assert len(fig.axes) == 4 and fig.get_suptitle() == "t"
    assert matplotlib.image.imread(tmp_path / "f.png").shape[2] in (3, 4)
