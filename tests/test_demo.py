"""The demo's command line, its outputs, and the plotting helpers it draws with."""

import json
import math

import matplotlib.image
import pytest
import torch

from pyro_cnf import ContinuousFlow, ODENet
from pyro_cnf.toy.demo import main
from pyro_cnf.training.trainer import Trainer, TrainingError
from pyro_cnf.toy.plots import density_grid, plot_flow, trajectories

from .fields import LinearField, random_matrix

FAST = ["--batch-size", "32", "--hidden", "8,8", "--ode-steps", "2", "--eval-size", "300", "--eval-every", "2",
        "--eval-every-size", "50", "--eval-tol", "1e-5", "--checkpoint-every", "2", "--device", "cpu",
        "--plot-grid", "20", "--plot-samples", "300"]  # fmt: skip


def run_demo(tmp_path, *args):
    return main([*FAST, "--out", str(tmp_path), *args])


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


# --- runs --------------------------------------------------------------------------------------


def test_smoke_run_writes_picture_metrics_and_checkpoint(tmp_path, capsys):
    assert run_demo(tmp_path, "--steps", "3") == 0
    out = capsys.readouterr().out
    assert "held-out NLL (300 samples; dopri5, exact trace" in out and "true density's NLL" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["dataset"] == "checkerboard"
    assert math.isfinite(metrics["held_out_nll"]) and metrics["true_nll"] == pytest.approx(math.log(32))
    assert [e["step"] for e in metrics["eval_history"]] == [2]
    assert all(math.isfinite(v) for v in (metrics["final_train_loss"], metrics["wall_seconds"]))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and state["config"]["hidden"] == [8, 8]
    image = matplotlib.image.imread(tmp_path / "demo.png")
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # four panels side by side
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "demo.png", "metrics.json"]


def test_resumed_demo_matches_the_uninterrupted_one(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_demo(whole, "--steps", "4") == 0
    assert run_demo(part, "--steps", "2") == 0
    assert run_demo(part, "--steps", "4", "--resume") == 0
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoint.pt", weights_only=True)
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-6)
    for name, value in a["flow"].items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(value, b["flow"][name], atol=1e-6), name
    metrics = json.loads((part / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["steps_this_run"] == 2


def test_flow_matching_objective_and_non_closed_form_dataset(tmp_path, capsys):
    assert run_demo(tmp_path, "--steps", "3", "--objective", "flow_matching", "--dataset", "moons") == 0
    assert "no closed form for moons" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["objective"] == "flow_matching" and metrics["true_nll"] is None
    assert math.isfinite(metrics["held_out_nll"]) and metrics["train_nfe"] == 0


@pytest.mark.parametrize("objective, low, high", [("mle", 0.0, 0.5), ("flow_matching", 5.0, 20.0)])
def test_flow_matching_starts_with_steep_time_gates(objective, low, high):
    from pyro_cnf.toy.demo import _flows, build_parser

    torch.manual_seed(0)
    flow, eval_flow = _flows(build_parser().parse_args(["--objective", objective]))
    assert eval_flow.vector_field is flow.vector_field
    assert low < flow.vector_field.time_gate.detach().std().item() < high


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
