"""Train a CNF on a 2-D toy density, report its held-out NLL, draw it.

Run ``python -m pyro_cnf.demo --help`` for the options; the model's, the optimiser's and
the solver's start from a preset (``--preset``, :data:`pyro_cnf.presets.PRESETS`: ``"demo"``
for maximum likelihood, ``"demo_flow_matching"`` for flow matching), and those given
replace its values. The run writes to ``--out``:
``demo.png`` (data, model density, model samples, trajectories), ``metrics.json`` and
``checkpoint.pt``, every file atomically; ``--resume`` continues from that checkpoint
exactly where it stopped. A run holds a lock on ``--out`` (``--out/.lock``) from start to
end, and refuses to start over an existing checkpoint unless told ``--resume`` or
``--overwrite``.

Exit status (:data:`EXIT_CODES`): 0 done; 1 training stopped (failed ODE solve or
non-finite loss; the last checkpoint is kept); 2 refused to start (bad arguments, ``--out``
in use or holding a checkpoint, an unusable checkpoint, torchrun ranks started with
different settings); 3 trained, but the held-out evaluation or the picture failed
(``metrics.json`` records the failure, the checkpoint is kept); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..flow import ContinuousFlow, SolverError, default_flow
from ..nets import ACTIVATIONS
from ..ode import ADAPTIVE_METHODS, FIXED_METHODS, Solver
from ..ode.rk import METHODS as OWN_METHODS
from ..presets import PRESETS, Preset
from ..training import distributed
from ..training.checkpoint import CheckpointError, RunLock, RunLockedError, write_atomic
from ..training.objectives import FlowMatching, MaximumLikelihood, Objective
from ..training.trainer import Checkpointing, Evaluation, Trainer, TrainingError, step_seed
from . import datasets

__all__ = ["main", "run", "build_parser", "DEMO_PRESETS", "EXIT_CODES"]

#: The --preset of each --objective when none is given; the README quotes the run of "demo".
DEMO_PRESETS: dict[str, str] = {"mle": "demo", "flow_matching": "demo_flow_matching"}
#: The flow-matching options' defaults where the preset's ``training`` names none:
#: :class:`~pyro_cnf.training.FlowMatching`'s own.
FM_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(FlowMatching) if f.name in ("path", "coupling", "sigma_min")
}
#: The files a run writes to --out (besides its lock), which --overwrite deletes.
OUTPUTS = ("checkpoint.pt", "metrics.json", "demo.png")
#: What each exit status means.
EXIT_CODES = {
    0: "done",
    1: "training stopped: a failed ODE solve or a non-finite loss (the last checkpoint is kept)",
    2: "refused to start: bad arguments, --out in use by another run or holding a checkpoint without --resume or "
    "--overwrite, an unusable checkpoint, or torchrun ranks started with different settings",
    3: "trained, but the held-out evaluation or the picture failed (metrics.json records it; the checkpoint is kept)",
    130: "interrupted (the last checkpoint is kept; continue with --resume)",
}
#: Held-out samples live in their own stream, apart from every training step's.
EVAL_STREAM = -1
#: The largest --seed: torch seeds are 64-bit, and non-negative ones keep the streams apart.
MAX_SEED = 2**63 - 1


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {value}")
        return value

    return parse


def _number_in(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """Numbers in ``[low, high)`` (``(low, high)`` with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > low if low_open else value >= low) or not value < high or not math.isfinite(value):
            bound = f"{'>' if low_open else '>='} {low:g}" if high == math.inf else f"in [{low:g}, {high:g})"
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text}")
        return value

    return parse


_positive = _number_in(0.0, low_open=True)
_non_negative = _number_in(0.0)
_fraction = _number_in(0.0, 1.0)


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,64, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths like 64,64, got {text!r}")
    return widths


def _preset_defaults(preset: Preset, objective: str) -> dict[str, Any]:
    """The defaults ``preset`` gives the options marked "from --preset", by ``dest``. A
    preset without a step count or batch size (one tuned for a library use, not for a
    run) takes those of ``objective``'s demo preset; one without a method, the solver's
    own (adaptive, ``ode_steps`` ``None``)."""
    demo = PRESETS[DEMO_PRESETS[objective]].training
    training = {"steps": demo["steps"], "batch_size": demo["batch_size"], **preset.training}
    return {
        "lr": preset.lr,
        "hidden": tuple(preset.field["hidden_dims"]),
        "activation": preset.field["activation"],
        "steps": training["steps"],
        "batch_size": training["batch_size"],
        "schedule": preset.schedule,
        "method": preset.flow.get("method", Solver().method),
        "ode_steps": preset.flow.get("steps"),
        **{name: training.get(name, default) for name, default in FM_DEFAULTS.items()},
    }


def _from_preset(dest: str, objectives: Sequence[str] = tuple(DEMO_PRESETS)) -> str:
    """``--help``'s note on the default of an option that comes from the preset: its value
    under the default preset of each of ``objectives``."""

    def text(value: Any) -> str:
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    values = ", ".join(
        f"{text(_preset_defaults(PRESETS[DEMO_PRESETS[o]], o)[dest])} with {DEMO_PRESETS[o]}" for o in objectives
    )
    return f" (default: from --preset; {values})"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the ones resolved at run time (``None``) and flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
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
        epilog="exit status: " + "; ".join(f"{code}: {meaning}" for code, meaning in EXIT_CODES.items()),
        formatter_class=_HelpFormatter,
    )
    add = parser.add_argument
    own = sorted(OWN_METHODS)
    fm_only = ("flow_matching",)
    solver = Solver()
    add("--dataset", default="checkerboard", choices=datasets.NAMES, help="the toy density")
    add("--objective", default="mle", choices=("mle", "flow_matching"),
        help="mle: exact maximum likelihood through the ODE solve; flow_matching: simulation-free "
        "regression of the field on a conditional path, no solve while training")
    add("--preset", default=None, choices=sorted(PRESETS),
        help="the tuned configuration (pyro_cnf.presets.PRESETS) that gives the defaults marked 'from --preset'; "
        "the options given replace its values, and a preset without a step count or batch size takes the objective's "
        "demo preset's (default: "
        + ", ".join(f"{name} for --objective {objective}" for objective, name in DEMO_PRESETS.items()) + ")")
    add("--steps", type=_int_in(0), default=None,
        help="optimiser steps in all (a resumed run counts the steps already done)" + _from_preset("steps"))
    add("--batch-size", type=_int_in(1), default=None,
        help="training samples per step, fresh every step (under torchrun: split over the processes)"
        + _from_preset("batch_size"))
    add("--lr", type=_positive, default=None, help="Adam's learning rate" + _from_preset("lr"))
    add("--schedule", default=None, choices=("constant", "cosine"),
        help="learning-rate schedule: constant, or cosine decay to 0 at --steps" + _from_preset("schedule"))
    add("--ema", type=_fraction, default=0.0,
        help="decay of an exponential moving average of the weights, which is then evaluated and drawn (0: none)")
    add("--hidden", type=_widths, default=None,
        help="hidden widths of the ODENet vector field, e.g. 64,64" + _from_preset("hidden"))
    add("--activation", choices=sorted(ACTIVATIONS), default=None,
        help="ODENet's activation" + _from_preset("activation"))
    mle = parser.add_argument_group("maximum likelihood (--objective mle)")
    mle.add_argument("--trace", default="auto", choices=("auto", "exact", "hutchinson"),
                     help="log-det estimator while training (auto and exact use ODENet's closed-form trace)")
    mle.add_argument("--method", default=None, choices=sorted(ADAPTIVE_METHODS | FIXED_METHODS),
                     metavar="METHOD",
                     help=f"ODE solver while training: fixed-grid (taking --ode-steps) "
                     f"{', '.join(sorted(FIXED_METHODS))}; adaptive (taking --rtol, --atol) "
                     f"{', '.join(sorted(ADAPTIVE_METHODS))}. {', '.join(own)} run on pyro_cnf's own "
                     "Runge-Kutta solver, the others on torchdiffeq" + _from_preset("method"))
    mle.add_argument("--ode-steps", type=_int_in(1), default=None,
                     help="steps over [0, T] of a fixed-grid --method" + _from_preset("ode_steps"))
    mle.add_argument("--rtol", type=_positive, default=None,
                     help="relative tolerance of an adaptive --method, in training too (default: the solver's, "
                     f"{solver.tolerances(False)[0]:g}, {solver.tolerances(True)[0]:g} in training)")
    mle.add_argument("--atol", type=_positive, default=None,
                     help="absolute tolerance of an adaptive --method, in training too (default: the solver's, "
                     f"{solver.tolerances(False)[1]:g}, {solver.tolerances(True)[1]:g} in training)")
    mle.add_argument("--lambda-kinetic", type=_non_negative, default=0.0, help="RNODE kinetic-energy penalty")
    mle.add_argument("--lambda-jacobian", type=_non_negative, default=0.0, help="RNODE Jacobian-norm penalty")
    fm = parser.add_argument_group("flow matching (--objective flow_matching)")
    fm.add_argument("--path", default=None, choices=("ot", "cosine"),
                    help="conditional path" + _from_preset("path", fm_only))
    fm.add_argument("--coupling", default=None, choices=("independent", "minibatch_ot"),
                    help="pairing of data and base samples" + _from_preset("coupling", fm_only))
    fm.add_argument("--sigma-min", type=_fraction, default=None,
                    help="the path's noise scale at t = 0" + _from_preset("sigma_min", fm_only))
    add("--seed", type=_int_in(0, MAX_SEED), default=0, help="seeds the initial weights and every step's data")
    add("--threads", type=_int_in(1), default=1,
        help="CPU threads for torch; the 2-D problem's matrices are too small to gain from more, and "
        "extra threads slow it down badly when the CPUs are busy")
    add("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    run_group = parser.add_argument_group("output and resuming")
    run_group.add_argument("--out", type=Path, default=Path("out/demo"),
                           help="output directory (created if needed), locked for the whole run")
    start = run_group.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt up to --steps")
    start.add_argument("--overwrite", action="store_true",
                       help="delete the old run's checkpoint.pt, metrics.json and demo.png in --out and start "
                       "over; without --resume or --overwrite a run refuses to start when that checkpoint exists")
    run_group.add_argument("--checkpoint-every", type=_int_in(1), default=500,
                           help="save a checkpoint every this many steps")
    run_group.add_argument("--on-solver-error", default="stop", choices=("stop", "skip"),
                           help=f"stop at a failed ODE solve (keeping the last checkpoint), or skip that batch; "
                           f"skipping stops too after {Trainer.skip_limit} failed steps in a row")
    ev = parser.add_argument_group("evaluation and picture")
    ev.add_argument("--eval-every", type=_int_in(0), default=1000,
                    help="held-out NLL of --eval-every-size samples every this many steps (0: never)")
    ev.add_argument("--eval-every-size", type=_int_in(1), default=2000, help="samples of the periodic held-out NLL")
    ev.add_argument("--eval-size", type=_int_in(1), default=20000, help="held-out samples of the final NLL")
    ev.add_argument("--eval-tol", type=_positive, default=1e-6,
                    help="rtol = atol of the dopri5 solves of every held-out NLL (exact trace)")
    ev.add_argument("--plot-grid", type=_int_in(2), default=150, help="the density panel's grid is N x N")
    ev.add_argument("--plot-samples", type=_int_in(1), default=20000, help="model samples in the picture")
    return parser


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject options that do not apply to the objective (they would change nothing); fill
    in the defaults from the preset (the objective's demo preset when --preset is not given)."""
    fm_options = {"path": "--path", "coupling": "--coupling", "sigma_min": "--sigma-min"}
    if args.objective == "flow_matching":
        for name in ("lambda_kinetic", "lambda_jacobian"):
            if getattr(args, name):
                parser.error(f"argument --{name.replace('_', '-')}: the RNODE penalty applies to --objective mle only")
    else:
        for name, flag in fm_options.items():
            if getattr(args, name) is not None:
                parser.error(f"argument {flag}: applies to --objective flow_matching only")
    if args.preset is None:
        args.preset = DEMO_PRESETS[args.objective]
    defaults = _preset_defaults(PRESETS[args.preset], args.objective)
    if args.objective == "mle":  # the flow-matching options stay None: unused
        defaults = {k: v for k, v in defaults.items() if k not in fm_options}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.objective == "mle" and args.method in FIXED_METHODS and args.ode_steps is None:
        parser.error(f"argument --ode-steps: --method {args.method} takes a grid, and --preset {args.preset} "
                     "names none")


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


def _same_settings_on_every_rank(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Under torchrun, stop every rank unless all were started with the same settings (the
    device aside: each rank may name its own GPU)."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "device"}
    ranks = distributed.all_gather_object(settings)
    for rank, other in enumerate(ranks[1:], 1):
        for key, value in ranks[0].items():
            if other[key] != value:
                parser.error(
                    f"argument --{key.replace('_', '-')}: {other[key]!r} on rank {rank}, {value!r} on rank 0; "
                    "start every rank with the same settings"
                )


def _claim_out(args: argparse.Namespace, lock: RunLock) -> str | None:
    """Create and lock ``--out``, and check its checkpoint against --resume/--overwrite;
    what is wrong, or ``None``. Rank 0 alone claims the directory."""
    out, checkpoint = args.out, args.out / "checkpoint.pt"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"argument --out: cannot create {str(out)!r}: {error.strerror or error}"
    try:
        lock.acquire()
    except RunLockedError as error:
        return f"argument --out: {error}"
    except OSError as error:
        return f"argument --out: cannot lock {str(lock.path)!r}: {error.strerror or error}"
    exists = checkpoint.exists() or checkpoint.is_symlink()
    if args.resume and not exists:
        return f"argument --resume: no checkpoint at {str(checkpoint)!r}"
    if exists and not (args.resume or args.overwrite):
        return (f"argument --out: {str(checkpoint)!r} exists; pass --resume to continue that run or --overwrite "
                "to start over")  # fmt: skip
    if args.overwrite:  # every output of the old run: none of it may sit beside the new run's
        for path in (args.out / name for name in OUTPUTS):
            if (path.exists() or path.is_symlink()) and not path.is_dir():
                try:
                    path.unlink()
                except OSError as error:
                    return f"argument --overwrite: cannot delete {str(path)!r}: {error.strerror or error}"
    return None


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that decide the training, stored in the checkpoint: a resume must
    share them. Settings a run does not use (an adaptive method's tolerances on a fixed
    grid, the solver under flow matching, the evaluation's) are left out."""
    keys = ["dataset", "preset", "batch_size", "lr", "schedule", "ema", "hidden", "activation", "seed", "objective"]
    if args.schedule != "constant":
        keys.append("steps")  # the schedule spans --steps
    if args.objective == "mle":
        keys += ["trace", "method", "lambda_kinetic", "lambda_jacobian"]
        keys += ["ode_steps"] if args.method in FIXED_METHODS else ["rtol", "atol"]
    else:
        keys += list(FM_DEFAULTS)
    config = {k: getattr(args, k) for k in keys}
    config["hidden"] = list(config["hidden"])
    return config


def _check_resume(parser: argparse.ArgumentParser, trainer: Trainer, config: dict[str, Any], steps: int) -> dict:
    """The checkpoint's state, once it is readable and was trained with ``config``."""
    try:
        state = trainer.read_checkpoint()
    except CheckpointError as error:
        parser.error(f"argument --resume: {error}")
    saved = state["config"]
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} in the checkpoint, {v!r} now"
            for k, v in config.items() if saved.get(k) != v]  # fmt: skip
    diff += [f"--{k.replace('_', '-')} {v!r} in the checkpoint, unused now"
             for k, v in saved.items() if k not in config]  # fmt: skip
    if diff:
        parser.error("argument --resume: the checkpoint was trained with other settings: " + "; ".join(diff))
    if steps < state["step"]:
        parser.error(f"argument --steps: {steps} is below the {state['step']} steps of the checkpoint")
    return state


def _flow(args: argparse.Namespace) -> ContinuousFlow:
    """The training flow: the preset's field and solver with the options replacing them
    (their values, filled in from the preset, equal its own where not given)."""
    solver = {}
    if args.objective == "mle":  # flow matching never solves while training
        solver = {
            "trace": args.trace,
            "method": args.method,
            "steps": args.ode_steps if args.method in FIXED_METHODS else None,
            "rtol": args.rtol,  # None: the solver's default
            "atol": args.atol,
            "regularize": bool(args.lambda_kinetic or args.lambda_jacobian),
        }
    return default_flow(2, args.hidden, preset=args.preset, activation=args.activation, **solver)


def exact_flow(flow: ContinuousFlow, tol: float) -> ContinuousFlow:
    """The evaluator of ``flow``'s field: dopri5 at rtol = atol = ``tol``, exact trace."""
    return ContinuousFlow(flow.vector_field, T=flow.T, trace="exact", rtol=tol, atol=tol)


def _objective(args: argparse.Namespace) -> Objective:
    if args.objective == "flow_matching":
        return FlowMatching(path=args.path, coupling=args.coupling, sigma_min=args.sigma_min)
    return MaximumLikelihood(args.lambda_kinetic, args.lambda_jacobian)


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: non-finite numbers are written as null."""
    return value if value is not None and math.isfinite(value) else None


def _write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (:data:`EXIT_CODES`; bad arguments exit 2
    through argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    device = distributed.setup(_device(parser, args.device))  # joins torchrun's process group, if any
    _same_settings_on_every_rank(parser, args)
    if args.batch_size % distributed.get_world_size():
        world = distributed.get_world_size()
        parser.error(f"argument --batch-size: {args.batch_size} is not a multiple of the {world} processes")
    lock = RunLock(args.out)
    try:
        problem = distributed.broadcast_object(_claim_out(args, lock) if distributed.is_main() else None)
        if problem:
            parser.error(problem)
        return _run(parser, args, device)
    finally:
        lock.release()


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, device: torch.device) -> int:
    """Train, evaluate, draw; ``--out`` is claimed."""
    checkpoint = args.out / "checkpoint.pt"
    config = _config(args)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    flow = _flow(args).to(device)
    held_out = datasets.sample(args.dataset, args.eval_size, seed=step_seed(args.seed, EVAL_STREAM), device=device)
    try:
        trainer = Trainer(
            flow,
            lambda step: datasets.sample(args.dataset, args.batch_size, seed=step_seed(args.seed, step)),
            _objective(args),
            lr=args.lr,
            schedule=args.schedule,
            ema=args.ema,
            on_solver_error=args.on_solver_error,
            checkpoint=Checkpointing(checkpoint, every=args.checkpoint_every, config=config),
            evaluation=Evaluation(held_out[: args.eval_every_size], every=args.eval_every,
                                  scorer=lambda model: exact_flow(model, args.eval_tol)),  # fmt: skip
            desc=f"{args.dataset} {args.objective}",
            disable=False,
        )
    except OSError as error:  # the checkpoint cannot be written: say so before training
        parser.error(f"argument --out: {error}")
    if args.resume:
        try:
            trainer.resume(_check_resume(parser, trainer, config, args.steps))
        except CheckpointError as error:
            parser.error(f"argument --resume: {error}")
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

    # Everything after training reports its failure in metrics.json, written before the picture.
    evaluator = exact_flow(trainer.eval_model, args.eval_tol)
    failure = held_out_nll = None
    try:
        held_out_nll = trainer.evaluate(held_out, model=evaluator)
    except TrainingError as error:
        failure = {"stage": "evaluation", "error": str(error)}
    if not distributed.is_main():  # rank 0 reports, draws and writes
        return 0 if failure is None else 3
    true = datasets.true_log_prob(args.dataset, held_out)
    true_nll = None if true is None else -true.double().mean().item()
    solver = f"dopri5, exact trace, rtol=atol={args.eval_tol:g}"
    recent = [h["loss"] for h in trainer.history[-50:] if "loss" in h]
    metrics_path, figure = args.out / "metrics.json", args.out / "demo.png"
    metrics = {
        "dataset": args.dataset,
        "objective": args.objective,
        "steps": trainer.step,
        "steps_this_run": trainer.step - first,
        "held_out_nll": _finite(held_out_nll),
        "true_nll": true_nll,
        "eval_size": args.eval_size,
        "eval_solver": solver,
        "eval_nfe": evaluator.nfe,
        "final_train_loss": _finite(sum(recent) / len(recent)) if recent else None,
        "train_nfe": flow.nfe if args.objective == "mle" else 0,
        "skipped_batches": trainer.skipped,
        "train_seconds": trained - started,
        "wall_seconds": time.perf_counter() - started,
        "eval_history": [{"step": h["step"] + 1, "eval_nll": _finite(h["eval_nll"])}
                         for h in trainer.history if "eval_nll" in h],  # fmt: skip
        "config": config,
        "device": str(device),
        "failure": failure,
    }
    _write_metrics(metrics_path, metrics)
    if failure is not None:
        print(f"error: {failure['error']}; {metrics_path} records it", file=sys.stderr)
        return 3
    print(f"held-out NLL ({args.eval_size} samples; {solver}): {held_out_nll:.3f} nats")
    if true_nll is None:
        print(f"true density's NLL: no closed form for {args.dataset}")
    else:
        print(f"true density's NLL on the same samples: {true_nll:.3f} nats (gap {held_out_nll - true_nll:.3f})")

    from .plots import plot_flow  # matplotlib only now that there is something to draw

    true_text = "" if true_nll is None else f", true {true_nll:.3f}"
    title = f"{args.dataset}, {args.objective}, {trainer.step} steps: held-out NLL {held_out_nll:.3f}{true_text}"
    try:
        plot_flow(evaluator, held_out, figure, grid_size=args.plot_grid, samples=args.plot_samples, title=title)
    except (SolverError, OSError) as error:
        metrics["failure"] = {"stage": "plot", "error": f"{type(error).__name__}: {error}"}
        _write_metrics(metrics_path, metrics)
        print(f"error: drawing {figure} failed: {error}; {metrics_path} records it", file=sys.stderr)
        return 3
    finished = time.perf_counter()
    metrics["wall_seconds"] = finished - started
    _write_metrics(metrics_path, metrics)
    print(f"wrote {figure}, {metrics_path}, {checkpoint} ({finished - started:.0f} s)")
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """:func:`main` as a process: leaves torchrun's process group on the way out."""
    try:
        status = main(argv)
        # Leave together: a rank that tears gloo down while rank 0 still plots and writes
        # was seen to abort (SIGABRT) once under load.
        distributed.barrier()
        return status
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(run())
