"""Training above the core: objectives, the one :class:`Trainer`, checkpoints, data parallelism.

Not imported by ``import pyro_cnf``; import it as ``pyro_cnf.training``.

- :mod:`~pyro_cnf.training.objectives`: :class:`MaximumLikelihood`, :class:`FlowMatching`.
- :mod:`~pyro_cnf.training.trainer`: :class:`Trainer` with :class:`Checkpointing` and
  :class:`Evaluation` settings, :func:`nll`, :func:`progress_loop`, :func:`step_seed`.
- :mod:`~pyro_cnf.training.checkpoint`: atomic writes, verified checkpoints, the run lock.
- :mod:`~pyro_cnf.training.distributed`: ``torchrun`` set-up and collectives.

Example:
    >>> from pyro_cnf import default_flow
    >>> from pyro_cnf.training import FlowMatching, Trainer
    >>> flow = default_flow(2, (8,), preset="flow_matching")  # the Trainer takes its lr and schedule
    >>> trainer = Trainer(flow, lambda step: torch.randn(64, 2), FlowMatching(path="cosine"), ema=0.9, disable=True)
    >>> len(trainer.fit(5)), trainer.eval_model is trainer.averaged
    (5, True)
"""

from . import distributed
from .checkpoint import (
    CheckpointError,
    RunLock,
    RunLockedError,
    load_checkpoint,
    save_atomic,
    save_checkpoint,
    write_atomic,
)
from .objectives import FlowMatching, MaximumLikelihood, Objective
from .trainer import (
    SCHEDULES,
    Checkpointing,
    Evaluation,
    Trainer,
    TrainingError,
    cosine_decay,
    nll,
    progress_loop,
    step_seed,
)

__all__ = [
    "SCHEDULES",
    "CheckpointError",
    "Checkpointing",
    "Evaluation",
    "FlowMatching",
    "MaximumLikelihood",
    "Objective",
    "RunLock",
    "RunLockedError",
    "Trainer",
    "TrainingError",
    "cosine_decay",
    "distributed",
    "load_checkpoint",
    "nll",
    "progress_loop",
    "save_atomic",
    "save_checkpoint",
    "step_seed",
    "write_atomic",
]
