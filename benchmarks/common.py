"""Shared pieces of the benchmarks: the common field, clocks, tables, data."""

from __future__ import annotations

import copy
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

import pyro_cnf
from pyro_cnf.presets import PRESETS


def cpu_time(fn: Callable[[], object]) -> tuple[float, object]:
    """Process CPU seconds of one call (robust to other processes sharing the cores)."""
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """CPU seconds of each case, ``repeats`` rounds of all cases in turn, so that slow
    drifts of the machine spread over every case alike."""
    if warmup:
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(cpu_time(fn)[0])
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def perturbed_field(d: int, seed: int = 0) -> pyro_cnf.ODENet:
    """The one field every W1/W3 implementation integrates: default init, then the time
    modulation and the output layer perturbed so that the flow is far from the identity
    and changes with time (4-7 dopri5 steps at 1e-5; |log det| of about 2, 11 and 56 nats at d = 2, 8, 64)."""
    g = torch.Generator().manual_seed(seed)
    # the field of every run since the first: softplus without gains, the "density_fixed_grid" preset's
    net = pyro_cnf.ODENet(d, **PRESETS["density_fixed_grid"].field, zero_init=False)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]) if p.dim() == 2 else p)
        net.time_gate.copy_(3 * torch.randn(net.time_gate.shape, generator=g))
        net.time_gate_bias.copy_(torch.randn(net.time_gate.shape, generator=g))
        net.time_shift.copy_(torch.randn(net.time_gate.shape, generator=g))
        last = net.linears[-1]
        last.weight.mul_(3.0)
        last.bias.copy_(0.3 * torch.randn(last.bias.shape, generator=g))
    net.requires_grad_(False)
    return net


class FieldOnly(nn.Module):
    """Hides a field's closed-form divergence, so that the flow falls back to VJPs."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.input_dim = getattr(field, "input_dim", None)
        self.context_dim = getattr(field, "context_dim", 0)

    def forward(self, t: Tensor, x: Tensor, *context: Tensor) -> Tensor:
        return self.field(t, x, *context)


class Counted(nn.Module):
    """``f(t, x)`` that counts its calls (NFE for peers that do not count)."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.input_dim = getattr(field, "input_dim", None)
        self.calls = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        return self.field(t, x)


def normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * z.pow(2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def reference_log_prob(field: nn.Module, x: Tensor, tol: float = 1e-10) -> Tensor:
    """float64 log p(x) at rtol = atol = ``tol`` with the closed-form trace (exact, no VJP)."""
    f64 = copy.deepcopy(field).double()
    flow = pyro_cnf.ContinuousFlow(f64, trace="exact", rtol=tol, atol=tol, options={"max_num_steps": 100_000})
    with torch.no_grad():
        z, ladj = flow(x.double())
    return normal_log_prob(z) + ladj


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats in 3 significant digits."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-2):
                return f"{v:.2e}"
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    import torchdiffeq
    import zuko

    return (
        f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, torchdiffeq "
        f"{getattr(torchdiffeq, '__version__', '?')}, zuko {zuko.__version__}, numpy {np.__version__}, "
        f"1 torch thread"
    )
