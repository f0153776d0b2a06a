"""Safe outputs: atomic writes that never follow a planted symlink, checkpoints that are
verified before use, the run lock, and the early check that a checkpoint can be written."""

import hashlib
import io
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from pyro_cnf.training import CheckpointError, RunLock, RunLockedError, load_checkpoint, save_atomic, save_checkpoint
from pyro_cnf.training.checkpoint import check_writable, write_atomic

DAMAGED = "it was not written by this program or is damaged"


def test_write_atomic_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"step": 1}, path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would have made it

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_write_atomic_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    # Regression: a symlink at out/metrics.json made the demo overwrite its target
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "metrics.json"
    link.symlink_to(target)
    write_atomic(link, b"{}")
    assert target.read_text() == "keep me"
    assert not link.is_symlink() and link.read_bytes() == b"{}"


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"step": 7, "weights": torch.arange(3.0), "history": [{"loss": 1.0}]}, path)
    state = load_checkpoint(path, {"step": int, "history": list})
    assert state["step"] == 7 and torch.equal(state["weights"], torch.arange(3.0))


def damaged_files(good: bytes):
    """What a resume may meet instead of a checkpoint (each used to raise OSError,
    EOFError, UnpicklingError or KeyError)."""
    header, _, payload = good.partition(b"\n")
    flipped = bytearray(good)
    flipped[len(header) + 1 + len(payload) // 2] ^= 0x10  # one bit in the middle of the payload
    plain = io.BytesIO()
    torch.save({"step": 3}, plain)
    return {
        "empty": (b"", "the file is empty"),
        "truncated": (good[: len(good) // 2], "its checksum does not match its contents"),
        "header only": (header + b"\n", "its checksum does not match its contents"),
        "random": (os.urandom(4096), "it does not start with the checkpoint header"),
        "bit flip": (bytes(flipped), "its checksum does not match its contents"),
        "a plain pickle": (pickle.dumps({"step": 3}), "it does not start with the checkpoint header"),
        "a plain torch.save": (plain.getvalue(), "it is a plain torch.save file"),
    }


@pytest.mark.parametrize("case", ["empty", "truncated", "header only", "random", "bit flip", "a plain pickle",
                                  "a plain torch.save"])  # fmt: skip
def test_damaged_or_foreign_checkpoints_are_refused_with_one_message(tmp_path, case):
    path = tmp_path / "c.pt"
    save_checkpoint({"step": 3, "weights": torch.randn(100)}, path)
    data, reason = damaged_files(path.read_bytes())[case]
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, {"step": int})
    assert str(info.value).startswith(f"cannot read checkpoint {path}: {reason}")
    assert str(info.value).endswith(DAMAGED)
    error = info.value  # no pickle or zip traceback chained to it
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_checkpoints_of_the_wrong_structure_are_refused(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"steps": 3}, path)
    with pytest.raises(CheckpointError, match=f"{path}: it has no 'step' entry; {DAMAGED}"):
        load_checkpoint(path, {"step": int})
    save_checkpoint({"step": "3"}, path)
    with pytest.raises(CheckpointError, match="its 'step' entry is a str"):
        load_checkpoint(path, {"step": int})


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    buffer = io.BytesIO()
    torch.save({"step": Evil()}, buffer)
    payload = buffer.getvalue()
    path = tmp_path / "c.pt"
    path.write_bytes(b"pyro_cnf checkpoint 1 sha256=" + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(CheckpointError, match=r"its contents do not load \(UnpicklingError\); it was not written"):
        load_checkpoint(path)


def test_unreadable_checkpoints_say_why(tmp_path):
    with pytest.raises(CheckpointError, match="Is a directory$"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="No such file or directory$"):
        load_checkpoint(tmp_path / "missing.pt")


def chattr(flag, path):
    try:
        subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("chattr needs root and a filesystem with the immutable flag")


def test_check_writable_finds_every_later_write_failure_now(tmp_path):
    check_writable(tmp_path / "new.pt")  # fine: a new file in a writable directory
    with pytest.raises(FileNotFoundError, match="the directory .*nowhere does not exist"):
        check_writable(tmp_path / "nowhere" / "c.pt")
    (tmp_path / "d.pt").mkdir()
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        check_writable(tmp_path / "d.pt")
    frozen = tmp_path / "frozen.pt"
    frozen.write_bytes(b"")
    chattr("+i", frozen)
    try:
        with pytest.raises(PermissionError, match="frozen.pt: the file is read-only or immutable"):
            check_writable(frozen)
        with pytest.raises(PermissionError):  # what it saves us from
            write_atomic(frozen, b"new")
    finally:
        chattr("-i", frozen)


def test_run_lock_names_its_holder_and_is_released(tmp_path):
    with RunLock(tmp_path) as lock:
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path).acquire()
        message = str(info.value)
        assert f"{tmp_path} is in use by another run: {lock.path} is held by pid {os.getpid()} on " in message
    assert not lock.path.exists()
    with RunLock(tmp_path):  # free again
        pass


def test_run_lock_release_in_a_read_only_directory_hides_no_error(tmp_path, monkeypatch):
    # Regression: release() raised PermissionError, hiding the error that ended the run
    lock = RunLock(tmp_path)
    lock.acquire()

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "unlink", refuse)  # as in a directory made read-only (root ignores chmod)
    lock.release()
    monkeypatch.undo()
    assert (tmp_path / ".lock").exists()  # left behind, but free: the lock went with the descriptor
    with RunLock(tmp_path):
        pass


def test_run_lock_of_a_killed_process_does_not_block(tmp_path):
    code = ("import sys, time; from pyro_cnf.training import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"held by pid {process.pid} on "):
            RunLock(tmp_path).acquire()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    assert (tmp_path / ".lock").exists()  # left behind by the kill, and harmless
    with RunLock(tmp_path):
        pass


def test_run_lock_refuses_a_symlink(tmp_path):
    (tmp_path / ".lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        RunLock(tmp_path).acquire()
    assert not (tmp_path / "elsewhere").exists()
