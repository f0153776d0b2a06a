"""The tuned configurations: every tuned number of the library, each with why, in one table.

A :class:`Preset` is one use of a continuous flow, tuned as a whole: the
:class:`~pyro_cnf.ODENet` field, the solver settings that differ from
:class:`~pyro_cnf.ode.Solver`'s defaults, and the optimiser and learning rates it was tuned
for. Every builder takes ``preset=`` (:class:`~pyro_cnf.CNF`,
:class:`~pyro_cnf.ConditionalCNF`, :class:`~pyro_cnf.CNFTransform`,
:func:`~pyro_cnf.default_flow`, the sbi builders, :class:`~pyro_cnf.training.Trainer` and
the demo), and a setting passed alongside replaces the preset's own: the preset is where a
call starts, never what it ends with.

Which preset each builder starts from:

=================================================  =====================  ========================================
builder                                            preset                 why
=================================================  =====================  ========================================
``CNFTransform``, ``default_flow``                 ``"density"``          nflows flows fit data by likelihood
``ConditionalCNF``, ``CNFTransform(context_dim)``  ``"conditional"``      a conditional density, fit by likelihood
``CNF``, ``cnf``                                   ``"guide"``            Pyro's autoguides and NeuTra fit by SVI
``build_cnf_estimator`` (sbi)                      ``"sbi"``              sbi's NPE loop, its Adam 5e-4
``flow_matching_estimator``                        ``"flow_matching"``    simulation-free training
``Trainer``                                        the model's flow's     its learning rate and schedule
the demo                                           ``"demo"``             2-D maximum likelihood on a 4-step grid
=================================================  =====================  ========================================

Learning rates and the gains. :class:`~pyro_cnf.ODENet`'s gains (``input_gain``,
``time_gain``, ``hidden_gain``) are fixed factors in front of its parameters. Adam's step
does not depend on a parameter's scale, so a parameter behind a gain ``c`` moves ``c`` times
faster in the field than its neighbours: the gains speed up the parts of the field that
learn slowly at the rates users bring (the first layer, with its fan-in of only ``d``, and
the time dependence). The same factors can make a field too fast at Adam 1e-2 (on a 2-D
checkerboard they then lose 0.2-0.3 nats). So each preset names the rates it was tuned at (:attr:`Preset.lr_range`); for Adam
at 3e-3 to 2e-2 use ``"density_high_lr"``, the field with the guides' milder gains.
:func:`for_lr` picks between the two. On a coarse fixed grid a field that learns fast learns
the grid's error as well: ``"density_fixed_grid"`` has no gains.

Example:
    >>> PRESETS["density"].lr
    0.001
    >>> for_lr("density", 1e-2).name
    'density_high_lr'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["PRESETS", "Preset", "for_lr", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """One tuned configuration.

    Attributes:
        name: Its key in :data:`PRESETS`.
        field: :class:`~pyro_cnf.ODENet` keywords (``hidden_dims`` included).
        flow: :class:`~pyro_cnf.ContinuousFlow` and solver keywords that differ from their
            defaults (empty: adaptive dopri5 at rtol = atol = 1e-5, 1e-3 in training).
        lr: The Adam learning rate it was tuned at.
        lr_range: The learning rates ``(low, high)`` at which it keeps its measured results.
        training: :class:`~pyro_cnf.training.Trainer` and objective settings of its recipe
            (``schedule``, ``batch_size``, flow matching's ``path``, ...).
        optimizer: The optimiser of its measurements.
        reason: Why these values, in one line.
    """

    name: str
    field: Mapping[str, Any]
    lr: float
    lr_range: tuple[float, float]
    reason: str
    flow: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    optimizer: str = "Adam"

    @property
    def schedule(self) -> str:
        """The learning-rate schedule of its recipe (``"constant"`` unless it names one)."""
        return self.training.get("schedule", "constant")

    def __post_init__(self) -> None:
        for name in ("field", "flow", "training"):  # read-only: a preset is shared by every builder
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))


_GAINS_OFF = {"input_gain": 1.0, "time_gain": 1.0, "hidden_gain": 1.0}
_DENSITY_FIELD = {"hidden_dims": (64, 64), "activation": "silu", "input_gain": 16.0, "time_gain": 10.0,
                  "hidden_gain": 4.0, "scale_rate": 4.0, "time_gate_scale": 0.1}
_GUIDE_FIELD = {"hidden_dims": (64, 64), "activation": "silu", "input_gain": 4.0, "time_gain": 1.0,
                "hidden_gain": 1.0, "scale_rate": 4.0, "time_gate_scale": 0.1}
_CONDITIONAL_FIELD = {**_DENSITY_FIELD, "activation": "tanh", "scale_rate": 0.0}
_FIXED_GRID_FIELD = {**_CONDITIONAL_FIELD, "activation": "softplus", **_GAINS_OFF}

#: Every tuned configuration, by name.
PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (
    Preset(
        "density", _DENSITY_FIELD, lr=1e-3, lr_range=(5e-4, 1e-3),
        reason="maximum likelihood at Adam 5e-4 to 1e-3 (nflows): the gains speed up the first layer and the "
               "time dependence, the scale rate gives coordinate-dependent scales, which win in 64-d at equal "
               "CPU time and cost little in 2-D (BENCHMARKS.md, 'Presets')",
    ),
    Preset(
        "density_high_lr", _GUIDE_FIELD, lr=1e-2, lr_range=(3e-3, 2e-2),
        reason="the density field for Adam 1e-2: time and hidden gains of 1 and a first layer 4x faster, "
               "as the guides (at 1e-2 the full gains lose on the 2-D toys; BENCHMARKS.md, 'Presets')",
    ),
    Preset(
        "conditional", _CONDITIONAL_FIELD, lr=1e-3, lr_range=(5e-4, 1e-3),
        reason="conditional densities p(x | c) by maximum likelihood: tanh with the gains and no scale rate, "
               "which costs 0.5-0.8 nats on a conditional posterior (BENCHMARKS.md, 'Presets')",
    ),
    Preset(
        "density_fixed_grid", _FIXED_GRID_FIELD, lr=1e-3, lr_range=(5e-4, 1e-2),
        reason="maximum likelihood on a coarse fixed grid (method='rk4', steps=4): a field with gains, or tanh, "
               "learns the grid's error too (a training loss far below the held-out NLL); softplus without gains "
               "does not (BENCHMARKS.md, 'Gains')",
    ),
    Preset(
        "guide", _GUIDE_FIELD,
        lr=5e-3, lr_range=(1e-3, 1e-2), optimizer="Adam or ClippedAdam (Pyro SVI)",
        reason="SVI guides: silu reaches heavy tails, the scale rate gives a funnel's coordinate-dependent "
               "scales, time and hidden gains of 1 suit SVI's noisy gradients at 1e-2 (BENCHMARKS.md, 'Scale rate')",
    ),
    Preset(
        "sbi", _CONDITIONAL_FIELD, lr=5e-4, lr_range=(5e-4, 1e-3),
        reason="sbi's NPE trains a conditional density by maximum likelihood at its Adam 5e-4: the conditional field",
    ),
    Preset(
        "flow_matching",
        {"hidden_dims": (64, 64, 64, 64), "activation": "silu", "time_gate_scale": 10.0, "scale_rate": 0.0,
         **_GAINS_OFF},
        lr=2e-2, lr_range=(1e-2, 2e-2),
        training={"schedule": "cosine", "batch_size": 512, "path": "cosine", "coupling": "independent"},
        reason="flow matching regresses the field on straight-line targets: a deeper, strongly time-dependent "
               "field at lr 2e-2 with cosine decay, without the gains (too fast at that rate; BENCHMARKS.md, "
               "'Flow matching')",
    ),
    Preset(
        "flow_matching_wide",
        {"hidden_dims": (256, 256), "activation": "silu", "time_gate_scale": 10.0, "scale_rate": 0.0, **_GAINS_OFF},
        lr=5e-3, lr_range=(5e-3, 1e-2),
        training={"schedule": "cosine", "batch_size": 512, "path": "cosine", "coupling": "independent"},
        reason="flow matching in 30-100 dimensions (64-d digits): two wide layers at lr 5e-3 beat four of 64 "
               "(BENCHMARKS.md, 'Flow matching')",
    ),
    Preset(
        "demo", _FIXED_GRID_FIELD,
        flow={"method": "rk4", "steps": 4}, lr=1e-2, lr_range=(3e-3, 2e-2),
        training={"steps": 4000, "batch_size": 256, "schedule": "constant"},
        reason="the demo's 2-D maximum likelihood on a 4-step rk4 grid at lr 1e-2: the fixed-grid field "
               "(BENCHMARKS.md, 'Gains')",
    ),
    Preset(
        "demo_flow_matching",
        {"hidden_dims": (64, 64), "activation": "tanh", "time_gate_scale": 10.0, "scale_rate": 0.0, **_GAINS_OFF},
        lr=1e-2, lr_range=(3e-3, 2e-2), training={"steps": 4000, "batch_size": 256, "schedule": "constant"},
        reason="the demo's flow matching at its lr 1e-2: tanh with steep initial time gates (flow matching needs a "
               "field that depends on t from the start), without the gains (a stiff field at that rate)",
    ),
)})


def get_preset(name: str | Preset, owner: str = "preset") -> Preset:
    """The preset ``name`` (a :class:`Preset` passes through); an unknown name raises
    ``ValueError`` naming ``owner`` and listing the presets.

    Example:
        >>> get_preset("guide").field["activation"]
        'silu'
    """
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(f"{owner}: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def for_lr(name: str, lr: float) -> Preset:
    """The preset for a use at Adam learning rate ``lr``: ``name`` itself, or its
    ``<name>_high_lr`` variant when ``lr`` is above ``name``'s range and one exists.

    Example:
        >>> for_lr("density", 1e-3).name, for_lr("guide", 1e-2).name
        ('density', 'guide')
    """
    preset = get_preset(name)
    faster = PRESETS.get(f"{preset.name}_high_lr")
    return faster if faster is not None and lr > preset.lr_range[1] else preset
