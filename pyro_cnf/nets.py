r"""Vector fields :math:`f(t, x[, c])` for continuous flows.

Any ``nn.Module`` with ``forward(t, x)`` (or ``forward(t, x, context)``) that returns a
tensor shaped like ``x`` can drive a :class:`~pyro_cnf.ContinuousFlow`. A field MAY also
implement the *divergence protocol*::

    def divergence(self, t, x, context=None) -> tuple[Tensor, Tensor]:
        # returns (f, div): the field, shape (N, d), and Tr(df/dx), shape (N,)

which the flow then uses for the exact trace instead of d vector-Jacobian products, and::

    def jvp(self, t, x, v, context=None) -> tuple[Tensor, Tensor]:
        # returns (f, (df/dx) v), both (N, d)

which the flow uses for Hutchinson's estimator and the Jacobian penalty instead of a VJP,
and ``divergence_jvp(t, x, v, context=None) -> (f, div, J v)``, both from one pass, which
the flow uses for the exact trace with RNODE's Jacobian penalty. :class:`ODENet`
implements all three in closed form. Finally ``trace_costs(grad) -> {"closed": c1,
"exact": c2, ...}``, the modelled cost of ``divergence`` and of ``d`` batched VJPs, lets the
flow run whichever exact trace is cheaper (:func:`pyro_cnf.trace.cheapest_exact`); without
it the flow trusts ``divergence`` to be the cheaper.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .presets import PRESETS

__all__ = ["ODENet", "ACTIVATIONS", "TRACE_COST_MODEL"]


def _softplus_grad(u: Tensor, h: Tensor) -> Tensor:
    return torch.sigmoid(u)


def _tanh_grad(u: Tensor, h: Tensor) -> Tensor:
    return 1 - h * h


def _elu_grad(u: Tensor, h: Tensor) -> Tensor:
    return torch.where(u > 0, torch.ones_like(h), h + 1)


def _silu_grad(u: Tensor, h: Tensor) -> Tensor:
    s = torch.sigmoid(u)
    return s + h * (1 - s)


def _sigmoid_grad(u: Tensor, h: Tensor) -> Tensor:
    return h * (1 - h)


#: Smooth activations with the derivative written as a function of the pre-activation
#: ``u`` and the activation ``h = s(u)`` (reusing ``h`` saves a transcendental call).
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    "softplus": (F.softplus, _softplus_grad),
    "tanh": (torch.tanh, _tanh_grad),
    "elu": (F.elu, _elu_grad),
    "silu": (F.silu, _silu_grad),
    "sigmoid": (torch.sigmoid, _sigmoid_grad),
}


#: The cost model behind :meth:`ODENet.trace_costs`. Each part of an evaluation costs
#: ``a * multiply_adds + b * elements`` per sample, in multiply-adds of a float32 GEMM;
#: ``(a, b)`` without and with the backward pass of training. Elements: the hidden units
#: (bias, activation) for the forward pass and for each VJP; the ``(N, d, h)`` tangents
#: written per hidden layer for ``tangents``; the ``(N, h_1, h)`` products for ``cyclic``,
#: whose GEMM runs slower per multiply-add (its depth is ``h^2``). Fitted on
#: ``benchmarks/trace_cost.py`` measurements (one MKL thread, batch 1000-2000, widths
#: 32-128, 3-5 hidden layers, d = 1-128; median error 6-20%), with which the choice it makes
#: is everywhere within 1.2x of the measured cheapest.
TRACE_COST_MODEL: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "forward": ((1.0, 135.0), (2.9, 350.0)),
    "tangents": ((1.0, 35.0), (3.7, 180.0)),
    "cyclic": ((1.65, 10.0), (7.9, 63.0)),
    "vjp": ((1.15, 80.0), (4.7, 380.0)),
}


@functools.lru_cache(maxsize=256)
def _trace_costs(
    d: int, context_dim: int, hidden: tuple[int, ...], grad: bool, scaled: bool = False
) -> tuple[tuple[str, float], ...]:
    """:meth:`ODENet.trace_costs` of an architecture (cached: the flow asks per solve and the
    net per evaluation)."""

    def cost(part: str, multiply_adds: int, elements: int) -> float:
        a, b = TRACE_COST_MODEL[part][grad]
        return a * multiply_adds + b * elements

    sizes = (d + context_dim, *hidden, 2 * d if scaled else d)
    forward_macs = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    forward = cost("forward", forward_macs, sum(hidden))
    one_pass = 1.1 * forward  # divergence's forward pass also computes the activation slopes
    costs = {"exact": forward + d * cost("vjp", forward_macs, sum(hidden))}  # one backward per direction
    products = [a * b for a, b in zip(hidden[:-1], hidden[1:])]  # the hidden-to-hidden GEMMs
    if len(hidden) >= 3:
        costs["tangents"] = one_pass + cost("tangents", d * sum(products), d * sum(hidden[1:-1]))
        h_1 = hidden[0]  # the cycle's (h_1, h) products through layers L .. 3, then one closing GEMM
        costs["cyclic"] = one_pass + cost("cyclic", h_1 * sum(products[1:]), h_1 * sum(hidden[2:]))
        costs["closed"] = min(costs["tangents"], costs["cyclic"])
    else:  # the closed forms of 0-2 hidden layers: at most one (N, h_1) x (h_1, h_2) product
        costs["closed"] = one_pass + cost("tangents", sum(products), 0)
    if scaled:  # the diagonal of the scale outputs' Jacobian, along the d basis directions
        costs["closed"] += cost("tangents", d * (sum(products) + hidden[-1]), d * sum(hidden)) if hidden else 0.0
    return tuple((k, v / forward) for k, v in costs.items())


def _fuse_first_two(w_in: Tensor, w2: Tensor) -> Tensor:
    """``K[j, i, k] = W_in[j, i] W_2[k, j]``, shape ``(h_1, d, h_2)``: with the first slopes
    ``s_1``, ``s_1 @ K`` is the tangent of the second layer's pre-activations along every
    basis direction ``e_i`` at once, one GEMM (the start of both forward-mode traces)."""
    return w_in.unsqueeze(-1) * w2.t().unsqueeze(1)


#: The settings a checkpoint written before they existed was made with.
_BEFORE_OPTIONS: dict[str, float] = {"input_gain": 1.0, "time_gain": 1.0, "hidden_gain": 1.0, "scale_rate": 0.0}
#: ODENet's defaults: the conditional preset's field, the gained tanh MLP without a scale rate.
_DEFAULT = PRESETS["conditional"].field


def check_widths(hidden_dims: Sequence[int], owner: str = "ODENet") -> tuple[int, ...]:
    """``hidden_dims`` as a tuple of positive ints, or a ``TypeError``/``ValueError`` that names
    ``owner``.

    Example:
        >>> check_widths([32, 32])
        (32, 32)
        >>> check_widths(32, "CNF")
        Traceback (most recent call last):
        ...
        TypeError: CNF: hidden_dims must be a sequence of layer widths such as (64, 64), got 32
    """
    if isinstance(hidden_dims, (str, bytes)) or not isinstance(hidden_dims, Sequence):
        raise TypeError(f"{owner}: hidden_dims must be a sequence of layer widths such as (64, 64), got {hidden_dims!r}")
    if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden_dims):
        raise ValueError(f"{owner}: hidden_dims must hold positive integers, got {tuple(hidden_dims)}")
    return tuple(hidden_dims)


class ODENet(nn.Module):
    r"""Time-conditioned MLP field with concat-squash layers (Grathwohl et al., 2019).

    Every layer computes :math:`u = c_l (W h + b) \odot \sigma(c_t (a t + g)) + c_t e t`:
    the time gate scales each unit and the time shift moves it; the gains :math:`c_l`
    (``input_gain`` on the first layer, ``hidden_gain`` on the others but the last, 1 there)
    and :math:`c_t` (``time_gain``) are fixed factors. With a ``scale_rate`` :math:`r > 0`
    the last layer has :math:`2d` outputs :math:`(a, s)` and the field is
    :math:`f = a + r \tanh(s / r) \odot x`. Context, when given, is concatenated to ``x``
    at the input. The gate is folded into the weights once per evaluation
    (:math:`W' = \mathrm{diag}(\sigma(a t + g)) W`), so the net costs one matmul per layer
    and its Jacobian (of :math:`a`, with a scale rate) is :math:`W'_{L+1} D_L W'_L \cdots
    D_1 W'_{1,x}` with :math:`D_l = \mathrm{diag}(s'(u_l))`.

    :meth:`divergence` gives the exact trace of that Jacobian in closed form by the cyclic
    property of the trace: with one hidden layer :math:`\mathrm{tr} J = D_1^\top
    \mathrm{diag}(W'_{1,x} W'_2)`, with two :math:`\mathrm{tr} J = D_2^\top M D_1` where
    :math:`M = W'_2 \odot (W'_{1,x} W'_3)^\top`; both cost :math:`O(h^2)` per sample,
    about one forward pass, independently of ``d``. Deeper nets use the cheaper, by
    :meth:`trace_costs`, of two exact contractions: forward mode along the ``d`` basis
    directions at once (:math:`O(d h^2)` per sample and layer, one GEMM per layer; about
    ``1 + d / 3`` forward passes at width 64), or, when ``d`` approaches ``h``, the cyclic
    product :math:`\mathrm{tr}(D_1 W'_{1,x} W'_{L+1} D_L W'_L \cdots D_2 W'_2)`
    (:math:`O(h^3)` per sample and layer, one layer fewer, independent of ``d``).

    The defaults are the ``"conditional"`` preset's field (:data:`pyro_cnf.presets.PRESETS`):
    the gained ``tanh`` MLP without a scale rate, a field for any use; the ``"density"`` preset
    adds ``activation="silu", scale_rate=4`` (build it with :func:`pyro_cnf.default_flow`).

    Arguments:
        input_dim: The dimension ``d`` of ``x``.
        hidden_dims: The widths of the hidden layers (``()`` gives a linear field).
        context_dim: The dimension of the context, 0 for none.
        activation: One of :data:`ACTIVATIONS`.
        zero_init: Zero the last layer so that a new flow is the identity map.
        time_gate_scale: Standard deviation of the initial time-gate slopes ``a`` (time
            enters each unit through :math:`\sigma(a t + g)`). The default 0.1 starts a
            nearly time-independent field; about ``10 / T`` makes a new field strongly
            time-dependent, which flow matching needs. An initialisation choice only: it
            is not part of the architecture checked when loading a ``state_dict``.
        input_gain: A fixed factor on the first layer's pre-activations, ``c (W h + b)``.
            Adam's steps do not depend on a parameter's scale, so the first layer starts
            ``c`` times sharper and learns ``c`` times faster than the rest: its fan-in is
            only ``d`` (plus the context), and at gain 1 it learns too slowly to find sharp
            features (a checkerboard's edges) or scales that depend on another coordinate
            (a funnel's).
        time_gain: A fixed factor on the time parameters ``a``, ``g`` and ``e``, which are
            stored divided by it: a new field is the same map at any time gain, but under
            Adam its dependence on ``t`` learns ``time_gain`` times faster.
        hidden_gain: The same for the weights and biases of the hidden-to-hidden layers
            (stored divided by it: the same new map, learning ``hidden_gain`` times
            faster). Gains are part of the architecture that ``load_state_dict`` checks;
            which gains suit which learning rate is said once, in :mod:`pyro_cnf.presets`.
        scale_rate: With :math:`r > 0`, a term :math:`r \tanh(s / r) \odot x` in the field:
            each coordinate grows or shrinks at a log-rate, at most :math:`r`, that the net
            computes from all coordinates, so an affine autoregressive map such as a
            funnel's, :math:`x_i = e^{z/2} \epsilon_i`, is a simple field (without it an
            MLP must build the product :math:`z x_i` from its units). The exact trace adds
            the diagonal of :math:`\partial s / \partial x`, forward mode along the ``d``
            basis directions, a cost that grows with ``d`` (still below ``d`` VJPs). 0
            leaves :math:`f = a`. Architecture.

    :meth:`jvp` gives :math:`J v` in forward mode (one extra matmul per layer), which makes
    Hutchinson's estimator and the RNODE Frobenius penalty free of autograd as well.

    Shapes: ``t`` is 0-d, ``x`` is ``(N, d)``, ``context`` is ``(N, context_dim)``;
    ``forward`` returns ``(N, d)`` and ``divergence`` returns ``((N, d), (N,))``.

    Example:
        >>> net = ODENet(3, (16, 16), zero_init=False)
        >>> f, div = net.divergence(torch.tensor(0.5), torch.randn(5, 3))
        >>> f.shape, div.shape
        (torch.Size([5, 3]), torch.Size([5]))
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = _DEFAULT["hidden_dims"],
        context_dim: int = 0,
        activation: str = _DEFAULT["activation"],
        zero_init: bool = True,
        time_gate_scale: float = _DEFAULT["time_gate_scale"],
        input_gain: float = _DEFAULT["input_gain"],
        time_gain: float = _DEFAULT["time_gain"],
        hidden_gain: float = _DEFAULT["hidden_gain"],
        scale_rate: float = _DEFAULT["scale_rate"],
    ) -> None:
        super().__init__()
        try:
            gate_scale = float(time_gate_scale)
        except (TypeError, ValueError):
            gate_scale = math.nan
        if not (gate_scale >= 0 and math.isfinite(gate_scale)):
            raise ValueError(f"time_gate_scale must be a finite number >= 0, got {time_gate_scale!r}")
        for name, gain in (("input_gain", input_gain), ("time_gain", time_gain), ("hidden_gain", hidden_gain)):
            if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not (math.isfinite(gain) and gain > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {gain!r}")
        if isinstance(scale_rate, bool) or not isinstance(scale_rate, (int, float)) or not (
            math.isfinite(scale_rate) and scale_rate >= 0
        ):
            raise ValueError(f"scale_rate must be a finite number >= 0, got {scale_rate!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        hidden_dims = check_widths(hidden_dims)
        for name, value in (("input_dim", input_dim), ("context_dim", context_dim)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"ODENet: {name} must be an int, got {value!r}")
        input_dim, context_dim = int(input_dim), int(context_dim)
        if input_dim < 1 or context_dim < 0:
            raise ValueError(f"expected input_dim >= 1 and context_dim >= 0, got input_dim={input_dim}, "
                             f"context_dim={context_dim}")
        self.input_dim = input_dim
        self.context_dim = context_dim
        self.hidden_dims = tuple(hidden_dims)
        self.activation = activation
        self.input_gain = float(input_gain)
        self.time_gain = float(time_gain)
        self.hidden_gain = float(hidden_gain)
        self.scale_rate = float(scale_rate)
        self._act, self._act_grad = ACTIVATIONS[activation]

        # with a scale rate the last layer gives the shift a and the log-rate s: 2d outputs
        sizes = (input_dim + context_dim, *self.hidden_dims, input_dim * (2 if self.scale_rate else 1))
        self.linears = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        # One gate/shift row per unit of every layer, evaluated together once per call.
        width = sum(sizes[1:])
        # stored divided by the time gain: the field starts the same at any gain
        self.time_gate = nn.Parameter(torch.randn(width) * (gate_scale / self.time_gain))
        self.time_gate_bias = nn.Parameter(torch.zeros(width))
        self.time_shift = nn.Parameter(torch.zeros(width))
        # The gains ride on the gates, W' = diag(c sigma(a t + g)) W: one multiply of a
        # (width,) vector per evaluation, none without a gain.
        gain = torch.ones(width)
        gain[: sizes[1]] = self.input_gain
        gain[sizes[1] : width - sizes[-1]] = self.hidden_gain
        gained = self.input_gain != 1 or self.hidden_gain != 1
        self.register_buffer("_gain", gain if gained else None, persistent=False)
        with torch.no_grad():  # stored divided by the hidden gain: the field starts the same
            for linear in self.linears[1:-1]:
                linear.weight.div_(self.hidden_gain)
                linear.bias.div_(self.hidden_gain)
        self._splits = sizes[1:]
        if zero_init:
            nn.init.zeros_(self.linears[-1].weight)
            nn.init.zeros_(self.linears[-1].bias)

    def extra_repr(self) -> str:
        options = {**self.get_extra_state()}
        if not options["context_dim"]:
            del options["context_dim"]
        return ", ".join(f"{k}={v!r}" for k, v in options.items())

    def get_extra_state(self) -> dict:
        return {
            "input_dim": self.input_dim,
            "context_dim": self.context_dim,
            "hidden_dims": self.hidden_dims,
            "activation": self.activation,
            "input_gain": self.input_gain,
            "time_gain": self.time_gain,
            "hidden_gain": self.hidden_gain,
            "scale_rate": self.scale_rate,
        }

    def set_extra_state(self, state: dict) -> None:
        """Refuse a checkpoint of another architecture with a message that names it."""
        mine = self.get_extra_state()
        state = {**_BEFORE_OPTIONS, **state}  # checkpoints from before these options lack them
        diff = [f"{k}: checkpoint {state.get(k)!r}, this net {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise ValueError(
                "ODENet state_dict of a different configuration: " + "; ".join(diff)
                + ". Build the ODENet with the checkpoint's settings (one written before the gains"
                " existed has input_gain=1.0, time_gain=1.0, hidden_gain=1.0)"
            )

    def _time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The gates, with the input gain, and the shifts of every unit at time ``t`` (0-d,
        or ``(N, 1)``): :math:`\\sigma(c_t (a t + g))` and :math:`c_t e t`."""
        bias = self.time_gate_bias
        if self.time_gain != 1:
            t, bias = t * self.time_gain, bias * self.time_gain
        gate = torch.sigmoid(torch.addcmul(bias, self.time_gate, t))
        return gate if self._gain is None else gate * self._gain, self.time_shift * t

    def _layers(self, t: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The time-folded ``(W', b')`` of every layer at time ``t``."""
        gate, shift = self._time(t)
        return [
            (lin.weight * g.unsqueeze(-1), torch.addcmul(s, lin.bias, g))
            for lin, g, s in zip(
                self.linears, gate.split(self._splits), shift.split(self._splits)
            )
        ]

    def _hidden(self, t: Tensor, x: Tensor, context: Tensor | None):
        layers = self._layers(t)
        h = x if context is None else torch.cat((x, context), dim=-1)
        pre = []
        for w, b in layers[:-1]:
            u = torch.addmm(b, h, w.t())
            h = self._act(u)
            pre.append((u, h))
        w, b = layers[-1]
        return torch.addmm(b, h, w.t()), layers, pre

    def _scaled(self, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        r"""The field from the last layer's outputs: ``out`` itself, or with a scale rate
        :math:`r`, :math:`a + r \tanh(s / r) \odot x` from ``out = (a, s)``; and
        :math:`\tanh(s / r)` (``None`` without a scale rate), which the trace and the JVP
        reuse."""
        if not self.scale_rate:
            return out, None
        a, s = out.split(self.input_dim, -1)
        rate = torch.tanh(s / self.scale_rate)
        return torch.addcmul(a, rate, x, value=self.scale_rate), rate

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``t`` is 0-d during a solve, or one time per row, shape ``(N,)`` or ``(N, 1)``,
        for simulation-free training (flow matching)."""
        if t.dim() == 0:
            return self._scaled(self._hidden(t, x, context)[0], x)[0]
        t = t.reshape(-1, 1)
        gates, shifts = (part.split(self._splits, -1) for part in self._time(t))
        h = x if context is None else torch.cat((x, context), dim=-1)
        for i, (lin, g, s) in enumerate(zip(self.linears, gates, shifts)):
            h = torch.addcmul(s, lin(h), g)
            if i < len(self.linears) - 1:
                h = self._act(h)
        return self._scaled(h, x)[0]

    def _pass(self, t: Tensor, x: Tensor, context: Tensor | None, what: str):
        """One forward pass: ``(f, time-folded layers, activation slopes s'(u_l), tanh(s / r))``
        (the last ``None`` without a scale rate)."""
        if t.dim() != 0:
            raise ValueError(f"{what} takes a 0-d time, got shape {tuple(t.shape)}")
        out, layers, pre = self._hidden(t, x, context)
        return (*self._scaled(out, x), layers, [self._act_grad(u, h) for u, h in pre])

    def trace_costs(self, grad: bool = False) -> dict[str, float]:
        """Modelled cost of one evaluation of ``(f, tr J)`` by each exact method, in forward
        passes of the field (forward and backward passes when ``grad``, i.e. when the trace
        is differentiated, as in training): ``"closed"`` is :meth:`divergence`, ``"exact"``
        is ``d`` VJPs in one batched autograd call (:func:`~pyro_cnf.trace.exact_divergence`)
        and, with 3+ hidden layers, ``"tangents"`` and ``"cyclic"`` are the two contractions
        :meth:`divergence` chooses between. See :data:`TRACE_COST_MODEL`.

        Example:
            >>> costs = ODENet(2, (64, 64, 64, 64)).trace_costs()
            >>> costs["closed"] < costs["exact"] < costs["cyclic"]
            True
        """
        return dict(_trace_costs(
            self.input_dim, self.context_dim, self.hidden_dims, bool(grad), bool(self.scale_rate)
        ))

    def _deep_method(self, grad: bool) -> str:
        """The cheaper contraction for 3+ hidden layers by :meth:`trace_costs`: ``"tangents"``
        or ``"cyclic"``."""
        costs = _trace_costs(self.input_dim, self.context_dim, self.hidden_dims, grad, bool(self.scale_rate))
        return min((c, k) for k, c in costs if k in ("tangents", "cyclic"))[1]

    def _trace(self, layers: list[tuple[Tensor, Tensor]], slopes: list[Tensor], n: int, grad: bool) -> Tensor:
        r"""Exact :math:`\mathrm{tr} J` per sample, shape ``(n,)``, from one forward pass.

        ``layers`` are the time-folded ``(W', b')``, ``slopes`` the ``(n, h_l)`` activation
        slopes; ``grad`` says whether the result will be differentiated, which changes which
        contraction is cheapest for three or more hidden layers (:meth:`trace_costs`).
        """
        d = self.input_dim
        w_in = layers[0][0][:, :d]  # only the x-columns of the first layer enter the Jacobian
        w_out = layers[-1][0][:d]  # the shift a's rows (all rows without a scale rate)
        if not slopes:
            return torch.diagonal(w_out[:, :d]).sum().expand(n)
        if len(slopes) == 1:
            return slopes[0] @ (w_in * w_out.t()).sum(-1)
        if len(slopes) == 2:
            m = layers[1][0] * (w_in @ w_out).t()
            return ((slopes[0] @ m.t()) * slopes[1]).sum(-1)
        if self._deep_method(grad) == "cyclic":
            return self._trace_cyclic(w_in @ w_out, layers, slopes, inplace=not grad)
        return self._trace_tangents(w_in, w_out, layers, slopes, inplace=not grad)

    @staticmethod
    def _trace_tangents(
        w_in: Tensor, w_out: Tensor, layers: list[tuple[Tensor, Tensor]], slopes: list[Tensor], inplace: bool
    ) -> Tensor:
        r"""Forward mode along the ``d`` basis directions at once, :math:`O(d h^2)` per sample
        and layer, as a few large matmuls.

        The tangents of sample ``n`` are kept as ``d`` consecutive rows of an ``(N d, h)``
        matrix, so each layer is ONE ``(N d, h) @ (h, h)`` GEMM, not ``N`` tiny products.
        The first two and the last two layers are fused into sample-independent matrices,
        which skips the elementwise passes over the ``(N, d, h)`` tangents at both ends:

        * in: the tangent of :math:`u_2` along :math:`e_m` is
          :math:`W_2 (s_1 \odot W_{\mathrm{in}} e_m)`, i.e. ``s_1 @ K`` with
          ``K[i, m h_2 + k] = W_in[i, m] W_2[k, i]``, shape ``(h_1, d h_2)``;
        * out: only the diagonal of :math:`W_{\mathrm{out}} D_L W_L T` is needed,
          :math:`\sum_k s_{L,k} \sum_{m,j} T_{mj} W_{\mathrm{out},mk} W_{L,kj}`, i.e.
          ``(T.view(N, d h) @ K) . s_L`` with ``K[m h + j, k] = W_out[m, k] W_L[k, j]``.

        ``inplace`` scales the tangents in place (no autograd graph to keep): fewer large
        allocations, which cost page faults at large ``d``.
        """
        scale = torch.Tensor.mul_ if inplace else torch.mul
        n, d = slopes[0].shape[0], w_in.shape[1]
        w2 = layers[1][0]
        k_in = _fuse_first_two(w_in, w2).reshape(w_in.shape[0], -1)
        tangent = slopes[0] @ k_in  # (N, d h_2): pre-activation tangents of layer 2
        for (w, _), s in zip(layers[2:-2], slopes[1:-2]):  # layers 3 .. L-1
            tangent = scale(tangent.view(n, d, -1), s.unsqueeze(1)).view(n * d, -1) @ w.t()
        w_last = layers[-2][0]  # (h_L, h_{L-1})
        k_out = (w_out.unsqueeze(-1) * w_last.unsqueeze(0)).transpose(1, 2).reshape(-1, w_last.shape[0])
        tangent = scale(tangent.view(n, d, -1), slopes[-2].unsqueeze(1)).view(n, -1)
        return ((tangent @ k_out) * slopes[-1]).sum(-1)

    @staticmethod
    def _trace_cyclic(
        a: Tensor, layers: list[tuple[Tensor, Tensor]], slopes: list[Tensor], inplace: bool
    ) -> Tensor:
        r"""The trace as a cycle through the hidden layers: :math:`O(h^3)` per sample and
        layer, but one layer fewer than :meth:`_trace_tangents`, and independent of ``d``;
        cheaper when ``d`` is close to ``h``.

        By the cyclic property, :math:`\mathrm{tr} J = \mathrm{tr}(D_1 A D_L W_L D_{L-1}
        \cdots W_3 D_2 W_2)` with the sample-independent :math:`A = W_{\mathrm{in}}
        W_{\mathrm{out}}`, shape ``(h_1, h_L)``. The per-sample ``(h_1, h)`` product starts
        as :math:`D_1 A D_L` (an outer product of the slopes times ``A``) and is carried
        through :math:`W_L, \ldots, W_4` as one ``(N h_1, h) @ (h, h)`` GEMM per layer; the
        last two factors close it in one more GEMM, :math:`\sum_k s_{2,k} \sum_{ij} R_{ij}
        G_{ij,k}` with ``G[i h_3 + j, k] = W_3[j, k] W_2[k, i]``. With three hidden layers
        ``A`` is folded into ``G`` as well, which leaves one elementwise pass over the
        ``(N, h_1, h_3)`` outer product. ``inplace`` as in :meth:`_trace_tangents`.
        """
        scale = torch.Tensor.mul_ if inplace else torch.mul
        n = slopes[0].shape[0]
        w3, w2 = layers[2][0], layers[1][0]
        close = w3.unsqueeze(0) * w2.t().unsqueeze(1)  # (h_1, h_3, h_2): [i, j, k] = W_3[j, k] W_2[k, i]
        chain = slopes[0].unsqueeze(-1) * slopes[-1].unsqueeze(1)  # (N, h_1, h_L)
        if len(slopes) == 3:
            close = close * a.unsqueeze(-1)
        else:
            chain = scale(chain, a)
            for (w, _), s in zip(reversed(layers[3:-1]), reversed(slopes[2:-1])):  # W_L .. W_4
                chain = scale((chain.view(-1, w.shape[0]) @ w).view(n, a.shape[0], -1), s.unsqueeze(1))
        return ((chain.view(n, -1) @ close.reshape(-1, w2.shape[0])) * slopes[1]).sum(-1)

    def _scale_trace(self, layers: list[tuple[Tensor, Tensor]], slopes: list[Tensor], weight: Tensor) -> Tensor:
        r""":math:`\sum_i w_i \, \partial s_i / \partial x_i` per sample, shape ``(N,)``, for
        weights ``w``, ``(N, d)``: forward mode along the ``d`` basis directions at once,
        :math:`O(d h^2)` per sample and layer. As in :meth:`_trace_tangents`, the first two
        layers are fused into one sample-independent ``(h_1, d h_2)`` matrix, so the tangents
        start with one GEMM; tangent ``i`` only meets row ``i`` of the last layer's ``s``
        part, which with two hidden layers is folded into that matrix too."""
        d = self.input_dim
        w_in, w_s = layers[0][0][:, :d], layers[-1][0][d:]
        if not slopes:
            return weight @ torch.diagonal(w_s[:, :d])
        if len(slopes) == 1:
            return ((weight @ (w_s * w_in.t())) * slopes[0]).sum(-1)
        fused = _fuse_first_two(w_in, layers[1][0])
        if len(slopes) == 2:
            fused = fused * w_s
        tangent = (slopes[0] @ fused.reshape(w_in.shape[0], -1)).view(weight.shape[0], d, -1)
        for (w, _), s in zip(layers[2:-1], slopes[1:-1]):  # layers 3 .. L
            tangent = (tangent * s.unsqueeze(1)) @ w.t()
        if len(slopes) > 2:
            tangent = tangent * w_s
        return ((weight.unsqueeze(1) @ tangent).squeeze(1) * slopes[-1]).sum(-1)

    def _divergence(
        self, x: Tensor, f: Tensor, rate: Tensor | None, layers: list[tuple[Tensor, Tensor]], slopes: list[Tensor]
    ) -> Tensor:
        r"""The exact trace of the field's Jacobian: :meth:`_trace` of :math:`\partial a /
        \partial x`, plus, with a scale rate :math:`r` and :math:`\rho = \tanh(s / r)`, the
        trace of :math:`\partial (r \rho \odot x) / \partial x`,
        :math:`\sum_i r \rho_i + x_i (1 - \rho_i^2) \, \partial s_i / \partial x_i`."""
        div = self._trace(layers, slopes, x.shape[0], f.requires_grad)
        if rate is None:
            return div
        return div + self.scale_rate * rate.sum(-1) + self._scale_trace(layers, slopes, x * (1 - rate * rate))

    def _tangent(
        self, x: Tensor, rate: Tensor | None, layers: list[tuple[Tensor, Tensor]], slopes: list[Tensor], v: Tensor
    ) -> Tensor:
        tangent = v @ layers[0][0][:, : self.input_dim].t()
        for s, (w, _) in zip(slopes, layers[1:]):
            tangent = (s * tangent) @ w.t()
        if rate is None:
            return tangent
        da, ds = tangent.split(self.input_dim, -1)  # (J_a v, J_s v)
        return da + self.scale_rate * rate * v + x * (1 - rate * rate) * ds

    def divergence(
        self, t: Tensor, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""The field and its exact divergence :math:`\mathrm{tr}(\partial f / \partial x)`."""
        f, rate, layers, slopes = self._pass(t, x, context, "divergence")
        return f, self._divergence(x, f, rate, layers, slopes)

    def jvp(
        self, t: Tensor, x: Tensor, v: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""The field and the Jacobian-vector product :math:`(\partial f/\partial x) v`.

        Forward mode, about one extra matmul per layer and no autograd graph: Hutchinson's
        :math:`v^\top J v` and RNODE's :math:`\|J v\|^2` come from it cheaply.
        Shapes: ``v`` like ``x``, ``(N, d)``; returns ``((N, d), (N, d))``.
        """
        f, rate, layers, slopes = self._pass(t, x, context, "jvp")
        return f, self._tangent(x, rate, layers, slopes, v)

    def divergence_jvp(
        self, t: Tensor, x: Tensor, v: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(f, div, J v)`` from ONE forward pass: the exact trace with RNODE's Jacobian
        penalty probe costs a third less than :meth:`divergence` and :meth:`jvp` apart."""
        f, rate, layers, slopes = self._pass(t, x, context, "divergence_jvp")
        return f, self._divergence(x, f, rate, layers, slopes), self._tangent(x, rate, layers, slopes, v)
