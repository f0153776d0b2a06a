"""The one training loop, :class:`Trainer`, and the helpers around it: a progress bar
(:func:`progress_loop`), the held-out NLL (:func:`nll`) and per-step data seeds
(:func:`step_seed`).

The demo, the examples and the benchmarks all train through :class:`Trainer`: an objective
object (:mod:`pyro_cnf.training.objectives`), Adam with a learning-rate schedule and an
optional weight average (EMA), a step or CPU-time budget, callbacks, atomic checkpoints
(:mod:`pyro_cnf.training.checkpoint`) and data parallelism under ``torchrun``
(:mod:`pyro_cnf.training.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..checks import check_inputs
from ..flow import ContinuousFlow, SolverError
from ..nets import ODENet
from ..presets import PRESETS, Preset, for_lr, get_preset
from . import distributed
from .checkpoint import CheckpointError, check_writable, load_checkpoint, save_checkpoint
from .objectives import MaximumLikelihood, Objective

__all__ = [
    "progress_loop",
    "nll",
    "step_seed",
    "cosine_decay",
    "Checkpointing",
    "Evaluation",
    "Trainer",
    "TrainingError",
    "SCHEDULES",
]

#: A batch: rows ``(B, d)``, or rows and their context ``(B, c)`` (``None`` for none).
Batch = Union[Tensor, "tuple[Tensor, Tensor | None]"]
#: ``(trainer, metrics of the step) -> stop?``, called after every step.
Callback = Callable[["Trainer", "dict[str, float]"], "bool | None"]


def progress_loop(
    step: Callable[[int], Mapping[str, float] | None],
    steps: int | None,
    *,
    start: int = 0,
    desc: str = "",
    disable: bool | None = None,
) -> list[dict[str, float]]:
    """Run ``step(i)`` for ``i = start, start + 1, ...`` under one tqdm bar, up to ``steps``
    (exclusive; ``None``: no end) or until ``step`` returns ``None``.

    The bar shows the metrics ``step`` returns (e.g. loss, nfe) next to tqdm's it/s.

    Arguments:
        step: Called with the step index; returns a mapping of metric name to number, or
            ``None`` to stop without counting that index.
        steps: One past the last index (the total, not the number still to run).
        start: The first index, e.g. the step a checkpoint stopped at.
        desc: The bar's label.
        disable: Hide the bar; ``None`` hides it when the output is not a terminal.

    Returns:
        The metrics of every step run, in order (dicts of floats).

    Example:
        >>> progress_loop(lambda i: {"square": i * i}, 4, start=2, disable=True)
        [{'square': 4.0}, {'square': 9.0}]
        >>> len(progress_loop(lambda i: {"i": i} if i < 3 else None, None, disable=True))
        3
    """
    if steps is not None and steps < start:
        raise ValueError(f"steps must be >= start, got steps={steps}, start={start}")
    indices = itertools.count(start) if steps is None else range(start, steps)
    history = []
    with tqdm(indices, desc=desc, initial=start, total=steps, disable=disable) as bar:
        for i in bar:
            out = step(i)
            if out is None:
                break
            metrics = {k: float(v) for k, v in out.items()}
            history.append(metrics)
            if not bar.disable:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
    return history


def _rows(x: Any, context: Any = None, name: str = "data") -> tuple[Tensor, Tensor | None]:
    """``(x, context)`` checked as training data: ``(N >= 1, d)`` rows, one context row each."""
    return check_inputs(x, context, input_dim=None, context_dim=None, name=name, rows=True)


@contextlib.contextmanager
def _eval_mode(model: object) -> Iterator[None]:
    """Every submodule of ``model`` (if a module) in eval mode inside, as it was after."""
    modules = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    for module, _ in modules:
        module.training = False
    try:
        yield
    finally:
        for module, training in modules:
            module.training = training


def nll(
    model: nn.Module | Callable[..., Tensor], data: Tensor, context: Tensor | None = None, batch_size: int = 4096
) -> float:
    """The mean negative log-likelihood of ``data`` (shape ``(N, d)``, with ``context`` of
    shape ``(N, c)``), ``batch_size`` rows at a time, under ``torch.no_grad()``.

    ``model`` is a module with ``log_prob(x[, context])`` or such a function. A module is
    evaluated in eval mode whatever its mode (and put back after), so that the number is
    the same on every call: a :class:`~pyro_cnf.ContinuousFlow` with ``trace="auto"`` then
    uses the exact trace, never the Hutchinson estimate of training.

    Example:
        >>> normal = lambda x: torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
        >>> round(nll(normal, torch.zeros(10, 2), batch_size=3), 4)  # log(2 pi)
        1.8379
    """
    data, context = _rows(data, context)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    log_prob = getattr(model, "log_prob", model) if isinstance(model, nn.Module) else model
    total = 0.0
    with torch.no_grad(), _eval_mode(model):
        for start in range(0, len(data), batch_size):
            x = data[start : start + batch_size]
            value = log_prob(x) if context is None else log_prob(x, context[start : start + batch_size])
            total -= value.double().sum().item()
    return total / len(data)


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the data of ``step`` in the run seeded by ``seed``.

    Hashing keeps the streams of different runs apart (``seed + step`` would reuse run 0's
    step 1 as run 1's step 0), and makes a step's data independent of the steps before it,
    which is what lets a resumed run repeat an uninterrupted one exactly.

    Example:
        >>> step_seed(0, 1) == step_seed(0, 1), step_seed(0, 1) == step_seed(1, 0)
        (True, False)
    """
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def cosine_decay(fraction: float) -> float:
    """The ``"cosine"`` schedule: the factor on the learning rate once ``fraction`` of the
    training is done, from 1 down to 0.

    Example:
        >>> cosine_decay(0.0), cosine_decay(0.5), cosine_decay(1.0)
        (1.0, 0.5, 0.0)
    """
    return 0.5 * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))


#: Learning-rate schedules by name: fraction of the training done -> factor on ``lr``.
SCHEDULES: dict[str, Callable[[float], float] | None] = {"constant": None, "cosine": cosine_decay}


_GAINS = ("input_gain", "time_gain", "hidden_gain")


def _warn_of_gains_on_a_fixed_grid(model: nn.Module, objective: Objective) -> None:
    """Warn when maximum likelihood trains an ODENet with gains on a fixed grid: a field that
    learns that fast learns the grid's error too (BENCHMARKS.md, "Gains")."""
    field = model.vector_field if isinstance(model, ContinuousFlow) else None
    if (isinstance(objective, MaximumLikelihood) and isinstance(field, ODENet) and model.steps is not None
            and any(getattr(field, name) != 1 for name in _GAINS)):
        warnings.warn(
            f"training an ODENet with gains (input_gain={field.input_gain:g}, time_gain={field.time_gain:g}, "
            f"hidden_gain={field.hidden_gain:g}) by maximum likelihood on a fixed grid of {model.steps} steps: "
            "such a field learns the grid's error (a training loss far below the held-out NLL); build it "
            "without gains (preset='density_fixed_grid'), or train with an adaptive method (the default dopri5)",
            stacklevel=3,
        )


def _preset_of(model: nn.Module) -> Preset | str | None:
    """The preset ``model``'s flow was built from (the first :class:`~pyro_cnf.ContinuousFlow`
    among its modules that names one), ``None`` if none does; only its name when it is not in
    :data:`~pyro_cnf.presets.PRESETS` (a :class:`~pyro_cnf.presets.Preset` of the user's own)."""
    names = (m.preset for m in model.modules() if isinstance(m, ContinuousFlow) and m.preset is not None)
    name = next(names, None)
    return None if name is None else PRESETS.get(name, name)


def _check_lr(recipe: Preset, lr: float) -> None:
    """Warn when ``lr`` lies outside the rates ``recipe`` was tuned at, naming the preset for it."""
    low, high = recipe.lr_range
    if low <= lr <= high:
        return
    better = for_lr(recipe.name, lr) if recipe.name in PRESETS else recipe
    advice = (f"build the flow with preset={better.name!r}, tuned at {better.lr_range[0]:g}-{better.lr_range[1]:g}"
              if better is not recipe else f"its own rate is {recipe.lr:g}")
    warnings.warn(
        f"Trainer: lr={lr:g} is outside the rates the flow's preset {recipe.name!r} was tuned at "
        f"({low:g}-{high:g}); {advice}",
        stacklevel=3,
    )


class TrainingError(RuntimeError):
    """Training stopped: the ODE solver failed, or the loss was not finite.

    Attributes:
        step: The index of the step that failed (for a failed evaluation: the steps done).
        checkpoint_step: The step count of the checkpoint on disk (``None`` if none was written).
    """

    def __init__(self, message: str, step: int, checkpoint_step: int | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint_step = checkpoint_step


def _check_json(value: Any, where: str) -> None:
    """Raise ``TypeError`` naming the first value at ``where`` that is not JSON."""
    if type(value) is dict:  # a subclass (defaultdict, ...) would not load either
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has the key {key!r}, a {type(key).__name__}; a checkpoint's config "
                                "keys are strings")
            _check_json(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif value is not None and type(value) not in (str, int, float, bool):
        raise TypeError(f"{where} is a {type(value).__name__}; a checkpoint's config holds JSON values only "
                        "(dict, list, str, int, float, bool, None): convert it, e.g. str(...) or float(...)")


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often a :class:`Trainer` saves.

    Arguments:
        path: The checkpoint file. Its directory must exist and be writable, and the file,
            if present, replaceable; the trainer checks this when it is built.
        every: Save every this many steps, and at the end of :meth:`Trainer.fit`.
        config: Settings stored in the checkpoint (e.g. to check a resume): JSON values only
            (dicts with string keys, lists, tuples, strings, numbers, booleans, ``None``),
            checked here, since a checkpoint loads nothing else (``weights_only``).

    Example:
        >>> Checkpointing("run.pt", config={"lr": 1e-3, "hidden": [64, 64]}).every
        100
        >>> from pathlib import Path
        >>> Checkpointing("run.pt", config={"data": Path("x.csv")})
        Traceback (most recent call last):
        ...
        TypeError: config['data'] is a PosixPath; a checkpoint's config holds JSON values only (dict, list, str, int, float, bool, None): convert it, e.g. str(...) or float(...)
    """

    path: str | os.PathLike
    every: int = 100
    config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        _check_json(self.config, "config")


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Held-out data and how a :class:`Trainer` scores them.

    Arguments:
        data: Shape ``(M, d)``.
        context: Shape ``(M, c)``, or ``None``.
        every: The NLL of ``data`` every this many steps, in the metrics as ``"eval_nll"``;
            ``0``: only when :meth:`Trainer.evaluate` is called.
        scorer: Maps the trained model (its weight average when the trainer keeps one) to
            the model whose ``log_prob`` is scored, e.g. the same field under a tight
            adaptive solver: ``lambda flow: ContinuousFlow(flow.vector_field, rtol=1e-6,
            atol=1e-6)``. Default: the model itself.
        batch_size: Rows per ``log_prob`` call.
    """

    data: Tensor
    context: Tensor | None = None
    every: int = 0
    scorer: Callable[[nn.Module], nn.Module] | None = None
    batch_size: int = 4096

    def __post_init__(self) -> None:
        _rows(self.data, self.context, "the evaluation data")
        if self.every < 0 or self.batch_size < 1:
            raise ValueError(f"expected every >= 0 and batch_size >= 1, got {self.every}, {self.batch_size}")


class _StepLoss(nn.Module):
    """The loss of one training step as a module, so that DistributedDataParallel wraps it
    whole.

    DDP averages the gradients in hooks that its ``forward`` arms for the next backward.
    With the whole loss inside one DDP ``forward`` a step is one forward and one backward,
    whatever the model calls meanwhile (a field's ``forward``, ``divergence`` and ``jvp``,
    the adjoint solve's vector-Jacobian products), and the model stays as it is; DDP around
    the field alone would see only the calls that go through its ``forward``.
    """

    def __init__(self, model: nn.Module, objective: Objective, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.names = names

    def forward(self, *inputs: Tensor | None) -> tuple[Tensor, Tensor]:
        """The loss of this rank's rows and its metrics, a detached vector in the order of
        :attr:`names`."""
        loss, metrics = self.objective.loss(self.model, *inputs)
        return loss, torch.stack([metrics[name].detach().reshape(()) for name in self.names])


class Trainer:
    """Train ``model`` on ``batches(step)`` by ``objective``, under one progress bar, with
    atomic checkpoints, resuming exactly where a checkpoint stopped.

    A step: ``batches(step)`` gives the global batch; the objective draws what it needs
    for it (:meth:`~pyro_cnf.training.objectives.Objective.draw`); Adam takes a step on its
    loss at ``lr`` times the schedule's factor; the weight average (``ema``) follows. Then,
    as configured, the held-out NLL, a checkpoint, and the callbacks.

    Budgets: :meth:`fit` runs up to a number of steps, a CPU-time budget (the process CPU
    time of the steps themselves: not drawing the data, evaluating, saving or the
    callbacks), or both, whichever ends first; a callback may stop it earlier. The
    schedule sees the fraction of the budget done at the start of the step (of the steps,
    of the CPU time, the larger of the two).

    Resuming is exact: a checkpoint holds the model, the optimiser, the weight average, the
    step count, the CPU time spent, the torch random state (CPU, and the model's CUDA
    device), the metrics so far and ``config``; the data come from ``batches(step)``, a
    function of the step alone (see :func:`step_seed`), so a run resumed from step ``k``
    repeats the uninterrupted run from step ``k`` on. The checkpoint's path is checked when
    the trainer is built, so that a missing directory or an unwritable file stops the run
    before its first step.

    Failures: a :class:`~pyro_cnf.SolverError` stops training with :class:`TrainingError`,
    leaving the last checkpoint as it was, or with ``on_solver_error="skip"`` drops the
    batch and counts it in :attr:`skipped`, until :attr:`skip_limit` steps in a row have
    failed. A NaN or infinite loss always stops with :class:`TrainingError` naming the
    step, without saving.

    Data parallel: built inside a process group of several ranks (``torchrun``, see
    :mod:`pyro_cnf.training.distributed`), the trainer wraps the step's loss in
    ``DistributedDataParallel``. ``batches(step)`` must give the same global batch on every
    rank (as a function of the step alone does); each rank trains on its slice (the batch
    size must be a multiple of the number of ranks), and the objective's draws are made for
    the global batch before slicing, so ``N`` ranks take the steps of one process exactly
    (fixed-grid solvers; adaptive ones within their tolerances, since the step sizes follow
    the errors of each slice). Probes drawn inside the loss (Hutchinson, RNODE) come from
    each rank's own stream (:func:`~pyro_cnf.training.distributed.rank_random_stream`).
    The metrics, the CPU time and the callbacks' decisions to stop are reduced over ranks,
    a solver failure on any rank is a failure on all, held-out NLLs are computed over the
    ranks' slices of the data, only rank 0 saves and shows a progress bar, and checkpoints
    resume under any number of ranks.

    Arguments:
        model: What to train: anything the objective accepts.
        batches: ``step -> x`` of shape ``(B, d)`` or ``(x, context)`` with context of
            shape ``(B, c)``, moved to the model's device and dtype; the global batch.
        objective: A :class:`~pyro_cnf.training.objectives.Objective`.
        lr: Adam's learning rate; ``None``: the preset's (:attr:`~pyro_cnf.presets.Preset.lr`).
            A rate outside the range the flow's preset was tuned at
            (:attr:`~pyro_cnf.presets.Preset.lr_range`) gives a warning that names the preset
            tuned for it (e.g. ``"density_high_lr"`` for the density field at 1e-2).
        schedule: ``"constant"``, ``"cosine"`` (down to 0 at the end of the budget), or a
            function of the fraction done in ``[0, 1)`` to the factor on ``lr``; ``None``:
            the preset's ``training["schedule"]``, ``"constant"`` where it names none.
        preset: Where ``lr`` and ``schedule`` come from when they are not given: a name in
            :data:`~pyro_cnf.presets.PRESETS` or a :class:`~pyro_cnf.presets.Preset`.
            ``None``: the preset the model's flow was built from (``preset`` of the first
            :class:`~pyro_cnf.ContinuousFlow` among the model's modules that has one, e.g.
            the flow inside an nflows ``Flow`` around a :class:`~pyro_cnf.CNFTransform`),
            else ``"density"``.
        ema: The decay of an exponential moving average of the weights, updated after
            every step, in ``[0, 1)``; ``0`` keeps none. :attr:`eval_model` is the average.
        on_solver_error: ``"stop"`` or ``"skip"``.
        checkpoint: A :class:`Checkpointing`, or ``None`` for no checkpoints.
        evaluation: An :class:`Evaluation`, or ``None``.
        callbacks: Functions ``(trainer, metrics) -> stop`` called after every step; a true
            result ends :meth:`fit` after that step. Under ``torchrun`` the ranks stop when
            any of them asks to.
        desc: The progress bar's label.
        disable: Hide the bar (``None``: when not on a terminal).

    Attributes:
        step: Steps done (the index of the next one).
        history: The metrics of every step done, each with its ``"step"`` index.
        skipped: Batches dropped after a solver failure.
        cpu_seconds: Process CPU time of the steps so far (the mean over ranks).
        saved_step: The step count of the checkpoint on disk, ``None`` before the first.
        skip_limit: Failed steps in a row that stop a ``"skip"`` run (10).

    Example:
        >>> from pyro_cnf import default_flow
        >>> flow = default_flow(2, (8,), preset="density_high_lr")
        >>> def batches(step):  # the data of a step depend on the step alone
        ...     return torch.randn(32, 2, generator=torch.Generator().manual_seed(step_seed(0, step))) + 1.0
        >>> trainer = Trainer(flow, batches, schedule="cosine", disable=True)
        >>> trainer.lr  # the flow's preset's
        0.01
        >>> history = trainer.fit(20)
        >>> trainer.step, history[-1]["loss"] < history[0]["loss"], sorted(history[0])
        (20, True, ['loss', 'nfe', 'nll'])
    """

    skip_limit: int = 10

    def __init__(
        self,
        model: nn.Module,
        batches: Callable[[int], Batch],
        objective: Objective = MaximumLikelihood(),
        *,
        lr: float | None = None,
        schedule: str | Callable[[float], float] | None = None,
        preset: str | Preset | None = None,
        ema: float = 0.0,
        on_solver_error: str = "stop",
        checkpoint: Checkpointing | None = None,
        evaluation: Evaluation | None = None,
        callbacks: Sequence[Callback] = (),
        desc: str = "train",
        disable: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
            raise TypeError(f"model must be a torch module with parameters, got {type(model).__name__}")
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be an Objective (e.g. MaximumLikelihood()), got {objective!r}")
        names = objective.metrics(model)
        _warn_of_gains_on_a_fixed_grid(model, objective)
        if preset is not None:
            preset = get_preset(preset, "Trainer")  # validated even when lr and schedule are given
        named = preset or _preset_of(model)
        if isinstance(named, str) and (lr is None or schedule is None):
            raise ValueError(
                f"Trainer: the model's flow was built from the preset {named!r}, which is not in "
                "pyro_cnf.presets.PRESETS; pass that Preset as preset=, or give lr= and schedule="
            )
        if isinstance(named, Preset) and isinstance(lr, (int, float)):
            _check_lr(named, lr)  # a rate the preset was not tuned at: say which preset was
        recipe = named if isinstance(named, Preset) else PRESETS["density"]
        lr = recipe.lr if lr is None else lr
        schedule = recipe.schedule if schedule is None else schedule
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if not callable(schedule) and schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)} or a function, got {schedule!r}")
        if not (isinstance(ema, (int, float)) and 0 <= ema < 1):
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        if on_solver_error not in ("stop", "skip"):
            raise ValueError(f"on_solver_error must be 'stop' or 'skip', got {on_solver_error!r}")
        if checkpoint is not None:
            check_writable(checkpoint.path)
        self.model = model
        # the same object after model.to(...), which moves parameters in place
        self._first_parameter = next(model.parameters())
        self.batches = batches
        self.objective = objective
        self.lr = float(lr)
        self.factor = schedule if callable(schedule) else SCHEDULES[schedule]
        self.ema = float(ema)
        self.averaged = copy.deepcopy(model).requires_grad_(False) if ema else None
        self.on_solver_error = on_solver_error
        self.checkpoint = checkpoint
        self.evaluation = evaluation
        self.callbacks = list(callbacks)
        self.desc = desc
        self.disable = disable
        self._loss = _StepLoss(model, objective, names)
        # the module whose forward the step calls: the loss, or DDP around it
        self._step_loss: nn.Module = self._loss
        if distributed.is_distributed():
            device = self._like.device
            device_ids = [device] if device.type == "cuda" else None  # CPU modules take none
            self._step_loss = DistributedDataParallel(self._loss, device_ids=device_ids)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.step = 0
        self.skipped = 0
        self.cpu_seconds = 0.0
        self.history: list[dict[str, float]] = []
        self.saved_step: int | None = None
        self._failed_in_a_row = 0

    @property
    def _like(self) -> Tensor:
        """A parameter of the model: its dtype and device are the model's."""
        return self._first_parameter

    @property
    def eval_model(self) -> nn.Module:
        """The model to evaluate and keep: the weight average with ``ema``, else the model."""
        return self.model if self.averaged is None else self.averaged

    def fit(self, steps: int | None = None, *, cpu_seconds: float | None = None) -> list[dict[str, float]]:
        """Train from :attr:`step` up to ``steps`` steps in all, or until :attr:`cpu_seconds`
        reaches ``cpu_seconds``, whichever comes first (or a callback stops it); save at
        the end.

        Returns:
            The metrics of the steps run by this call.
        """
        if steps is None and cpu_seconds is None:
            raise ValueError("fit needs a budget: steps, cpu_seconds or both")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
            raise TypeError(f"fit: steps must be an int (the steps in all), got {steps!r}")
        if steps is not None and steps < self.step:
            raise ValueError(f"steps ({steps}) is below the steps already done ({self.step})")
        if cpu_seconds is not None and (isinstance(cpu_seconds, bool) or not isinstance(cpu_seconds, (int, float))
                                        or not (math.isfinite(cpu_seconds) and cpu_seconds > 0)):
            raise ValueError(f"fit: cpu_seconds must be a finite number > 0, got {cpu_seconds!r}")
        self._follow_the_model()
        self.model.train()
        self._stop = False

        def step(i: int) -> dict[str, float] | None:
            if self._stop or (cpu_seconds is not None and self.cpu_seconds >= cpu_seconds):
                return None
            done = max(i / steps if steps else 0.0, self.cpu_seconds / cpu_seconds if cpu_seconds else 0.0)
            return self._train_step(i, done)

        disable = self.disable if distributed.is_main() else True
        history = progress_loop(step, steps, start=self.step, desc=self.desc, disable=disable)
        if self.checkpoint is not None and self.saved_step != self.step:
            self.save()
        return history

    def _follow_the_model(self) -> None:
        """Move the optimiser's state and the weight average to the model's dtype and device,
        should the model have moved since (``model.double()`` after a first ``fit``)."""
        like = self._like
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                    state[key] = value.to(like)
        if self.averaged is not None:
            self.averaged.to(like)

    def _train_step(self, i: int, done: float) -> dict[str, float]:
        """Step ``i``, then its bookkeeping: history, evaluation, checkpoint, callbacks."""
        batch = self.batches(i)
        if isinstance(batch, (tuple, list)) and len(batch) != 2:
            got = f"{len(batch)} items"
            raise ValueError(f"batches({i}) must return a tensor of shape (B, d) or a pair (x, context), got {got}")
        x, context = _rows(*(batch if isinstance(batch, (tuple, list)) else (batch, None)), name=f"batches({i})")
        parallel = distributed.is_distributed()
        start = time.process_time()
        metrics = self._optimise(i, done, x, context, parallel)
        spent = time.process_time() - start
        if parallel:  # the ranks agree on the budget spent, which drives the schedule
            spent = distributed.all_reduce_mean(torch.tensor(spent, dtype=torch.float64, device=x.device)).item()
        self.cpu_seconds += spent
        self.step = i + 1
        self.history.append({"step": i, **metrics})
        evaluation = self.evaluation
        if evaluation is not None and evaluation.every and self.step % evaluation.every == 0:
            metrics["eval_nll"] = self.history[-1]["eval_nll"] = self._periodic_evaluation()
        if self.checkpoint is not None and self.step % self.checkpoint.every == 0:
            self.save()
        stop = any([bool(callback(self, metrics)) for callback in self.callbacks])
        if parallel:  # one rank's callback stops them all
            stop = distributed.all_reduce_sum(torch.tensor([float(stop)], device=self._like.device)).item() > 0
        self._stop = stop
        return metrics

    def _optimise(self, i: int, done: float, x: Tensor, context: Tensor | None, parallel: bool) -> dict[str, float]:
        """The optimiser step on the global batch ``x`` (this rank's slice of it); its metrics."""
        # every step, so that the trainer's lr holds after a checkpoint's optimiser state is loaded
        factor = 1.0 if self.factor is None else self.factor(done)
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 0):
            raise ValueError(f"Trainer: the schedule gave the factor {factor!r} at {done:.3g} of the budget; "
                             "a schedule must give a finite number >= 0")
        rate = self.lr * factor
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        like = self._like
        inputs = self.objective.draw(self.model, x.to(like), None if context is None else context.to(like))
        if parallel:
            inputs = [None if v is None else distributed.shard(v) for v in inputs]
        self.optimizer.zero_grad(set_to_none=True)
        failure = None
        try:
            with self._random_stream():
                loss, values = self._step_loss(*inputs)
        except SolverError as error:
            failure, values = error, like.new_zeros(len(self._loss.names))
        failed = failure is not None
        if parallel:
            # The step's first collective: whether any rank's solve failed, so that all ranks
            # skip or stop together, and the mean metrics.
            reduced = distributed.all_reduce_sum(torch.cat([values.new_tensor([failed]), values]))
            failed, values = bool(reduced[0] > 0), reduced[1:] / distributed.get_world_size()
        if failed:
            return self._solver_failed(i, failure)
        metrics = dict(zip(self._loss.names, values.tolist()))
        if not math.isfinite(metrics["loss"]):
            raise TrainingError(
                f"the loss is {metrics['loss']} at step {i}; stopped without saving" + self._checkpoint_note(),
                i,
                self.saved_step,
            )
        try:
            loss.backward()
        except SolverError as error:  # the adjoint's backward solve
            if parallel:  # the other ranks wait in DDP's all-reduce
                raise TrainingError(
                    f"the adjoint ODE solve failed in backward at step {i} on this rank: {error}; the other "
                    "ranks stop at the collective timeout" + self._checkpoint_note(), i, self.saved_step
                ) from error
            self.optimizer.zero_grad(set_to_none=True)
            return self._solver_failed(i, error)
        self.optimizer.step()
        self._failed_in_a_row = 0
        if self.averaged is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.averaged.parameters()), list(self.model.parameters()), 1 - self.ema)
        return metrics

    def _solver_failed(self, i: int, failure: SolverError | None) -> dict[str, float]:
        """Stop (``on_solver_error="stop"``, or too many failures in a row) or count a skipped step."""
        where = " on another rank" if failure is None else f": {failure}"
        if self.on_solver_error == "stop":
            raise TrainingError(
                f"the ODE solver failed at step {i}{where}" + self._checkpoint_note(), i, self.saved_step
            ) from failure
        self.skipped += 1
        self._failed_in_a_row += 1
        if self._failed_in_a_row >= self.skip_limit:
            raise TrainingError(
                f"the ODE solver failed at {self._failed_in_a_row} steps in a row, steps "
                f"{i + 1 - self._failed_in_a_row} to {i} (the limit of on_solver_error='skip'); last failure{where}"
                + self._checkpoint_note(),
                i,
                self.saved_step,
            ) from failure
        return {"skipped": float(self.skipped)}

    def _checkpoint_note(self) -> str:
        if self.checkpoint is None:
            return ""
        if self.saved_step is None:
            return f"; no checkpoint was written to {self.checkpoint.path}"
        return f"; the checkpoint of step {self.saved_step} in {self.checkpoint.path} is kept"

    def _random_stream(self) -> contextlib.AbstractContextManager[None]:
        # probes drawn inside the loss are drawn for this rank's rows alone
        if self.objective.draws_in_loss:
            return distributed.rank_random_stream(self._like.device)
        return contextlib.nullcontext()

    def _periodic_evaluation(self) -> float:
        try:
            return self.evaluate()
        except TrainingError:
            if self.on_solver_error == "stop":
                raise
            return math.nan  # recorded as such; training goes on

    def evaluate(
        self, data: Tensor | None = None, context: Tensor | None = None, model: nn.Module | None = None
    ) -> float:
        """The mean NLL of ``data`` (default: the :class:`Evaluation`'s data) under ``model``
        (default: the evaluation's scorer of :attr:`eval_model`) by :func:`nll`: exact, in
        eval mode. In a distributed run each rank solves its slice of the rows and the sums
        are reduced.

        Raises:
            TrainingError: The ODE solver failed on some rank.
        """
        evaluation = self.evaluation
        if data is None:
            if evaluation is None:
                raise ValueError("evaluate() needs data, or a trainer built with an Evaluation")
            data, context = evaluation.data, evaluation.context
        data, context = _rows(data, context)
        if model is None:
            scorer = None if evaluation is None else evaluation.scorer
            model = self.eval_model if scorer is None else scorer(self.eval_model)
        batch_size = 4096 if evaluation is None else evaluation.batch_size
        like = self._like
        rows = distributed.shard(data.to(like), even=False)
        rows_context = None if context is None else distributed.shard(context.to(like), even=False)
        failure, total = None, 0.0
        try:
            if len(rows):
                total = len(rows) * nll(model, rows, rows_context, batch_size=batch_size)
        except SolverError as error:
            failure = error
        failed, total = distributed.all_reduce_sum(
            torch.tensor([failure is not None, total], dtype=torch.float64, device=like.device)
        ).tolist()
        if failed:
            where = " on another rank" if failure is None else f": {failure}"
            raise TrainingError(
                f"the ODE solver failed evaluating the NLL after step {self.step}{where}" + self._checkpoint_note(),
                self.step,
                self.saved_step,
            ) from failure
        return total / len(data)

    #: The entries of a checkpoint and their types, checked before a resume uses them.
    STATE_KEYS: Mapping[str, type | tuple[type, ...]] = {
        "model": dict, "optimizer": dict, "ema": (dict, type(None)), "step": int, "skipped": int,
        "cpu_seconds": float, "history": list, "rng": dict, "config": dict,
    }  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (see the class docstring), keyed as :attr:`STATE_KEYS`."""
        rng = {"torch": torch.get_rng_state()}
        device = self._like.device
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": None if self.averaged is None else self.averaged.state_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "cpu_seconds": self.cpu_seconds,
            "history": self.history,
            "rng": rng,
            "config": dict({} if self.checkpoint is None else self.checkpoint.config),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (e.g. from :meth:`read_checkpoint`)."""
        if (state["ema"] is None) != (self.averaged is None):
            raise ValueError(f"the state {'has' if self.averaged is None else 'lacks'} a weight average (ema)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.averaged is not None:
            self.averaged.load_state_dict(state["ema"])
        self.step = state["step"]
        self.skipped = state["skipped"]
        self.cpu_seconds = state["cpu_seconds"]
        self.history = list(state["history"])
        # the random states are CPU byte tensors, wherever map_location put the rest
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and self._like.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self._like.device)

    def save(self) -> None:
        """Write the checkpoint atomically (see :func:`~pyro_cnf.training.checkpoint.save_checkpoint`).
        In a distributed run rank 0 writes it and every rank returns once it is on disk, or
        raises if it is not."""
        if self.checkpoint is None:
            raise ValueError("this Trainer has no checkpoint path")
        failure = None
        if distributed.is_main():
            try:
                save_checkpoint(self.state_dict(), self.checkpoint.path)
            except Exception as error:  # noqa: BLE001 - re-raised below, after telling the other ranks
                failure = error
        # the other ranks learn whether the write failed, instead of waiting for rank 0 forever
        failed = distributed.all_reduce_sum(self._like.new_tensor([failure is not None])).item()
        if failure is not None:
            raise failure
        if failed:
            raise OSError(f"rank 0 failed to write the checkpoint {self.checkpoint.path}")
        self.saved_step = self.step

    def read_checkpoint(self) -> dict[str, Any]:
        """The checkpoint on disk, verified (checksum, entries); :class:`CheckpointError` if
        it cannot be used."""
        if self.checkpoint is None:
            raise ValueError("this Trainer has no checkpoint path")
        return load_checkpoint(self.checkpoint.path, self.STATE_KEYS, map_location=self._like.device)

    def resume(self, state: Mapping[str, Any] | None = None) -> bool:
        """Continue from the checkpoint (or ``state``, from :meth:`read_checkpoint`); return
        whether there was one.

        Raises:
            CheckpointError: The checkpoint is damaged, or holds another model.
        """
        if state is None:
            if self.checkpoint is None or not self.checkpoint.path.exists():
                return False
            state = self.read_checkpoint()
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            path = "the state" if self.checkpoint is None else self.checkpoint.path
            raise CheckpointError(path, f"it does not fit this trainer: {error}", damaged=False) from error
        self.saved_step = self.step
        return True
