"""Vector fields with known answers, shared by the tests."""

import torch
from torch import nn


class LinearField(nn.Module):
    """f(t, x) = A x: the flow map is expm(A t) and log|det| = t tr A."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.input_dim = A.shape[0]

    def forward(self, t, x):
        return x @ self.A.t()


class ClosedLinearField(LinearField):
    """The same field, opting into the divergence protocol."""

    def divergence(self, t, x):
        return self(t, x), torch.diagonal(self.A).sum().expand(x.shape[0])


class NoDivergence(nn.Module):
    """Hides a field's closed-form divergence, forcing the autograd trace."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field
        self.input_dim = field.input_dim
        self.context_dim = getattr(field, "context_dim", 0)

    def forward(self, t, x, *context):
        return self.field(t, x, *context)


def random_matrix(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64)


class QuadraticField(nn.Module):
    """f = w x^2 blows up in finite time 1 / (w x0): large inputs break the solver."""

    input_dim = 2

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.1))

    def forward(self, t, x):
        return self.w * x * x
