"""Peak memory of one log_prob + backward, adjoint vs direct backpropagation.

Each configuration runs in a fresh Python process, and its peak is the growth of the
process's peak resident set size over one training step, measured after a small warm-up
step has loaded every library and kernel. On Linux the peak is reset first (``5`` to
``/proc/self/clear_refs``) and read from ``VmHWM``, so that the imports' own transient
peak cannot hide the step's; elsewhere ``resource.getrusage`` is the fallback.
(tracemalloc does not see torch's allocations; torch has no public CPU peak counter.)

    python benchmarks/memory.py            # the default configurations, as a table
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def child(config: dict) -> dict:
    import torch

    import pyro_cnf
    from common import normal_log_prob

    torch.set_num_threads(1)
    torch.manual_seed(0)
    d, batch = config["d"], config["batch"]
    net = pyro_cnf.ODENet(d, zero_init=False)  # the default field (the "density" preset's)
    # The adjoint solve gets the forward's grid explicitly: without it torchdiffeq integrates
    # the adjoint of a fixed-grid method in one step (see BENCHMARKS.md).
    flow = pyro_cnf.ContinuousFlow(net, method="rk4", steps=config["steps"], adjoint=config["adjoint"],
                                   trace=config["trace"],
                                   adjoint_options={"norm": "seminorm", "step_size": 1.0 / config["steps"]})

    def step(n: int) -> None:
        net.zero_grad()
        z, ladj = flow(torch.randn(n, d))
        (-(normal_log_prob(z) + ladj).mean()).backward()

    step(16)  # load everything at a negligible size
    reset = _reset_peak()
    before = _status_kib("VmRSS") if reset else _maxrss_kib()
    step(batch)
    after = _status_kib("VmHWM") if reset else _maxrss_kib()
    return dict(config, peak_mb=(after - before) / 1024, nfe=flow.nfe, nfe_backward=flow.nfe_backward)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _maxrss_kib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


def measure(config: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_memory(d: int = 16, batch: int = 4096, steps: int = 8, trace: str = "exact", log=print) -> list[dict]:
    rows = []
    for adjoint in (False, True):
        for n in (steps, 4 * steps):
            r = measure(dict(d=d, batch=batch, steps=n, adjoint=adjoint, trace=trace))
            log(f"  adjoint={adjoint!s:5} rk4 steps={n:3d}: peak +{r['peak_mb']:.0f} MB  NFE {r['nfe']} + {r['nfe_backward']}")
            rows.append(r)
    return rows


def memory_verdict(rows: list[dict]) -> list[str]:
    lines = []
    for adjoint in (False, True):
        pair = sorted((r for r in rows if r["adjoint"] == adjoint), key=lambda r: r["steps"])
        if len(pair) == 2:
            growth = pair[1]["peak_mb"] / max(pair[0]["peak_mb"], 1e-9)
            label = "adjoint" if adjoint else "direct"
            target = f" (target <= 1.2x: {'MET' if growth <= 1.2 else 'NOT MET'})" if adjoint else ""
            lines.append(f"{label}: peak grows {growth:.2f}x when the steps grow 4x{target}")
    return lines


def memory_table(rows: list[dict]) -> str:
    from common import table

    r0 = rows[0]
    return (f"One log_prob + backward, rk4, d={r0['d']}, batch {r0['batch']}, the default ODENet, trace {r0['trace']} "
            "(closed form); peak = growth of max RSS in a fresh process.\n\n"
            + table(["adjoint", "rk4 steps", "peak MB", "NFE forward", "NFE backward"],
                    [[r["adjoint"], r["steps"], r["peak_mb"], r["nfe"], r["nfe_backward"]] for r in rows])
            + "\n\n" + "\n".join(f"- {line}" for line in memory_verdict(rows)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        print(memory_table(run_memory()))
