"""Train a CNF on a 2-D toy density, report its held-out NLL, draw it.

Run ``python -m pyro_cnf.demo --help`` for the options. The run writes to ``--out``:
``demo.png`` (data, model density, model samples, trajectories), ``metrics.json`` and
``checkpoint.pt``; ``--resume`` continues from that checkpoint exactly where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..flow import ADAPTIVE_METHODS, FIXED_METHODS, ContinuousFlow
from ..nets import ODENet
from ..training import distributed
from ..training.trainer import OBJECTIVES, Trainer, TrainingError, step_seed
from . import datasets

__all__ = ["main", "build_parser"]

#: The settings a resumed run must share with the checkpoint it continues.
RESUME_KEYS = (
    "dataset", "batch_size", "lr", "hidden", "trace", "method", "ode_steps", "rtol", "atol", "seed",
    "objective", "lambda_kinetic", "lambda_jacobian",
)  # fmt: skip
#: ODENet's time_gate_scale for --objective flow_matching (see BENCHMARKS.md, W2).
FM_TIME_GATE_SCALE = 10.0
#: Held-out samples live in their own stream, apart from every training step's.
EVAL_STREAM = -1


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _float_above(low: float, inclusive: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"expected a number {'>=' if inclusive else '>'} {low:g}, got {text}")
        return value

    return parse


_positive = _float_above(0.0, inclusive=False)
_non_negative = _float_above(0.0, inclusive=True)


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,64, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths like 64,64, got {text!r}")
    return widths


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the ones resolved at run time (``None``) and flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line; every option documents itself in ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m pyro_cnf.demo",
        description=(
            "Train a continuous normalizing flow (FFJORD) on a 2-D toy density by maximum likelihood "
            "(or flow matching), then print its held-out NLL by the exact ODE likelihood next to the "
            "true density's NLL and write a picture, metrics.json and a checkpoint to --out."
        ),
        formatter_class=_HelpFormatter,
    )
    add = parser.add_argument
    add("--dataset", default="checkerboard", choices=datasets.NAMES, help="the toy density")
    add("--steps", type=_int_at_least(0), default=4000, help="optimiser steps in all (a resumed run counts the "
        "steps already done)")
    add("--batch-size", type=_int_at_least(1), default=256,
        help="training samples per step, fresh every step (under torchrun: split over the processes)")
    add("--lr", type=_positive, default=1e-2, help="Adam's learning rate")
    add("--hidden", type=_widths, default="64,64", help="hidden widths of the ODENet vector field, e.g. 64,64")
    add("--trace", default="auto", choices=("auto", "exact", "hutchinson"),
        help="log-det estimator while training (auto and exact use ODENet's closed-form trace)")
    add("--method", default="rk4", choices=sorted(ADAPTIVE_METHODS | FIXED_METHODS), metavar="METHOD",
        help="torchdiffeq solver while training: fixed-grid (taking --ode-steps steps) "
        f"{', '.join(sorted(FIXED_METHODS))}; adaptive (taking --rtol, --atol) {', '.join(sorted(ADAPTIVE_METHODS))}")
    add("--ode-steps", type=_int_at_least(1), default=4, help="steps over [0, T] of a fixed-grid --method")
    add("--rtol", type=_positive, default=1e-3, help="relative tolerance of an adaptive --method")
    add("--atol", type=_positive, default=1e-3, help="absolute tolerance of an adaptive --method")
    add("--lambda-kinetic", type=_non_negative, default=0.0, help="RNODE kinetic-energy penalty (mle)")
    add("--lambda-jacobian", type=_non_negative, default=0.0, help="RNODE Jacobian-norm penalty (mle)")
    add("--objective", default="mle", choices=OBJECTIVES,
        help="mle: exact maximum likelihood through the ODE solve; flow_matching: simulation-free "
        "regression of the field (conditional OT path), no solve while training")
    add("--seed", type=int, default=0, help="seeds the initial weights and every step's data")
    add("--threads", type=_int_at_least(1), default=1,
        help="CPU threads for torch; the 2-D problem's matrices are too small to gain from more, and "
        "extra threads slow it down badly when the CPUs are busy")
    add("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add("--out", type=Path, default=Path("out/demo"), help="output directory (created if needed)")
    add("--resume", action="store_true", help="continue from --out/checkpoint.pt up to --steps")
    add("--checkpoint-every", type=_int_at_least(1), default=500, help="save a checkpoint every this many steps")
    add("--eval-every", type=_int_at_least(0), default=1000,
        help="held-out NLL of --eval-every-size samples every this many steps (0: never)")
    add("--eval-every-size", type=_int_at_least(1), default=2000, help="samples of the periodic held-out NLL")
    add("--eval-size", type=_int_at_least(1), default=20000, help="held-out samples of the final NLL")
    add("--eval-tol", type=_positive, default=1e-6,
        help="rtol = atol of the dopri5 solves of every held-out NLL (exact trace)")
    add("--plot-grid", type=_int_at_least(2), default=150, help="the density panel's grid is N x N")
    add("--plot-samples", type=_int_at_least(1), default=20000, help="model samples in the picture")
    add("--on-solver-error", default="stop", choices=("stop", "skip"),
        help="stop at a failed ODE solve (keeping the last checkpoint), or skip that batch")
    return parser


def _device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"argument --device: not a torch device: {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {name!r} requested but CUDA is not available")
    return device


def _out_dir(parser: argparse.ArgumentParser, out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"argument --out: cannot create {str(out)!r}: {error.strerror or error}")
    if not os.access(out, os.W_OK | os.X_OK):
        parser.error(f"argument --out: {str(out)!r} is not writable")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    config = {k: getattr(args, k) for k in RESUME_KEYS}
    config["hidden"] = list(config["hidden"])
    if args.method in ADAPTIVE_METHODS:
        config["ode_steps"] = None
    return config


def _check_resume(parser: argparse.ArgumentParser, checkpoint: Path, config: dict[str, Any], steps: int) -> None:
    if not checkpoint.exists():
        parser.error(f"argument --resume: no checkpoint at {str(checkpoint)!r}")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    diff = [f"--{k.replace('_', '-')} {saved['config'].get(k)!r} in the checkpoint, {v!r} now"
            for k, v in config.items() if saved["config"].get(k) != v]  # fmt: skip
    if diff:
        parser.error("argument --resume: the checkpoint was trained with other settings: " + "; ".join(diff))
    if steps < saved["step"]:
        parser.error(f"argument --steps: {steps} is below the {saved['step']} steps of the checkpoint")


def _flows(args: argparse.Namespace) -> tuple[ContinuousFlow, ContinuousFlow]:
    """The training flow and the exact evaluator sharing its field."""
    # Flow matching needs a field that depends strongly on t from the start: steep initial
    # time gates (an initialisation only; maximum likelihood keeps ODENet's default).
    init = {"time_gate_scale": FM_TIME_GATE_SCALE} if args.objective == "flow_matching" else {}
    field = ODENet(2, args.hidden, **init)
    fixed = args.method in FIXED_METHODS
    train_flow = ContinuousFlow(
        field,
        trace=args.trace,
        method=args.method,
        steps=args.ode_steps if fixed else None,
        rtol=args.rtol,
        atol=args.atol,
        regularize=bool(args.lambda_kinetic or args.lambda_jacobian),
    )
    eval_flow = ContinuousFlow(field, trace="exact", rtol=args.eval_tol, atol=args.eval_tol)
    return train_flow, eval_flow


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (bad arguments exit 2 through argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = distributed.setup(_device(parser, args.device))  # joins torchrun's process group, if any
    if args.batch_size % distributed.get_world_size():
        world = distributed.get_world_size()
        parser.error(f"argument --batch-size: {args.batch_size} is not a multiple of the {world} processes")
    _out_dir(parser, args.out)
    checkpoint = args.out / "checkpoint.pt"
    config = _config(args)
    if args.resume:
        _check_resume(parser, checkpoint, config, args.steps)

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    flow, eval_flow = _flows(args)
    flow.to(device)
    held_out = datasets.sample(args.dataset, args.eval_size, seed=step_seed(args.seed, EVAL_STREAM), device=device)
    trainer = Trainer(
        flow,
        lambda step: datasets.sample(args.dataset, args.batch_size, seed=step_seed(args.seed, step)),
        objective=args.objective,
        lr=args.lr,
        lambda_kinetic=args.lambda_kinetic,
        lambda_jacobian=args.lambda_jacobian,
        checkpoint=checkpoint,
        checkpoint_every=args.checkpoint_every,
        eval_data=held_out[: args.eval_every_size],
        eval_every=args.eval_every,
        eval_flow=eval_flow,
        on_solver_error=args.on_solver_error,
        config=config,
        desc=f"{args.dataset} {args.objective}",
        disable=False,
    )
    if args.resume:
        trainer.resume()
        if distributed.is_main():
            print(f"resumed from {checkpoint} at step {trainer.step}")
    first = trainer.step
    try:
        trainer.fit(args.steps)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = "no checkpoint yet" if trainer.saved_step is None else f"checkpoint of step {trainer.saved_step}"
        print(f"\ninterrupted at step {trainer.step}; {saved} in {args.out}; continue with --resume", file=sys.stderr)
        return 130
    trained = time.perf_counter()

    held_out_nll = trainer.evaluate(held_out)
    if not distributed.is_main():  # rank 0 reports, draws and writes
        return 0
    true = datasets.true_log_prob(args.dataset, held_out)
    true_nll = None if true is None else -true.double().mean().item()
    solver = f"dopri5, exact trace, rtol=atol={args.eval_tol:g}"
    print(f"held-out NLL ({args.eval_size} samples; {solver}): {held_out_nll:.3f} nats")
    if true_nll is None:
        print(f"true density's NLL: no closed form for {args.dataset}")
    else:
        print(f"true density's NLL on the same samples: {true_nll:.3f} nats (gap {held_out_nll - true_nll:.3f})")

    figure = args.out / "demo.png"
    from .plots import plot_flow  # matplotlib only now that there is something to draw

    true_text = "" if true_nll is None else f", true {true_nll:.3f}"
    title = f"{args.dataset}, {args.objective}, {trainer.step} steps: held-out NLL {held_out_nll:.3f}{true_text}"
    plot_flow(eval_flow, held_out, figure, grid_size=args.plot_grid, samples=args.plot_samples, title=title)
    finished = time.perf_counter()
    recent = [h["loss"] for h in trainer.history[-50:] if "loss" in h]
    metrics = {
        "dataset": args.dataset,
        "objective": args.objective,
        "steps": trainer.step,
        "steps_this_run": trainer.step - first,
        "held_out_nll": held_out_nll,
        "true_nll": true_nll,
        "eval_size": args.eval_size,
        "eval_solver": solver,
        "eval_nfe": eval_flow.nfe,
        "final_train_loss": sum(recent) / len(recent) if recent else None,
        "train_nfe": flow.nfe if args.objective == "mle" else 0,
        "skipped_batches": trainer.skipped,
        "train_seconds": trained - started,
        "wall_seconds": finished - started,
        "eval_history": [{"step": int(h["step"]) + 1, "eval_nll": h["eval_nll"]} for h in trainer.history if "eval_nll" in h],
        "config": config,
        "device": str(device),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {figure}, {args.out / 'metrics.json'}, {checkpoint} ({finished - started:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        status = main()
        # Leave together: a rank that tears gloo down while rank 0 still plots and writes
        # was seen to abort (SIGABRT) once under load.
        distributed.barrier()
        sys.exit(status)
    finally:
        distributed.teardown()
