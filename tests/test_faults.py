"""Faults survived: a training process killed outright (SIGKILL: no handler, no cleanup)
leaves a checkpoint that loads and a lock that does not block, and the run resumed from it
repeats the uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyro_cnf.demo import main
from pyro_cnf.training import Trainer, load_checkpoint

from .test_demo import FAST

#: Every step saves (atomically), so the kill lands before, during or after a write.
ARGS = [*FAST, "--checkpoint-every", "1", "--eval-every", "0"]
#: The kill comes once a checkpoint of at least this many steps is on disk.
KILL_AFTER = 3
#: A process that never writes a checkpoint must fail the test, not stall the suite.
TIMEOUT = 240


def load(checkpoint):
    return load_checkpoint(checkpoint, Trainer.STATE_KEYS)


def saved_step(checkpoint):
    # os.replace swaps whole files: a reader sees the old checkpoint or the new one, whose
    # checksum then holds
    return load(checkpoint)["step"] if checkpoint.exists() else 0


def kill_mid_run(out):
    """Start a long demo run in ``out``; SIGKILL it once it has saved ``KILL_AFTER`` steps."""
    command = [sys.executable, "-m", "pyro_cnf.demo", *ARGS, "--steps", "1000000", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    checkpoint = out / "checkpoint.pt"
    deadline = time.monotonic() + TIMEOUT
    try:
        while saved_step(checkpoint) < KILL_AFTER:
            if process.poll() is not None:
                pytest.fail(f"the run ended before step {KILL_AFTER}: {process.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint of step {KILL_AFTER} in {TIMEOUT} s")
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    return process.returncode


def test_run_killed_mid_training_resumes_as_if_never_stopped(tmp_path, capsys):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    assert kill_mid_run(killed) == -signal.SIGKILL
    # the checkpoint loads whatever the kill interrupted, and its parts agree on the step
    state = load(killed / "checkpoint.pt")
    step = state["step"]
    assert step >= KILL_AFTER and [h["step"] for h in state["history"]] == list(range(step))
    assert state["optimizer"]["state"][0]["step"] == step  # Adam's own count
    assert not (killed / "metrics.json").exists()  # killed while training
    assert (killed / ".lock").exists()  # left behind; the kernel released the lock itself

    end = step + 3
    capsys.readouterr()
    assert main([*ARGS, "--steps", str(end), "--out", str(killed), "--resume"]) == 0
    assert f"resumed from {killed / 'checkpoint.pt'} at step {step}" in capsys.readouterr().out
    assert main([*ARGS, "--steps", str(end), "--out", str(whole)]) == 0
    resumed, uninterrupted = load(killed / "checkpoint.pt"), load(whole / "checkpoint.pt")
    assert resumed["step"] == uninterrupted["step"] == end
    # before the kill (the killed process's own steps) and after it (this process's)
    losses = [h["loss"] for h in resumed["history"]]
    assert losses == pytest.approx([h["loss"] for h in uninterrupted["history"]], rel=1e-5)
    for name, value in uninterrupted["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(resumed["model"][name], value, rtol=1e-5, atol=1e-6), name
