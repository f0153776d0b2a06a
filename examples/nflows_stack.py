"""A CNF layer inside an nflows ``Flow``, stacked with MAF layers and permutations.

Data: scikit-learn's load_digits, 1797 images of 8x8 pixels with integer values 0..16.
Preprocessing (the NLL accounts for it):

1. dequantise: ``u = (pixel + U(0, 1)) / 17`` in ``(0, 1)^64``, with fresh noise for every
   training batch and one fixed draw for the test split;
2. logit: ``s = logit(a + (1 - 2a) u)`` with ``a = 0.05``, so the flow sees unbounded values.

The flow models ``s``; the reported test NLL is of ``u`` in nats per image (the logit's
log-Jacobian added back), and in bits per pixel of the discrete images (an upper bound:
``(NLL_u + 64 ln 17) / (64 ln 2)``). Two flows train for the same number of steps: MAF
layers with reverse permutations, and the same stack with a ``pyro_cnf.CNFTransform`` in
front (at the data end).

    python examples/nflows_stack.py [--steps 400] [--out out/nflows_stack]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from nflows.distributions import StandardNormal  # noqa: E402
from nflows.flows import Flow  # noqa: E402
from nflows.transforms import CompositeTransform, MaskedAffineAutoregressiveTransform, ReversePermutation  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import pyro_cnf  # noqa: E402
from pyro_cnf.presets import PRESETS  # noqa: E402
from pyro_cnf.training import Trainer, nll  # noqa: E402

ALPHA = 0.05  # keeps the logit away from +-infinity at the pixel values 0 and 16
LEVELS = 17  # pixel values 0..16
DIM = 64


def tolerances(tol: float | None) -> dict:
    """``rtol = atol = tol`` for every solve, or nothing: the library's defaults."""
    return {} if tol is None else {"rtol": tol, "atol": tol}


def dequantise(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.rand(pixels.shape, generator=generator, dtype=pixels.dtype)
    return (pixels + noise) / LEVELS


def to_logit(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = logit(a + (1 - 2a) u)`` and ``log|det ds/du|``, shapes ``(N, 64)`` and ``(N,)``."""
    p = ALPHA + (1 - 2 * ALPHA) * u
    ladj = (math.log(1 - 2 * ALPHA) - p.log() - (-p).log1p()).sum(-1)
    return p.logit(), ladj


def from_logit(s: torch.Tensor) -> torch.Tensor:
    """Back to pixel values 0..16 (for pictures)."""
    u = (torch.sigmoid(s) - ALPHA) / (1 - 2 * ALPHA)
    return (u * LEVELS).clamp(0, LEVELS - 1)


def make_flow(layers: int, hidden: int, cnf_hidden: Sequence[int] | None, tol: float | None) -> Flow:
    """``layers`` x (MAF, reverse permutation), with a CNF in front when ``cnf_hidden`` is given.

    The MAF layers are built first, so that under the same seed both flows start from the
    same MAF weights (a new CNF is the identity map).
    """
    transforms = []
    for _ in range(layers):
        transforms += [MaskedAffineAutoregressiveTransform(DIM, hidden_features=hidden), ReversePermutation(DIM)]
    if cnf_hidden is not None:
        transforms.insert(0, pyro_cnf.CNFTransform(DIM, hidden_dims=cnf_hidden, **tolerances(tol)))
    return Flow(CompositeTransform(transforms), StandardNormal([DIM]))


class DequantisedDensity(torch.nn.Module):
    """``log p(u)`` of dequantised images: the flow's density of ``s`` times the logit's Jacobian."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        s, ladj = to_logit(u)
        return self.flow.log_prob(s) + ladj


def minibatches(pixels: torch.Tensor, batch_size: int, seed: int):
    """``step -> u``: ``batch_size`` images drawn without replacement, dequantised with fresh
    noise (a bound on the discrete likelihood, not a fit to one noise draw)."""
    rows, noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)

    def batch(step: int) -> torch.Tensor:
        return dequantise(pixels[torch.randperm(len(pixels), generator=rows)[:batch_size]], noise)

    return batch


def plot(images: dict[str, torch.Tensor], path: Path) -> None:
    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4.3))
    for ax, (title, batch) in zip(axes, images.items()):
        k = min(8, math.isqrt(len(batch)))  # k x k tiles
        tiles = torch.nn.functional.pad(batch[: k * k].reshape(-1, 8, 8), (0, 1, 0, 1))  # a blank line between
        grid = tiles.reshape(k, k, 9, 9).permute(0, 2, 1, 3).reshape(9 * k, 9 * k)
        ax.imshow(grid, cmap="gray_r", vmin=0, vmax=LEVELS - 1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="Adam steps, the same for both flows")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=PRESETS["density"].lr, help="Adam's rate (the density preset's)")
    parser.add_argument("--layers", type=int, default=4, help="MAF layers")
    parser.add_argument("--hidden", type=int, default=128, help="MAF hidden width")
    parser.add_argument("--cnf-hidden", type=int, nargs="+", default=list(PRESETS["density"].field["hidden_dims"]),
                        help="the CNF field's widths (default: the density preset's, %(default)s)")
    parser.add_argument("--tol", type=float, default=None,
                        help="solver rtol = atol of every solve, training included "
                        "(default: the library's, 1e-5, and 1e-3 for a training solve)")
    parser.add_argument("--max-images", type=int, default=None, help="use fewer images (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/nflows_stack"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    pixels = torch.as_tensor(load_digits().data[: args.max_images], dtype=torch.float32)
    train, test = train_test_split(pixels, test_size=0.2, random_state=args.seed)
    test_u = dequantise(test, torch.Generator().manual_seed(args.seed))

    metrics: dict = {"steps": args.steps, "n_train": len(train), "n_test": len(test)}
    samples = {"test images": test}
    for name, cnf_hidden in (("MAF", None), ("MAF+CNF", args.cnf_hidden)):
        torch.manual_seed(args.seed)
        flow = make_flow(args.layers, args.hidden, cnf_hidden, args.tol)
        model = DequantisedDensity(flow)
        start = time.perf_counter()  # the same minibatches and noise for both flows
        history = Trainer(model, minibatches(train, args.batch_size, args.seed), lr=args.lr, desc=name).fit(args.steps)
        seconds = time.perf_counter() - start
        flow.eval()
        test_nll = nll(model, test_u)
        metrics[name] = {
            "test_nll_nats": test_nll,
            "test_bits_per_pixel": (test_nll + DIM * math.log(LEVELS)) / (DIM * math.log(2)),
            "final_train_loss": history[-1]["loss"],
            "train_seconds": seconds,
            "parameters": sum(p.numel() for p in flow.parameters()),
        }
        with torch.no_grad():
            samples[f"{name} samples"] = from_logit(flow.sample(64))
        print(f"{name:>8}: test NLL {test_nll:.2f} nats/image, "
              f"{metrics[name]['test_bits_per_pixel']:.3f} bits/pixel ({seconds:.0f} s)")

    plot(samples, args.out / "samples.png")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
