"""Property-based bad input: every case returns finite results of the right shape and dtype,
or raises ValueError/TypeError naming the argument; no input tensor is ever modified."""

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_cnf import CNF, CNFTransform, ConditionalCNF, ContinuousFlow, ODENet

D, C = 2, 3
FAST = dict(method="rk4", steps=2)
DTYPES = [torch.float16, torch.float32, torch.float64, torch.int64, torch.bool]


def make(kind: str):
    torch.manual_seed(0)
    conditional = kind in ("conditional_flow", "conditional_cnf", "conditional_nflows")
    flow = ContinuousFlow(ODENet(D, (8,), context_dim=C if conditional else 0, zero_init=False), **FAST)
    if kind in ("flow", "conditional_flow"):
        return lambda x, c, reverse: flow(x, c, reverse=reverse)
    if kind == "cnf":
        t = CNF(D, flow=flow)
        return lambda x, c, reverse: (t(x), t.log_abs_det_jacobian(x, t(x))) if reverse else (t.inv(x), None)
    if kind == "conditional_cnf":
        t = ConditionalCNF(D, C, flow=flow)
        return lambda x, c, reverse: (t.condition(c)(x), None) if reverse else (t.condition(c).inv(x), None)
    t = CNFTransform(D, context_dim=C if conditional else None, flow=flow)
    return lambda x, c, reverse: t.inverse(x, c) if reverse else t(x, c)


KINDS = ["flow", "conditional_flow", "cnf", "conditional_cnf", "nflows", "conditional_nflows"]
CALLS = {kind: make(kind) for kind in KINDS}


@st.composite
def tensors(draw, last):
    batch = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    size = draw(st.sampled_from([last, last, last, last + 1, 1]))
    dtype = draw(st.sampled_from(DTYPES))
    x = torch.randn(*batch, size, dtype=torch.float64)
    if x.numel() and draw(st.booleans()):
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
    x = x.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "expanded"]))
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "expanded" and x.dim() >= 1:
        x = x[..., :1, :].expand_as(x) if x.dim() >= 2 and x.shape[-2] > 0 else x
    return x


def problems(kind: str, x: torch.Tensor, context) -> list[str]:
    """Patterns of the messages that would be right for this input: one per real problem."""
    floats = (torch.float32, torch.float64)
    found = []
    conditional = kind.startswith("conditional")
    if x.dtype not in floats:
        found.append(r"x must be float32 or float64|inputs must")
    elif x.dtype != torch.float32:  # the flows are float32
        found.append(r"x is torch.float64 on cpu but the field's parameters are torch.float32")
    if x.dim() == 0 or x.shape[-1] != D or (kind.endswith("nflows") and x.dim() != 2):
        found.append(r"(x|inputs) must have shape")
    if x.dtype in floats and not torch.isfinite(x).all():
        found.append(r"x contains NaN or inf")
    if context is None and conditional:
        found.append(r"the field is conditional: pass context")
    if context is not None and not conditional:
        found.append(r"not conditional")
    if context is not None and conditional:
        if context.dtype != x.dtype:
            found.append(r"context is torch\.\w+ on cpu; expected")
        if context.dim() == 0 or context.shape[-1] != C:
            found.append(r"context must have shape")
        if context.dim() and x.dim() and context.shape[:-1] != x.shape[:-1]:
            found.append(r"context (batch shape .* does not broadcast|must have shape \[batch, context_dim\])")
        if context.dtype in floats and not torch.isfinite(context).all():
            found.append(r"context contains NaN or inf")
    return found


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), x=tensors(D), c=tensors(C), reverse=st.booleans(), with_context=st.booleans())
def test_bad_input_is_refused_or_handled(kind, x, c, reverse, with_context):
    context = c if with_context else None
    before = [x.clone()] + ([context.clone()] if context is not None else [])
    try:
        y, ladj = CALLS[kind](x, context, reverse)
    except (ValueError, TypeError) as error:
        # the message must name a problem this input really has
        assert any(re.search(pattern, str(error)) for pattern in problems(kind, x, context)), str(error)
    else:
        # accepted: the input was valid and the output is finite, with the right shape and dtype
        assert x.dtype in (torch.float32, torch.float64) and x.shape[-1] == D
        assert torch.isfinite(x).all()
        assert y.dtype == x.dtype and y.shape[-1] == D and torch.isfinite(y).all()
        if ladj is not None:
            assert ladj.shape == y.shape[:-1] and torch.isfinite(ladj).all()
    after = [x] + ([context] if context is not None else [])
    for a, b in zip(before, after):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), "an input was modified"


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch_returns_empty(kind):
    ctx = torch.zeros(0, C) if kind.startswith("conditional") else None
    y, ladj = CALLS[kind](torch.zeros(0, D), ctx, False)
    assert y.shape == (0, D)
    assert ladj is None or ladj.shape == (0,)


@pytest.mark.parametrize("value", [2.5, "2", None, True])
def test_odenet_dimensions_must_be_ints(value):
    with pytest.raises(TypeError, match=r"ODENet: input_dim must be an int, got"):
        ODENet(value)
    with pytest.raises(TypeError, match=r"ODENet: context_dim must be an int, got"):
        ODENet(2, context_dim=value)


@pytest.mark.parametrize("options, match", [
    ({"dfactor": 1.0}, r"options\['dfactor'\] must be a number in \(0, 1\)"),
    ({"ifactor": 0.5}, r"options\['ifactor'\] must be a finite number > 1"),
    ({"safety": float("nan")}, r"options\['safety'\] must be a finite number > 0"),
    ({"safety": 0}, r"options\['safety'\] must be a finite number > 0"),
    ({"first_step": 0.0}, r"options\['first_step'\] must be a finite number > 0"),
    ({"first_step": float("nan")}, r"options\['first_step'\] must be a finite number > 0"),
])
def test_step_controls_that_cannot_work_are_refused_when_given(options, match):
    # Regression: they were accepted and failed mid-solve ("underflow in dt", "max_num_steps exceeded")
    with pytest.raises(ValueError, match=match):
        ContinuousFlow(ODENet(2), options=options)
