"""Training loops: a progress bar, maximum likelihood on a tensor of data, held-out NLL.

:func:`progress_loop`, :func:`fit_density` and :func:`nll` are the small shared helpers
the examples use; :class:`Trainer` is the demo's resumable trainer of a
:class:`~pyro_cnf.ContinuousFlow` density (maximum likelihood, optionally RNODE-regularised,
or flow matching) with atomic checkpoints, data-parallel under ``torchrun`` (see
:mod:`pyro_cnf.distributed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import distributed
from ..flow import ContinuousFlow, SolverError, standard_normal_log_prob

__all__ = [
    "progress_loop",
    "fit_density",
    "nll",
    "step_seed",
    "save_atomic",
    "Trainer",
    "TrainingError",
    "OBJECTIVES",
]

#: Training objectives of :class:`Trainer`.
OBJECTIVES = ("mle", "flow_matching")

LogProb = Callable[[Tensor, "Tensor | None"], Tensor]


def progress_loop(
    step: Callable[[int], Mapping[str, float]],
    steps: int,
    *,
    start: int = 0,
    desc: str = "",
    disable: bool | None = None,
) -> list[dict[str, float]]:
    """Run ``step(i)`` for ``i`` in ``range(start, steps)`` under one tqdm bar.

    The bar shows the metrics ``step`` returns (e.g. loss, nfe) next to tqdm's it/s.

    Arguments:
        step: Called with the step index; returns a mapping of metric name to number.
        steps: One past the last index (the total, not the number still to run).
        start: The first index, e.g. the step a checkpoint stopped at.
        desc: The bar's label.
        disable: Hide the bar; ``None`` hides it when the output is not a terminal.

    Returns:
        The metrics of every step run, in order (``steps - start`` dicts of floats).

    Example:
        >>> progress_loop(lambda i: {"square": i * i}, 4, start=2, disable=True)
        [{'square': 4.0}, {'square': 9.0}]
    """
    if steps < start:
        raise ValueError(f"steps must be >= start, got steps={steps}, start={start}")
    history = []
    with tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=disable) as bar:
        for i in bar:
            metrics = {k: float(v) for k, v in step(i).items()}
            history.append(metrics)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
    return history


def fit_density(
    log_prob: LogProb,
    parameters: Iterable[torch.nn.Parameter],
    data: Tensor,
    *,
    context: Tensor | None = None,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    desc: str = "fit",
    penalty: Callable[[], Tensor] | None = None,
) -> list[dict[str, float]]:
    """Maximum likelihood with Adam on random minibatches.

    Each step draws ``batch_size`` rows without replacement (all rows when fewer) and
    minimises ``-log_prob(x_batch, c_batch).mean()`` plus ``penalty()``, which is called
    after ``log_prob`` so that it can read what that call left behind (e.g. a flow's RNODE
    integrals).

    Arguments:
        log_prob: ``(x, context or None) -> log density``, shapes ``(B, d), (B, c)`` to ``(B,)``.
        parameters: What Adam updates.
        data: Shape ``(N, d)``.
        context: Shape ``(N, c)``, batched with ``data`` row by row.
        steps: The number of optimiser steps.
        batch_size: Rows per step.
        lr, weight_decay: Adam's settings.
        seed: Seeds the minibatch draws (not the model's own randomness).
        desc: The progress bar's label.
        penalty: Adds a regulariser to the loss.

    Returns:
        Per step ``{"loss", "nll"}`` (and ``"penalty"`` when given).

    Example:
        >>> mu = torch.nn.Parameter(torch.zeros(2))
        >>> normal = lambda x, c: torch.distributions.Normal(mu, 1.0).log_prob(x).sum(-1)
        >>> history = fit_density(normal, [mu], torch.randn(500, 2) + 3.0, steps=300, lr=0.05, desc="")
        >>> torch.allclose(mu.detach(), torch.full((2,), 3.0), atol=0.2)
        True
    """
    if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[0] == 0:
        got = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be a tensor of shape (N >= 1, d), got {got}")
    if context is not None and (not isinstance(context, Tensor) or context.shape[0] != data.shape[0]):
        got = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
        raise ValueError(f"context must be a tensor with one row per data row ({data.shape[0]}), got {got}")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"expected steps >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}")
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = data.shape[0]

    def step(i: int) -> dict[str, float]:
        rows = torch.randperm(n, generator=generator)[:batch_size].to(data.device)
        optimizer.zero_grad(set_to_none=True)
        nll_batch = -log_prob(data[rows], None if context is None else context[rows]).mean()
        metrics = {"loss": nll_batch.item(), "nll": nll_batch.item()}
        loss = nll_batch
        if penalty is not None:
            extra = penalty()
            loss = loss + extra
            metrics.update(loss=loss.item(), penalty=extra.item())
        loss.backward()
        optimizer.step()
        return metrics

    return progress_loop(step, steps, desc=desc)


def nll(log_prob: LogProb, data: Tensor, context: Tensor | None = None, batch_size: int = 4096) -> float:
    """Mean negative log-likelihood of ``data`` (shape ``(N, d)``) under ``torch.no_grad()``,
    ``batch_size`` rows at a time.

    Example:
        >>> normal = lambda x, c: torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
        >>> round(nll(normal, torch.zeros(10, 2), batch_size=3), 4)  # log(2 pi)
        1.8379
    """
    if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[0] == 0:
        got = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be a tensor of shape (N >= 1, d), got {got}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = 0.0
    with torch.no_grad():
        for start in range(0, data.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            total -= log_prob(data[rows], None if context is None else context[rows]).double().sum().item()
    return total / data.shape[0]


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


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it over ``path``.

    A crash or a full disk mid-write leaves the previous file intact and no partial file
    behind: ``os.replace`` within one directory is atomic.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "state.pt"
        >>> save_atomic({"step": 3}, path)
        >>> torch.load(path)["step"], [p.name for p in path.parent.iterdir()]
        (3, ['state.pt'])
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class TrainingError(RuntimeError):
    """Training stopped: the ODE solver failed, or the loss was not finite.

    Attributes:
        step: The index of the step that failed.
        checkpoint_step: The step count of the checkpoint on disk (``None`` if none was written).
    """

    def __init__(self, message: str, step: int, checkpoint_step: int | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint_step = checkpoint_step


class _Objective(nn.Module):
    """The loss of one training step as a module, so that DistributedDataParallel wraps it
    whole.

    DDP averages the gradients in hooks that its ``forward`` arms for the next backward.
    With the whole loss inside one DDP ``forward`` a step is one forward and one backward,
    whatever the flow calls meanwhile (the field's ``forward``, ``divergence`` and ``jvp``,
    the adjoint solve's vector-Jacobian products), and the flow and its field stay as they
    are; DDP around the field alone would see only the calls that go through its ``forward``.
    """

    def __init__(self, flow: ContinuousFlow, objective: str, lambda_kinetic: float, lambda_jacobian: float) -> None:
        super().__init__()
        self.flow = flow
        self.objective = objective
        self.lambda_kinetic = lambda_kinetic
        self.lambda_jacobian = lambda_jacobian
        self.penalised = bool(lambda_kinetic or lambda_jacobian)
        if objective == "flow_matching":
            self.metric_names: tuple[str, ...] = ("loss",)
        else:
            self.metric_names = ("loss", "nll", "nfe") + (("kinetic", "jacobian") if self.penalised else ())

    def forward(self, x: Tensor, t: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The loss of the rows ``x`` (shape ``(n, d)``) and its metrics, a detached vector
        in the order of :attr:`metric_names`. Flow matching takes the rows' times ``t``,
        shape ``(n, 1)``, and base samples ``noise``, shape ``(n, d)``."""
        if self.objective == "flow_matching":
            from ..flow_matching import flow_matching_loss

            loss = flow_matching_loss(self.flow.vector_field, x, T=self.flow.T, t=t, noise=noise)
            return loss, loss.detach().reshape(1)
        z, ladj, stats = self.flow(x, return_stats=True)
        nll_batch = -(standard_normal_log_prob(z) + ladj).mean()
        loss, penalties = nll_batch, []
        if self.penalised:
            penalties = [stats.kinetic_energy.mean(), stats.jacobian_norm.mean()]
            loss = nll_batch + self.lambda_kinetic * penalties[0] + self.lambda_jacobian * penalties[1]
        nfe = nll_batch.new_tensor(float(stats.nfe))
        return loss, torch.stack([loss, nll_batch, nfe, *penalties]).detach()


class Trainer:
    """Resumable training of a :class:`~pyro_cnf.ContinuousFlow` density with a standard
    normal base, under one progress bar, with atomic checkpoints.

    Objectives:

    - ``"mle"``: the NLL of the batch by the flow's own solve, plus the RNODE penalty
      ``lambda_kinetic * kinetic + lambda_jacobian * jacobian`` (batch means) when either
      is non-zero (the flow must have ``regularize=True``).
    - ``"flow_matching"``: :func:`~pyro_cnf.flow_matching.flow_matching_loss` of the
      flow's vector field; no ODE solve while training.

    Resuming is exact: a checkpoint holds the flow, the optimiser, the step count, the torch
    random state (CPU, and the flow's CUDA device), the metrics so far and ``config``; the
    data come from ``batches(step)``, a function of the step alone (see :func:`step_seed`),
    so a run resumed from step ``k`` repeats the uninterrupted run from step ``k`` on.

    Failures: a :class:`~pyro_cnf.SolverError` stops training with :class:`TrainingError`,
    leaving the last checkpoint as it was, or with ``on_solver_error="skip"`` drops the
    batch and counts it in :attr:`skipped`. A NaN or infinite loss always stops with
    :class:`TrainingError` naming the step, without saving.

    Data parallel: built inside a process group of several ranks (``torchrun``, see
    :mod:`pyro_cnf.distributed`), the trainer wraps the step's loss in
    ``DistributedDataParallel``. ``batches(step)`` must give the same global batch on every
    rank (as a function of the step alone does); each rank trains on its slice (the batch
    size must be a multiple of the number of ranks), and flow matching draws its times and
    base samples for the global batch before slicing, so ``N`` ranks take the steps of one
    process exactly (fixed-grid solvers; adaptive ones within their tolerances, since the
    step sizes follow the errors of each slice). Hutchinson and RNODE probes are drawn per
    rank (:func:`~pyro_cnf.distributed.rank_random_stream`). The metrics are the means
    over ranks, a solver failure on any rank is a failure on all, held-out NLLs are
    computed over the ranks' slices of the data, only rank 0 saves and shows a progress
    bar, and checkpoints resume under any number of ranks.

    Arguments:
        flow: The density to train.
        batches: ``step -> data``, shape ``(B, d)``, moved to the flow's device and dtype;
            the global batch, of which each rank takes its slice.
        objective: One of :data:`OBJECTIVES`.
        lr, weight_decay: Adam's settings.
        lambda_kinetic, lambda_jacobian: RNODE weights (``"mle"`` only).
        checkpoint: The checkpoint file (its directory must exist); ``None`` for none.
        checkpoint_every: Save every this many steps, and at the end of :meth:`fit`.
        eval_data: Held-out data, shape ``(M, d)``, for the exact NLL every ``eval_every``
            steps (in the metrics as ``"eval_nll"``).
        eval_every: ``0`` for no periodic evaluation.
        eval_flow: The flow that evaluates (e.g. the same field under ``dopri5`` at tight
            tolerances, exact trace); default ``flow``.
        on_solver_error: ``"stop"`` or ``"skip"``.
        config: JSON-like settings stored in the checkpoint (e.g. to check a resume).
        desc: The progress bar's label.
        disable: Hide the bar (``None``: when not on a terminal).

    Attributes:
        step: Steps done (the index of the next one).
        history: The metrics of every step done, each with its ``"step"`` index.
        skipped: Batches dropped after a solver failure.

    Example:
        >>> from pyro_cnf import ODENet
        >>> flow = ContinuousFlow(ODENet(2, (8,)), method="rk4", steps=2)
        >>> def batches(step):  # the data of a step depend on the step alone
        ...     return torch.randn(32, 2, generator=torch.Generator().manual_seed(step_seed(0, step))) + 1.0
        >>> trainer = Trainer(flow, batches, lr=1e-2, disable=True)
        >>> history = trainer.fit(20)
        >>> trainer.step, history[-1]["loss"] < history[0]["loss"]
        (20, True)
    """

    def __init__(
        self,
        flow: ContinuousFlow,
        batches: Callable[[int], Tensor],
        *,
        objective: str = "mle",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lambda_kinetic: float = 0.0,
        lambda_jacobian: float = 0.0,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        eval_data: Tensor | None = None,
        eval_every: int = 0,
        eval_flow: ContinuousFlow | None = None,
        on_solver_error: str = "stop",
        config: Mapping[str, Any] | None = None,
        desc: str = "train",
        disable: bool | None = None,
    ) -> None:
        if not isinstance(flow, ContinuousFlow):
            raise TypeError(f"flow must be a ContinuousFlow, got {type(flow).__name__}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        if on_solver_error not in ("stop", "skip"):
            raise ValueError(f"on_solver_error must be 'stop' or 'skip', got {on_solver_error!r}")
        if lambda_kinetic < 0 or lambda_jacobian < 0:
            raise ValueError(
                f"the RNODE weights must be >= 0, got lambda_kinetic={lambda_kinetic}, "
                f"lambda_jacobian={lambda_jacobian}"
            )
        if (lambda_kinetic or lambda_jacobian) and (objective != "mle" or not flow.regularize):
            raise ValueError(
                "the RNODE penalty needs objective='mle' and a flow built with regularize=True, "
                f"got objective={objective!r}, regularize={flow.regularize}"
            )
        if checkpoint_every < 1 or eval_every < 0:
            raise ValueError(
                f"expected checkpoint_every >= 1 and eval_every >= 0, got {checkpoint_every}, {eval_every}"
            )
        if eval_every and eval_data is None:
            raise ValueError("eval_every > 0 needs eval_data")
        self.flow = flow
        self.batches = batches
        self.objective = objective
        self._loss = _Objective(flow, objective, lambda_kinetic, lambda_jacobian)
        # the module whose forward the step calls: the loss, or DDP around it
        self._step_loss: nn.Module = self._loss
        if distributed.is_distributed():
            device = self._like.device
            device_ids = [device] if device.type == "cuda" else None  # CPU modules take none
            self._step_loss = DistributedDataParallel(self._loss, device_ids=device_ids)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.checkpoint_every = checkpoint_every
        self.eval_data = eval_data
        self.eval_every = eval_every
        self.eval_flow = flow if eval_flow is None else eval_flow
        self.on_solver_error = on_solver_error
        self.config = dict(config or {})
        self.desc = desc
        self.disable = disable
        self.optimizer = torch.optim.Adam(flow.parameters(), lr=lr, weight_decay=weight_decay)
        self.step = 0
        self.skipped = 0
        self.history: list[dict[str, float]] = []
        self.saved_step: int | None = None

    @property
    def _like(self) -> Tensor:
        return next(self.flow.parameters())

    def fit(self, steps: int) -> list[dict[str, float]]:
        """Train from :attr:`step` up to ``steps`` steps in all; save at the end.

        Returns:
            The metrics of the steps run by this call.
        """
        if steps < self.step:
            raise ValueError(f"steps ({steps}) is below the steps already done ({self.step})")
        self.flow.train()
        disable = self.disable if distributed.is_main() else True
        done = progress_loop(self._train_step, steps, start=self.step, desc=self.desc, disable=disable)
        if self.checkpoint is not None and self.saved_step != self.step:
            self.save()
        return done

    def _train_step(self, i: int) -> dict[str, float]:
        batch = self.batches(i)
        if not isinstance(batch, Tensor) or batch.dim() != 2:
            got = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise ValueError(f"batches({i}) must return a tensor of shape (B, d), got {got}")
        inputs = [distributed.shard(v) for v in self._inputs(batch.to(self._like))]
        self.optimizer.zero_grad(set_to_none=True)
        failure = None
        try:
            with self._random_stream():
                loss, values = self._step_loss(*inputs)
        except SolverError as error:
            failure, values = error, self._like.new_zeros(len(self._loss.metric_names))
        # One collective a step: whether any rank's solve failed, so that all ranks skip
        # or stop together, and the sums of the metrics.
        reduced = distributed.all_reduce_sum(torch.cat([values.new_tensor([failure is not None]), values]))
        if reduced[0] > 0:
            metrics = self._solver_failed(i, failure)
        else:
            means = reduced[1:] / distributed.get_world_size()
            metrics = dict(zip(self._loss.metric_names, means.tolist()))
            if not math.isfinite(metrics["loss"]):
                raise TrainingError(
                    f"the loss is {metrics['loss']} at step {i}; stopped without saving" + self._checkpoint_note(),
                    i,
                    self.saved_step,
                )
            try:
                loss.backward()
            except SolverError as error:  # the adjoint's backward solve
                if distributed.get_world_size() > 1:  # the other ranks wait in DDP's all-reduce
                    raise TrainingError(
                        f"the adjoint ODE solve failed in backward at step {i} on this rank: {error}; the other "
                        "ranks stop at the collective timeout" + self._checkpoint_note(), i, self.saved_step
                    ) from error
                self.optimizer.zero_grad(set_to_none=True)
                metrics = self._solver_failed(i, error)
            else:
                self.optimizer.step()
        self.step = i + 1
        if self.eval_every and self.step % self.eval_every == 0:
            metrics["eval_nll"] = self.evaluate(self.eval_data)
        self.history.append({"step": float(i), **metrics})
        if self.checkpoint is not None and self.step % self.checkpoint_every == 0:
            self.save()
        return metrics

    def _solver_failed(self, i: int, failure: SolverError | None) -> dict[str, float]:
        """Stop (``on_solver_error="stop"``) or count a skipped step."""
        if self.on_solver_error == "stop":
            where = " on another rank" if failure is None else f": {failure}"
            raise TrainingError(
                f"the ODE solver failed at step {i}{where}" + self._checkpoint_note(), i, self.saved_step
            ) from failure
        self.skipped += 1
        return {"skipped": float(self.skipped)}

    def _checkpoint_note(self) -> str:
        if self.checkpoint is None:
            return ""
        if self.saved_step is None:
            return f"; no checkpoint was written to {self.checkpoint}"
        return f"; the checkpoint of step {self.saved_step} in {self.checkpoint} is kept"

    def _inputs(self, batch: Tensor) -> list[Tensor]:
        """The step's global inputs: the batch, and for flow matching the times and base
        samples of its rows, drawn for the whole batch from the stream all ranks share so
        that each rank's slice holds what one process draws for those rows."""
        if self.objective != "flow_matching":
            return [batch]
        n, d = batch.shape
        t = self.flow.T * torch.rand(n, 1, dtype=batch.dtype, device=batch.device)
        return [batch, t, torch.randn(n, d, dtype=batch.dtype, device=batch.device)]

    def _random_stream(self) -> contextlib.AbstractContextManager[None]:
        # the probes of a maximum-likelihood solve are drawn for this rank's rows alone
        if self.objective == "mle":
            return distributed.rank_random_stream(self._like.device)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _evaluating(self, flow: ContinuousFlow) -> Iterator[None]:
        modes = [(m, m.training) for m in (flow, self.flow)]
        flow.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.train(training)

    def evaluate(self, data: Tensor, flow: ContinuousFlow | None = None, batch_size: int = 4096) -> float:
        """The exact mean NLL of ``data`` (shape ``(M, d)``) under ``flow`` (default the
        trainer's ``eval_flow``) in eval mode, in batches; in a distributed run each rank
        solves its slice of the rows and the sums are reduced. Under
        ``on_solver_error="skip"`` a failed solve gives NaN and counts in :attr:`skipped`."""
        flow = self.eval_flow if flow is None else flow
        if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[0] == 0:
            got = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(f"data must be a tensor of shape (M >= 1, d), got {got}")
        rows = distributed.shard(data.to(self._like), even=False)
        failure, total = None, 0.0
        with self._evaluating(flow):
            try:
                if len(rows):
                    total = len(rows) * nll(lambda x, c: flow.log_prob(x), rows, batch_size=batch_size)
            except SolverError as error:
                failure = error
        failed, total = distributed.all_reduce_sum(
            torch.tensor([failure is not None, total], dtype=torch.float64, device=self._like.device)
        ).tolist()
        if failed:
            if self.on_solver_error == "stop":
                where = " on another rank" if failure is None else f": {failure}"
                raise TrainingError(
                    f"the ODE solver failed evaluating the NLL after step {self.step}{where}"
                    + self._checkpoint_note(),
                    self.step,
                    self.saved_step,
                ) from failure
            self.skipped += 1
            return math.nan
        return total / data.shape[0]

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (see the class docstring)."""
        rng = {"torch": torch.get_rng_state()}
        device = self._like.device
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return {
            "flow": self.flow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "history": self.history,
            "rng": rng,
            "config": self.config,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.flow.load_state_dict(state["flow"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.skipped = state["skipped"]
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self._like.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self._like.device)

    def save(self) -> None:
        """Write the checkpoint atomically (see :func:`save_atomic`). In a distributed run
        rank 0 writes it and every rank returns once it is on disk, or raises if it is not."""
        if self.checkpoint is None:
            raise ValueError("this Trainer has no checkpoint path")
        failure = None
        if distributed.is_main():
            try:
                save_atomic(self.state_dict(), self.checkpoint)
            except Exception as error:  # noqa: BLE001 - re-raised below, after telling the other ranks
                failure = error
        # the other ranks learn whether the write failed, instead of waiting for rank 0 forever
        failed = distributed.all_reduce_sum(self._like.new_tensor([failure is not None])).item()
        if failure is not None:
            raise failure
        if failed:
            raise OSError(f"rank 0 failed to write the checkpoint {self.checkpoint}")
        self.saved_step = self.step

    def resume(self) -> bool:
        """Load the checkpoint when the file exists; return whether it did."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        self.load_state_dict(torch.load(self.checkpoint, map_location=self._like.device, weights_only=True))
        self.saved_step = self.step
        return True
