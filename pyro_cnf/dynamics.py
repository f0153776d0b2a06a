r"""The augmented right-hand side of a CNF solve: the field, its divergence and, for RNODE,
the integrands of the kinetic energy and the Jacobian norm, as one flat state.

The state of a solve is one tensor: ``x`` alone, shape ``(N, d)``, when no log-det is
wanted; else the flat ``[x.flatten(), logdet]``, shape ``(N d + N,)``, or
``[x.flatten(), logdet, kinetic, frobenius]``, ``(N d + 3 N,)``, with RNODE's integrals.
One tensor, not a tuple, so that no solver packs and unpacks it at every evaluation, and
flat, so that ``x`` is a contiguous view and packing the derivative is one contiguous copy.

:class:`Dynamics` is built once per solve, and everything that can be decided before the
solve is decided there: the estimator's method, its probes, the context argument. The
field's output is validated on the first evaluation only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .trace import exact_divergence, hutchinson_divergence

__all__ = ["Dynamics", "Counter", "ERROR_NORMS"]

#: Error norms of the flat state: ``"mixed"`` is torchdiffeq's norm of a tuple state (the
#: RMS of each component over the batch, then the maximum); ``"per_sample"`` takes the
#: worst sample's RMS, so that no sample's local error is averaged away by its batch-mates.
ERROR_NORMS = ("mixed", "per_sample")


class Counter:
    """Function evaluations of a flow's solves, shared by the forward solve and the
    adjoint's backward solve (a plain int, so a module holding it deep-copies and pickles)."""

    def __init__(self) -> None:
        self.nfe = 0


class Dynamics:
    """``dstate/dt`` of one solve.

    Arguments:
        field: The vector field module.
        context: Shape ``(N, c)``, or ``None``.
        mode: ``"none"`` (no log-det), ``"closed"`` (the field's ``divergence``),
            ``"exact"`` (batched VJPs) or ``"hutchinson"``.
        probe: The identity basis (exact) or the Hutchinson noise, fixed for the solve.
        reg_probe: The noise of RNODE's Jacobian penalty, or ``None`` for no RNODE integrals.
        shape: ``(N, d)`` of ``x``.
        counter: Counts the evaluations.
    """

    def __init__(
        self,
        field: nn.Module,
        context: Tensor | None,
        mode: str,
        probe: Tensor | None,
        reg_probe: Tensor | None,
        shape: tuple[int, int],
        counter: Counter,
    ) -> None:
        self.field = field
        self.shape = shape
        self.size = shape[0] * shape[1]
        self.args = () if context is None else (context,)
        self.mode = mode
        self.probe = probe
        self.reg_probe = reg_probe
        self.counter = counter
        self.extra = 0 if mode == "none" else 1 if reg_probe is None else 3
        self.t: Tensor | None = None  # the last time evaluated, for error messages
        regularize = reg_probe is not None
        if mode == "none":
            self._rhs, self._call, self._what = self._field_only, field, "forward"
        elif mode == "closed" and not regularize:
            self._rhs, self._call, self._what = self._closed, field.divergence, "divergence"
        elif mode == "closed" and hasattr(field, "divergence_jvp"):
            self._rhs, self._call, self._what = self._closed_regularized, field.divergence_jvp, "divergence_jvp"
        elif mode == "hutchinson" and hasattr(field, "jvp"):
            self._rhs, self._call, self._what = self._forward_mode, field.jvp, "jvp"
        else:
            call = field.divergence if mode == "closed" else field
            self._rhs, self._call, self._what = self._autograd, call, "divergence" if mode == "closed" else "forward"
        self._raw_call = self._call
        self._call = self._checked_call  # the first evaluation validates, then steps aside

    # -- the state ------------------------------------------------------------------------

    def initial_state(self, x: Tensor) -> Tensor:
        """The state at the start: ``x`` (shape ``(N, d)``), with zero integrals."""
        return torch.cat((x.reshape(-1), x.new_zeros(self.extra * self.shape[0]))) if self.extra else x

    def split(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, integrals)`` of a state: shapes ``(N, d)`` and ``(extra, N)``."""
        n, d = self.shape
        if not self.extra:
            return state, state.new_empty(0, n)
        return state[: self.size].view(n, d), state[self.size :].view(self.extra, n)

    def error_norm(self, kind: str) -> Callable[[Tensor], Tensor]:
        """The norm of a scaled local error of the state, one of :data:`ERROR_NORMS`."""
        n, nd = self.shape[0], self.size
        if kind == "mixed":
            def mixed(r: Tensor) -> Tensor:
                sq = r.reshape(-1).square()
                return torch.cat((sq[:nd].mean().reshape(1), sq[nd:].view(-1, n).mean(1))).max().sqrt()

            return mixed

        def per_sample(r: Tensor) -> Tensor:
            sq = r.reshape(-1).square()
            return torch.cat((sq[:nd].view(n, -1).mean(1), sq[nd:])).max().sqrt()

        return per_sample

    # -- evaluation -----------------------------------------------------------------------

    def __call__(self, t: Tensor, state: Tensor) -> Tensor:
        self.counter.nfe += 1
        self.t = t
        return self._rhs(t, state)

    def _checked_call(self, t: Tensor, x: Tensor, *args: Tensor):
        out = self._raw_call(t, x, *args)
        self._call = self._raw_call
        n, d = self.shape
        expected = {
            "forward": ((n, d),),
            "divergence": ((n, d), (n,)),
            "jvp": ((n, d), (n, d)),
            "divergence_jvp": ((n, d), (n,), (n, d)),
        }[self._what]
        what = "the vector field" if self._what == "forward" else f"the vector field's {self._what}()"
        items = (out,) if len(expected) == 1 else out
        if not isinstance(items, tuple) or len(items) != len(expected):
            got = type(out).__name__ + (f" of {len(out)}" if isinstance(out, tuple) else "")
            want = "a tensor" if len(expected) == 1 else f"a tuple of {len(expected)} tensors"
            raise TypeError(f"{what} returned {got}; expected {want}")
        for item, shape in zip(items, expected):
            if not isinstance(item, Tensor):
                raise TypeError(f"{what} returned {type(item).__name__}; expected a tensor of shape {shape}")
            if item.dtype != x.dtype:
                raise TypeError(f"{what} returned {item.dtype}; expected {x.dtype}, the dtype of x")
            if tuple(item.shape) != shape:
                meaning = "the shape of x" if shape == (n, d) else "one value per sample"
                raise ValueError(f"{what} returned shape {tuple(item.shape)}; expected {meaning}, {shape}")
        return out

    def _x(self, state: Tensor) -> Tensor:
        return state[: self.size].view(self.shape)

    @staticmethod
    def _pack(f: Tensor, *rates: Tensor) -> Tensor:
        return torch.cat((f.reshape(-1), *rates))

    def _field_only(self, t: Tensor, x: Tensor) -> Tensor:
        return self._call(t, x, *self.args)

    def _closed(self, t: Tensor, state: Tensor) -> Tensor:
        return self._pack(*self._call(t, self._x(state), *self.args))

    def _closed_regularized(self, t: Tensor, state: Tensor) -> Tensor:
        f, div, jv = self._call(t, self._x(state), self.reg_probe, *self.args)
        return self._pack(f, div, f.pow(2).sum(-1), jv.pow(2).sum(-1))

    def _forward_mode(self, t: Tensor, state: Tensor) -> Tensor:
        f, jv = self._call(t, self._x(state), self.probe, *self.args)
        div = (jv * self.probe).sum(-1)
        if self.reg_probe is None:
            return self._pack(f, div)
        return self._pack(f, div, f.pow(2).sum(-1), jv.pow(2).sum(-1))

    def _autograd(self, t: Tensor, state: Tensor) -> Tensor:
        x = self._x(state)
        create_graph = torch.is_grad_enabled()
        regularize = self.reg_probe is not None
        with torch.enable_grad():
            if not (create_graph and x.requires_grad):  # no history to keep: a fresh leaf
                x = x.detach().requires_grad_()
            out = self._call(t, x, *self.args)
            f, div = out if self.mode == "closed" else (out, None)
            vjp = None
            if self.mode == "exact":
                div = exact_divergence(f, x, self.probe, create_graph or regularize)
            elif self.mode == "hutchinson":
                div, vjp = hutchinson_divergence(f, x, self.probe, create_graph)
            if regularize and vjp is None:
                vjp = hutchinson_divergence(f, x, self.reg_probe, create_graph)[1]
        if not regularize:
            return self._pack(f, div)
        return self._pack(f, div, f.pow(2).sum(-1), vjp.pow(2).sum(-1))
