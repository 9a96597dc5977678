"""Pre-emption and exact resume: last/ is written as a unit, SIGTERM/SIGINT stop after the current step
with last/ written, a resumed run ends bit for bit where an uninterrupted one does, damaged or crafted
checkpoints are refused by name, and a run folder has one writer.

Every resumed run is compared with one uninterrupted run of the same seed (`reference`): the final
weights with torch.equal and every metrics.csv value but the timings. On CPU nothing in a step depends
on the process (the data order and augmentation are seeded by seed, epoch and index), so equality is
exact; any state that a resume lost or restored wrongly (optimizer moments, scheduler step, BatchNorm
statistics, the data position, the partial loss sum) shows up as a difference.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import segkit.checkpoints
import segkit.run_control
import segkit.train
from conftest import CONFIGS, ROOT, run_cli, train_args
from segkit.errors import SegkitError
from segkit.model import load_checkpoint, recover_unit, write_unit
from segkit.run_control import LOCK, RunLock

SIGMOID = CONFIGS / "nuclei-sigmoid.yaml"
EPOCHS, STEPS = 3, 2
EXTRA = ("--set", "train.log_every=2")  # read-back windows that a stop at step 1 of 2 cuts in half
TIMINGS = ("seconds", "images_per_s")


def _args(data: Path, out: Path, *extra: str) -> list:
    return train_args(SIGMOID, data, out, *EXTRA, *extra, epochs=EPOCHS)


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]


def _same_run(run: Path, reference: Path) -> None:
    """Equal final weights (bit for bit) and equal metrics.csv values, timings aside."""
    a, b = load_file(str(run / "last" / "model.safetensors")), load_file(str(reference / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert _rows(run) == _rows(reference)
    assert len(_rows(run)) == EPOCHS


def _state(run: Path) -> dict:
    return torch.load(run / "last" / "train_state.pt", weights_only=True)


def _link_copy(src: Path, dst: Path) -> Path:
    """A copy of a run folder whose files are hard links (cheap; segkit replaces files, never edits them)."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


@pytest.fixture(scope="module")
def reference_run(module_tmp, tiny_nuclei) -> tuple[Path, dict]:
    """The uninterrupted run (3 epochs of 2 steps), and what its process held when training returned:
    the optimizer's and the scheduler's state, and the global random generators."""
    run = module_tmp("reference") / "run"
    made: dict[str, object] = {}

    class KeptAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made["optimizer"] = self

    class KeptLambdaLR(torch.optim.lr_scheduler.LambdaLR):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made["scheduler"] = self

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim, "AdamW", KeptAdamW)
        mp.setattr(torch.optim.lr_scheduler, "LambdaLR", KeptLambdaLR)
        r = run_cli(*_args(tiny_nuclei, run))
    assert r.code == 0, r.err
    end = {"optimizer": copy.deepcopy(made["optimizer"].state_dict()),
           "scheduler": {k: v for k, v in made["scheduler"].state_dict().items() if k != "lr_lambdas"},
           "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    return run, end


@pytest.fixture(scope="module")
def reference(reference_run) -> Path:
    """The uninterrupted run's folder."""
    return reference_run[0]


# -- SIGTERM in this process, at chosen points -------------------------------------------------------------


@pytest.mark.parametrize("where, call, stopped, state", [
    ("to_network", 3, "stopped at epoch 2 step 1/2", (1, 1)),  # mid-epoch: the first step of epoch 2 done
    pytest.param("to_network", 4, "stopped at epoch 2 step 2/2", (1, 2),  # every step of epoch 2 done, not validated
                 marks=pytest.mark.slow),
    pytest.param("validate", 1, "stopped at epoch 1 step 2/2", (1, 0),  # during epoch 1's validation: at its end
                 marks=pytest.mark.slow),
], ids=["mid-epoch", "before-validation", "epoch-boundary"])
def test_sigterm_stops_writes_last_and_the_printed_command_resumes_exactly(
        reference, tiny_nuclei, tmp_path, monkeypatch, caplog, where, call, stopped, state):
    real, calls = getattr(segkit.train, where), []

    def hooked(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(segkit.train, where, hooked)
    handler = signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    r = run_cli(*_args(tiny_nuclei, run))
    assert r.code == 143, (r.code, r.err)
    assert "Traceback" not in r.err
    line = r.err.strip().splitlines()[-1]
    assert line.startswith(f"{stopped}; continue with: segkit train "), line
    assert (_state(run)["epoch"], _state(run)["step"]) == state
    assert json.loads((run / "last" / "model.json").read_text())["epoch"] == state[0]
    assert len(_rows(run)) == state[0]
    assert {"best", "config.yaml", "last", "metrics.csv"} <= {p.name for p in run.iterdir()}
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "lock or temporary folder left"
    assert signal.getsignal(signal.SIGTERM) == handler  # training's handler is gone after the stop

    monkeypatch.setattr(segkit.train, where, real)  # no more signals
    saved, first, to_network = _state(run)["rng"], [], segkit.train.to_network

    def spy(*args, **kwargs):  # Python's and numpy's generators where the resumed run takes its first step
        first.append((random.getstate(), np.random.get_state()[1].copy()))
        return to_network(*args, **kwargs)

    monkeypatch.setattr(segkit.train, "to_network", spy)
    random.seed(999)  # whatever this process did to them, the saved generators come back
    np.random.seed(999)
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:2] == ["segkit", "train"] and command[-1] == "--resume"
    r = run_cli(*command[1:])
    assert r.code == 0, r.err
    assert first[0][0][1] == tuple(saved["python"][1])
    assert np.array_equal(first[0][1], saved["numpy"]["keys"].numpy().astype(np.uint32))
    assert f"at epoch {state[0] + 1} of {EPOCHS} after step {state[1]} of {STEPS}" in caplog.text
    _same_run(run, reference)


def _same(a: object, b: object) -> bool:
    """Nested dicts, lists and tensors equal value for value (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_train_state_is_what_the_run_ended_with(reference_run):
    """last/train_state.pt of a finished run holds the optimizer (every moment and step count), the
    scheduler and the random generators exactly as the training process held them when it returned,
    the metrics history of metrics.csv, the last epoch's loss sum, and the resume point."""
    run, end = reference_run
    state, rows = _state(run), _rows(run)
    best = max(rows, key=lambda row: float(row["val_mean_dice"]))
    assert (state["epoch"], state["step"], state["best_epoch"]) == (EPOCHS, 0, int(best["epoch"]))
    assert state["best"] == float(best["val_mean_dice"]) and state["bad_epochs"] == EPOCHS - int(best["epoch"])
    assert state["layout"] == {"steps": STEPS, "batch_size": 2, "world": 1}
    assert _same(state["optimizer"], end["optimizer"])
    assert [float(s["step"]) for s in state["optimizer"]["state"].values()] == \
        [EPOCHS * STEPS] * len(state["optimizer"]["state"])
    assert _same({k: v for k, v in state["scheduler"].items() if k != "lr_lambdas"}, end["scheduler"])
    assert state["scheduler"]["last_epoch"] == EPOCHS * STEPS
    assert state["scheduler"]["_last_lr"] == [float(rows[-1]["lr"])]
    assert torch.equal(state["rng"]["torch"], end["torch"]) and state["rng"]["cuda"] == []
    _, keys, pos, has_gauss, cached = end["numpy"]
    numpy = state["rng"]["numpy"]
    assert np.array_equal(numpy["keys"].numpy(), keys) and (numpy["pos"], numpy["has_gauss"]) == (pos, has_gauss)
    assert numpy["cached_gaussian"] == cached and tuple(state["rng"]["python"][1]) == end["python"][1]
    assert [{k: str(v) for k, v in row.items() if k not in TIMINGS} for row in state["history"]] == rows
    assert state["seen"] == STEPS and state["loss_sum"] / STEPS == float(rows[-1]["train_loss"])


def test_rng_state_round_trips_every_generator():
    state = segkit.checkpoints.rng_state()
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    segkit.checkpoints.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], again[0]) and np.array_equal(drawn[1], again[1]) and drawn[2] == again[2]


# -- real processes: SIGTERM to the process group, SIGKILL while last/ is being written ------------------------


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_orphans():
    """A failing test must not leave its training process group running (it would load the machine)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(args: list) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    _STARTED.append(proc)
    return proc


def _wait_for(proc: subprocess.Popen, text: str) -> list[str]:
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"never saw {text!r}: {''.join(lines)[-3000:]}")


@pytest.mark.slow
def test_sigterm_to_a_real_process_group_with_data_workers_exits_143_with_last_written(tiny_nuclei, tmp_path):
    """Schedulers and Ctrl-C signal every process of the job: the loader workers ignore it, the main
    process finishes its step, writes last/ and says where it stopped. (Slow tier, which CI runs: a real
    process group takes 10 s; the in-process SIGTERM tests above cover the stop and resume in the default tier.)"""
    run = tmp_path / "run"
    run.mkdir()  # an existing empty folder: a new run may use it (its own lock file does not count)
    proc = _start(_args(tiny_nuclei, run, "--set", "train.workers=2"))
    before = _wait_for(proc, f"epoch 1/{EPOCHS}")
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    err = "".join(before) + err
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "exited unexpectedly" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped at epoch ") and line.endswith(" --resume"), line
    epoch, step = _state(run)["epoch"], _state(run)["step"]
    where = f"epoch {epoch + 1} step {step}" if step else f"epoch {epoch} step {STEPS}"  # mid-epoch, or at its end
    assert line.startswith(f"stopped at {where}/{STEPS}; continue with: segkit train "), (line, epoch, step)
    assert not (run / LOCK).exists()


@pytest.mark.slow
def test_sigkill_while_writing_then_resume_gives_the_uninterrupted_run(reference, tiny_nuclei, tmp_path):
    """kill -9 right after epoch 2 is logged, while its last/ is being written in the background:
    last/ is epoch 1's or epoch 2's, whole, and resuming from it ends where the reference does."""
    run = tmp_path / "run"
    proc = _start(_args(tiny_nuclei, run))
    _wait_for(proc, f"epoch 2/{EPOCHS}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    epoch = json.loads((run / "last" / "model.json").read_text())["epoch"]
    assert epoch in (1, 2) and _state(run)["epoch"] == epoch
    r = run_cli(*_args(tiny_nuclei, run, "--resume"))
    assert r.code == 0, r.err
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "leftovers of the killed write"
    _same_run(run, reference)


# -- last/ as a unit ----------------------------------------------------------------------------------------

KILL_LOOP = textwrap.dedent("""
    import json, os, random, signal, sys, time
    from pathlib import Path
    import segkit.model as m

    root = Path(sys.argv[1]); folder = root / "last"
    if sys.argv[2] == "renames":
        m._exchange = lambda a, b: False  # the fallback of systems without an atomic exchange

    def files(g):
        return {"model.safetensors": bytes([g % 251]) * 3_000_000, "model.json": json.dumps({"g": g}).encode(),
                "train_state.pt": str(g).encode() * 300_000}

    m.write_unit(folder, files(0))
    rng, results = random.Random(int(sys.argv[3])), []
    for i in range(int(sys.argv[3])):
        pid = os.fork()
        if pid == 0:
            g = 1 + 1000 * i
            while True:
                m.write_unit(folder, files(g))
                g += 1
        time.sleep(rng.uniform(0.005, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        leftovers = sorted(p.name for p in root.iterdir() if p.name != "last")
        m.recover_unit(folder)
        g = json.loads((folder / "model.json").read_text())["g"]
        whole = {p.name: p.read_bytes() for p in folder.iterdir()} == files(g)
        results.append({"g": g, "whole": whole, "leftovers": leftovers, "after": sorted(os.listdir(root))})
    print(json.dumps(results))
""")


@pytest.mark.parametrize("mode", ["exchange", pytest.param("renames", marks=pytest.mark.slow)])
def test_kill_9_at_random_points_of_writing_leaves_a_whole_folder(tmp_path, mode):
    """20 SIGKILLs at random moments of a loop that rewrites last/: after each (and `recover_unit`,
    which training runs first), last/ holds exactly the three files of one generation."""
    done = subprocess.run([sys.executable, "-c", KILL_LOOP, str(tmp_path), mode, "10"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert len(results) == 10
    assert all(r["whole"] for r in results), results
    assert all(r["after"] == ["last"] for r in results), results
    assert len({r["g"] for r in results}) > 1, "the writer never got past its first folder"


def _files(tag: bytes) -> dict[str, bytes]:
    return {"model.safetensors": tag * 10, "model.json": b'{"tag": "%s"}' % tag, "train_state.pt": tag}


def test_write_unit_failing_midway_leaves_the_old_folder(tmp_path, monkeypatch):
    folder = tmp_path / "last"
    write_unit(folder, _files(b"old"))
    calls = []

    def disk_full(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(segkit.model.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_unit(folder, _files(b"new"))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == _files(b"old")
    assert sorted(os.listdir(tmp_path)) == ["last"]


def test_a_kill_between_the_two_renames_is_undone_by_recover_unit(tmp_path, monkeypatch):
    folder = tmp_path / "last"
    write_unit(folder, _files(b"old"))
    monkeypatch.setattr(segkit.model, "_exchange", lambda a, b: False)
    real, renames = os.rename, []

    def killed_after_first(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise KeyboardInterrupt  # stands for the kill: nothing after this line runs
        real(src, dst)

    monkeypatch.setattr(segkit.model.os, "rename", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        write_unit(folder, _files(b"new"))
    monkeypatch.setattr(segkit.model.os, "rename", real)
    assert not folder.exists() and (tmp_path / ".last.old").is_dir()
    recover_unit(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == _files(b"old")
    assert sorted(os.listdir(tmp_path)) == ["last"]


def test_write_unit_replaces_every_file_and_keeps_normal_permissions(tmp_path):
    folder = tmp_path / "last"
    write_unit(folder, {**_files(b"a"), "extra.bin": b"x"})
    write_unit(folder, _files(b"b"))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == _files(b"b")
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_failed_checkpoint_write_stops_training_with_exit_1_and_keeps_the_last_one(
        reference, tiny_nuclei, tmp_path, monkeypatch):
    """The disk fills while epoch 4's last/ is written: exit 1 with the cause, last/ is epoch 3's, byte for byte."""
    run = _link_copy(reference, tmp_path / "run")
    real = segkit.checkpoints.write_unit

    def full_at_epoch_4(folder: Path, files: dict) -> None:
        if folder.name == "last" and json.loads(files["model.json"])["epoch"] == 4:
            raise OSError(28, "No space left on device")
        real(folder, files)

    monkeypatch.setattr(segkit.checkpoints, "write_unit", full_at_epoch_4)
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, *EXTRA, "--set", "train.steps_per_epoch=1", "--resume",
                            epochs=EPOCHS + 1))
    assert r.code == 1, r.err
    assert "Traceback" not in r.err
    assert f"training stopped: cannot write checkpoints into {run} (No space left on device)" in r.err
    assert {p.name: p.read_bytes() for p in (run / "last").iterdir()} == \
        {p.name: p.read_bytes() for p in (reference / "last").iterdir()}
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


# -- damaged or crafted checkpoints: exit 2 naming the file ----------------------------------------------------


class _Payload:
    """Pickles as a call of os.system: what a crafted train_state.pt would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _damage(run: Path, how: str, tmp_path: Path) -> Path:
    """Replace one file of last/ (the hard link is broken first); returns the file."""
    state, weights = run / "last" / "train_state.pt", run / "last" / "model.safetensors"
    target = weights if how.startswith("weights") else state
    data = target.read_bytes()
    target.unlink()
    if how == "state-truncated":
        target.write_bytes(data[: len(data) // 2])
    elif how == "state-random-bytes":
        target.write_bytes(os.urandom(4096))
    elif how == "state-crafted-pickle":
        torch.save({"optimizer": _Payload(tmp_path / "pwned")}, target)
    elif how == "state-not-a-state":
        torch.save([1, 2, 3], target)
    elif how == "state-wrong-kinds":
        torch.save({**torch.load(io.BytesIO(data), weights_only=True), "epoch": "three"}, target)
    elif how == "weights-truncated":
        target.write_bytes(data[: len(data) // 3])
    elif how == "weights-foreign":
        save_file({"conv.weight": torch.zeros(3, 3)}, str(target))
    return target


@pytest.mark.parametrize("how", ["state-truncated", "state-random-bytes", "state-crafted-pickle", "state-not-a-state",
                                 "state-wrong-kinds", "weights-truncated", "weights-foreign"])
def test_resume_from_a_damaged_or_crafted_checkpoint_exits_2_naming_the_file(reference, tiny_nuclei, tmp_path, how):
    run = _link_copy(reference, tmp_path / "run")
    damaged = _damage(run, how, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, *EXTRA, "--resume", epochs=EPOCHS + 1))
    assert r.code == 2, (r.code, r.err)
    assert r.err.startswith(f"error: {damaged}: not a segkit checkpoint, or damaged"), r.err
    assert "Fix:" in r.err and "Traceback" not in r.err and "weights_only" not in r.err
    assert not (tmp_path / "pwned").exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_predict_with_damaged_weights_or_a_crafted_model_json_exits_2(reference, tmp_path, tiny_nuclei):
    ckpt = _link_copy(reference / "best", tmp_path / "ckpt")
    images = tiny_nuclei / "train" / "images"
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[:1000])
    r = run_cli("predict", ckpt, images, tmp_path / "masks")
    assert r.code == 2 and r.err.startswith(f"error: {weights}: not a segkit checkpoint, or damaged"), r.err
    (ckpt / "model.json").unlink()
    (ckpt / "model.json").write_text(json.dumps({"head": "sigmoid", "classes": ["nucleus"]}))
    with pytest.raises(SegkitError, match="model.json: not a segkit checkpoint, or damaged \\(no arch, encoder, "
                                          "in_channels\\)"):
        load_checkpoint(ckpt)
    (ckpt / "model.json").write_text("[1, 2]")
    with pytest.raises(SegkitError, match="no arch, encoder, in_channels, head, classes"):
        load_checkpoint(ckpt)


# -- one writer per run folder -------------------------------------------------------------------------------


def test_a_locked_run_folder_is_refused_naming_it_the_holder_and_the_lock_file(reference, tiny_nuclei, tmp_path):
    run = _link_copy(reference, tmp_path / "run")
    holder = RunLock(run)
    holder.acquire()  # another open file description: to flock, the same as another process
    try:
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        for extra in (("--resume",), ()):
            r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, *EXTRA, *extra, epochs=EPOCHS + 1))
            assert r.code == 2, r.err
            assert r.err.startswith(f"error: {run}: another training is writing this run folder "
                                    f"(pid {os.getpid()} on "), r.err
            assert f"lock file {run / LOCK}" in r.err and "Traceback" not in r.err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    finally:
        holder.release()
    assert not (run / LOCK).exists()


HOLDER = textwrap.dedent("""
    import fcntl, os, socket, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\\n".encode())
    print("locked", flush=True)
    sys.stdin.read()
""")
"""Holds a run folder's lock as a training process does (flock on RUN/.train.lock, which names it),
without importing torch: the process only has to exist, then die."""


def test_the_lock_of_a_killed_process_does_not_block(reference, tiny_nuclei, tmp_path):
    run = _link_copy(reference, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / LOCK)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, *EXTRA, "--resume", epochs=EPOCHS))
    assert r.code == 2 and f"(pid {holder.pid} on " in r.err, r.err
    holder.kill()
    holder.wait()
    assert (run / LOCK).read_text().startswith(f"pid {holder.pid} ")  # the stale file stays ...
    r = run_cli(*train_args(SIGMOID, tiny_nuclei, run, *EXTRA, "--resume", epochs=EPOCHS))
    assert r.code == 2 and f"already trained for {EPOCHS} epochs" in r.err, r.err  # ... and blocks nothing
    assert not (run / LOCK).exists()


def test_after_the_first_signal_sigterms_are_absorbed_and_ctrl_c_interrupts_at_once():
    """torchrun forwards SIGTERM to ranks that the scheduler already signalled: a second SIGTERM must
    not kill a process that is writing last/; an impatient second Ctrl-C must still work."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a CLI process starts, whatever ran before here
    signals = segkit.run_control.StopSignals()
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # absorbed: this process lives on
        assert signals.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            [None for _ in range(1000)]  # the handler runs between bytecodes
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    for signum, handler in before.items():
        signal.signal(signum, handler)
