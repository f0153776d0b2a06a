"""Data-parallel training on torch.distributed: two gloo ranks on the loopback address take
the steps of one process on the concatenated batches, only rank 0 writes, a checkpoint
resumes under another number of ranks, and the demo runs under torchrun."""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_cnf import ContinuousFlow, default_flow
from pyro_cnf.training import distributed
from pyro_cnf.demo import main
from pyro_cnf.training import Checkpointing, FlowMatching, MaximumLikelihood, Trainer, load_checkpoint, step_seed

from .test_demo import FAST
from tests.fields import QuadraticField

WORLD = 2
STEPS = 5
BATCH = 16  # the global batch: 8 rows a rank
#: Trainer set-ups compared between two ranks and one process.
CONFIGS = ("mle", "mle_adjoint", "flow_matching", "fm_recipe", "rnode", "skip")
#: A hang in a collective must fail the test, not stall the suite.
TIMEOUT = 240


def batches(step):
    """A step's global batch, the same on every rank: a function of the step alone."""
    g = torch.Generator().manual_seed(step_seed(0, step))
    return torch.randn(BATCH, 2, generator=g) * 0.5 + 1.0


EVAL = batches(-1)[:11]  # 11 rows: 6 on rank 0, 5 on rank 1


def blowing_up_on_rank_1(step):
    x = 0.1 * batches(step)
    if step == 2:
        x[BATCH // 2 :] += 100.0  # the rows of rank 1
    return x


def make_trainer(name, checkpoint=None):
    torch.manual_seed(0)
    if name == "skip":
        flow = ContinuousFlow(QuadraticField(), method="rk4", steps=4)
        return Trainer(flow, blowing_up_on_rank_1, lr=1e-2, on_solver_error="skip", disable=True)
    kw = {"mle_adjoint": {"adjoint": True}, "rnode": {"regularize": True, "trace": "hutchinson"}}.get(name, {})
    flow = default_flow(2, (8, 8), preset="density_fixed_grid", zero_init=False, method="rk4", steps=2, **kw)
    options = {
        "rnode": {"objective": MaximumLikelihood(lambda_kinetic=0.1, lambda_jacobian=0.1)},
        "flow_matching": {"objective": FlowMatching()},
        # minibatch OT pairs the global batch before it is sliced over the ranks
        "fm_recipe": {"objective": FlowMatching(path="cosine", coupling="minibatch_ot"), "schedule": "cosine",
                      "ema": 0.5},
    }.get(name, {})
    checkpoint = None if checkpoint is None else Checkpointing(checkpoint, every=2)
    return Trainer(flow, batches, lr=1e-2, checkpoint=checkpoint, disable=True, **options)


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def run(trainer, steps=STEPS):
    trainer.fit(steps)
    return {"params": flat(trainer.model), "averaged": flat(trainer.eval_model), "history": trainer.history,
            "skipped": trainer.skipped, "eval": trainer.evaluate(EVAL)}  # fmt: skip


def rank_main(rank, port, out):
    """One rank: joins the group the way torchrun's environment makes it, trains every config."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    device = distributed.setup()
    try:
        results = {"device": str(device), "backend": dist.get_backend(), "world_size": distributed.get_world_size()}
        torch.manual_seed(1)
        with distributed.rank_random_stream():
            own = torch.rand(4)
        results["streams"] = (own, torch.rand(4))
        for name in CONFIGS:
            checkpoint = out / "mle.pt" if name == "mle" else None
            results[name] = run(make_trainer(name, checkpoint))
        results["odd_batch"] = demo_error([*FAST, "--batch-size", "33", "--out", str(out / "odd")])
        # Regression: ranks started with different settings used to train silently, or fail late
        results["other_seed"] = demo_error([*FAST, "--seed", str(rank), "--out", str(out / "seeds")])
        results["other_steps"] = demo_error([*FAST, "--steps", str(3 + rank), "--out", str(out / "steps")])
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        distributed.teardown()


def demo_error(argv):
    """The demo's exit status and the last line of its error output."""
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            status = main(argv)
        except SystemExit as exit:
            status = exit.code
    return status, err.getvalue().strip().splitlines()[-1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, *args, nprocs=WORLD):
    """Run ``fn(rank, port, *args)`` in ``nprocs`` processes; kill them all on failure.

    Forked (as torch's own distributed tests do): the ranks inherit the imported modules and
    start at once, where spawned ones would import torch and pyro_cnf again, about 15 s on
    two CPUs. The parent holds no process group and no CUDA context to inherit.
    """
    context = mp.start_processes(fn, args=(free_port(), *args), nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not context.join(timeout=1.0):  # raises when a rank failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ranks did not finish in {TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(10)


@pytest.fixture(scope="module")
def one_process():
    """Every config trained by one process on the whole batches (which also warms up the
    imports the forked ranks then inherit)."""
    return {name: run(make_trainer(name)) for name in CONFIGS}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, one_process):
    out = tmp_path_factory.mktemp("ranks")
    launch(rank_main, out)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_setup_joins_a_gloo_group_on_cpu(ranks):
    _, results = ranks
    assert [(r["device"], r["backend"], r["world_size"]) for r in results] == [("cpu", "gloo", WORLD)] * WORLD


def test_demo_refuses_a_batch_that_does_not_split_over_the_ranks(ranks):
    out, results = ranks
    for r in results:
        assert r["odd_batch"][0] == 2
        assert r["odd_batch"][1].endswith("error: argument --batch-size: 33 is not a multiple of the 2 processes")
    assert not (out / "odd").exists()


def test_demo_refuses_ranks_started_with_different_settings(ranks):
    out, results = ranks
    for r in results:  # every rank stops, naming the first difference
        assert r["other_seed"] == (2, "python -m pyro_cnf.demo: error: argument --seed: 1 on rank 1, 0 on rank 0; "
                                   "start every rank with the same settings")  # fmt: skip
        assert r["other_steps"][0] == 2 and "argument --steps: 4 on rank 1, 3 on rank 0" in r["other_steps"][1]
    assert not (out / "seeds").exists() and not (out / "steps").exists()


@pytest.mark.parametrize("name", ["mle", "mle_adjoint", "flow_matching", "fm_recipe", "skip"])
def test_two_ranks_take_the_steps_of_one_process(ranks, one_process, name):
    _, results = ranks
    rank0, rank1 = (r[name] for r in results)
    assert torch.equal(rank0["params"], rank1["params"])  # DDP: one averaged gradient for all
    assert rank0["history"] == rank1["history"] and rank0["eval"] == rank1["eval"]  # reduced metrics
    one = one_process[name]
    assert torch.allclose(rank0["params"], one["params"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(rank0["averaged"], one["averaged"], rtol=1e-5, atol=1e-6)
    assert rank0["history"] == [pytest.approx(h, rel=1e-5) for h in one["history"]]
    assert rank0["eval"] == pytest.approx(one["eval"], rel=1e-6)  # rows split 6 / 5 over the ranks
    if name == "skip":  # the solve failed on rank 1 only, and both ranks dropped the batch
        assert rank0["skipped"] == rank1["skipped"] == one["skipped"] == 1
        assert rank0["history"][2] == {"step": 2, "skipped": 1.0}


def test_probes_differ_between_ranks_while_the_shared_stream_stays_in_lockstep(ranks):
    _, results = ranks
    (own0, shared0), (own1, shared1) = (r["streams"] for r in results)
    assert not torch.equal(own0, own1) and torch.equal(shared0, shared1)
    # RNODE's probes: each rank its own, so the run is not one process's, but one run
    rnode0, rnode1 = (r["rnode"] for r in results)
    assert torch.equal(rnode0["params"], rnode1["params"]) and rnode0["history"] == rnode1["history"]
    assert set(rnode0["history"][0]) == {"step", "loss", "nll", "nfe", "kinetic", "jacobian"}


def test_rank_0_alone_writes_a_checkpoint_that_resumes_in_one_process(ranks, tmp_path):
    out, _ = ranks
    assert sorted(p.name for p in out.iterdir()) == ["mle.pt", "rank0.pt", "rank1.pt"]  # no temporary file
    state = load_checkpoint(out / "mle.pt", Trainer.STATE_KEYS)
    assert state["step"] == STEPS and len(state["history"]) == STEPS
    resumed = make_trainer("mle", checkpoint=out / "mle.pt")
    assert resumed.resume() and resumed.step == STEPS
    resumed.checkpoint = Checkpointing(tmp_path / "resumed.pt")
    more = run(resumed, STEPS + 3)
    whole = run(make_trainer("mle"), STEPS + 3)  # one process all along
    assert torch.allclose(more["params"], whole["params"], rtol=1e-5, atol=1e-6)
    assert [h["loss"] for h in more["history"]] == pytest.approx([h["loss"] for h in whole["history"]], rel=1e-5)


def test_shard_needs_a_batch_that_splits_evenly():
    with pytest.raises(ValueError, match="16 rows does not split evenly over 3 processes"):
        distributed.shard(torch.zeros(16, 2), rank=0, world_size=3)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        distributed.shard(torch.zeros(4, 2), rank=2, world_size=2)
    parts = [distributed.shard(torch.arange(7), even=False, rank=r, world_size=3) for r in range(3)]
    assert torch.equal(torch.cat(parts), torch.arange(7))


@pytest.mark.slow
def test_demo_under_torchrun_matches_one_process_and_resumes_in_one(tmp_path):
    ddp, one, resumed = tmp_path / "ddp", tmp_path / "one", tmp_path / "resumed"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "pyro_cnf.demo", *FAST, "--steps", "4", "--out", str(ddp)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers
            process.wait()
    assert process.returncode == 0, stderr[-3000:]
    assert stdout.count("held-out NLL") == 1  # rank 0 reports
    assert sorted(p.name for p in ddp.iterdir()) == ["checkpoint.pt", "demo.png", "metrics.json"]
    assert main([*FAST, "--steps", "4", "--out", str(one)]) == 0
    a, b = (load_checkpoint(d / "checkpoint.pt", Trainer.STATE_KEYS) for d in (ddp, one))
    assert a["step"] == b["step"] == 4
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-5)
    for name, value in b["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(a["model"][name], value, rtol=1e-5, atol=1e-6), name
    metrics = json.loads((ddp / "metrics.json").read_text())
    assert metrics["held_out_nll"] == pytest.approx(json.loads((one / "metrics.json").read_text())["held_out_nll"],
                                                    abs=1e-4)  # fmt: skip
    # the two-rank checkpoint continues in one process as the one-process run would
    resumed.mkdir()
    (resumed / "checkpoint.pt").write_bytes((ddp / "checkpoint.pt").read_bytes())
    assert main([*FAST, "--steps", "6", "--out", str(resumed), "--resume"]) == 0
    assert main([*FAST, "--steps", "6", "--out", str(one), "--resume"]) == 0
    c, d = (load_checkpoint(d / "checkpoint.pt", Trainer.STATE_KEYS) for d in (resumed, one))
    assert [h["loss"] for h in c["history"]] == pytest.approx([h["loss"] for h in d["history"]], rel=1e-5)
