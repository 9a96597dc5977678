"""Several processes: DDP training with gloo on CPU, stopping it with SIGTERM and resuming it, and predict
sharded across ranks (torchrun)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segkit.model import load_checkpoint
from segkit.loader import EpochSampler

ROOT = Path(__file__).resolve().parents[1]
NUCLEI = ROOT / "data" / "nuclei"


def test_epoch_sampler_ranks_take_disjoint_shares_of_one_permutation():
    n, per_rank = 10, 5
    shares = [list(EpochSampler(n, per_rank, seed=3, rank=r, world=2)) for r in (0, 1)]
    idx = [{i for _, i in share} for share in shares]
    assert idx[0].isdisjoint(idx[1])
    assert idx[0] | idx[1] == set(range(n))
    single = [i for _, i in EpochSampler(n, n, seed=3)]
    assert sorted(single) == list(range(n))
    merged = [i for pair in zip(*[[i for _, i in s] for s in shares]) for i in pair]
    assert merged == single  # the ranks interleave the single-process order


def test_epoch_sampler_new_order_each_epoch():
    s = EpochSampler(20, 20, seed=0)
    first = [i for _, i in s]
    s.set_epoch(1)
    second = [i for _, i in s]
    assert sorted(first) == sorted(second) and first != second
    assert {e for e, _ in s} == {1}


_AGREE = """
import json, sys
import torch, torch.distributed as d
from segkit.train import _agreed_clock
rank, store, calls = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
d.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
print(json.dumps([_agreed_clock(late, share, torch.device("cpu")) for late, share in calls]))
d.destroy_process_group()
"""


def test_two_ranks_agree_on_the_latest_clock_and_on_any_ranks_time_up(tmp_path):
    """Under DDP the ranks take one learning rate and one stop from the time limit. Rank 0's deadline is the
    earliest (it alone waits for checkpoint writes), so the agreed share of the schedule is the largest: where
    rank 0 is past its end (1.0) and rank 1 not quite (0.9), both step with the schedule's end, not the mean
    0.95. A time-up on either rank is the time-up of both."""
    rank0 = [(True, 1.0), (False, 0.5), (False, 0.2)]
    rank1 = [(False, 0.9), (False, 0.7), (True, 0.1)]
    agreed = [[True, 1.0], [False, 0.7], [True, 0.2]]
    procs = [subprocess.Popen([sys.executable, "-c", _AGREE, str(r), str(tmp_path / "store"), json.dumps(calls)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, calls in enumerate((rank0, rank1))]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out) == agreed


def _subset(tmp: Path, n: int) -> Path:
    root = tmp / "data"
    for kind in ("images", "masks"):
        (root / "train" / kind).mkdir(parents=True)
        for path in sorted((NUCLEI / "train" / kind).iterdir())[:n]:
            shutil.copy(path, root / "train" / kind / path.name)
    return root


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


TINY = ["--device", "cpu", "--no-progress", "--set", "train.steps_per_epoch=2", "--set", "train.crop=64",
        "--set", "train.batch_size=4", "--set", "train.workers=0", "--set", "model.encoder=resnet18"]


@pytest.mark.slow
def test_train_with_two_gloo_processes_writes_the_single_process_checkpoint_format(tmp_path):
    data = _subset(tmp_path, 8)
    common = [str(ROOT / "configs" / "nuclei-sigmoid.yaml"), "--epochs", "2", "--set", f"data.root={data}", *TINY]
    multi = _run(["train", *common, "--out", str(tmp_path / "ddp"), "--nproc", "2"])
    assert multi.returncode == 0, multi.stderr[-3000:]
    single = _run(["train", *common, "--out", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr[-3000:]
    for run in ("ddp", "single"):
        folder = tmp_path / run
        assert sorted(p.name for p in (folder / "best").iterdir()) == ["model.json", "model.safetensors"]
        assert (folder / "last" / "train_state.pt").is_file()
        assert len((folder / "metrics.csv").read_text().strip().splitlines()) == 3
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "ddp" / "best" / "model.safetensors")), load_file(
        str(tmp_path / "single" / "best" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    meta_a = json.loads((tmp_path / "ddp" / "best" / "model.json").read_text())
    meta_b = json.loads((tmp_path / "single" / "best" / "model.json").read_text())
    assert {k: v for k, v in meta_a.items() if k not in ("epoch", "val")} == \
        {k: v for k, v in meta_b.items() if k not in ("epoch", "val")}
    resumed = _run(["train", *common[:1], "--epochs", "3", *common[3:], "--out", str(tmp_path / "ddp"), "--resume",
                    "--nproc", "2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = (tmp_path / "ddp" / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_stops_both_ranks_writes_last_and_the_printed_command_resumes(tmp_path):
    """A scheduler pre-empting `segkit train --nproc 2` signals the launcher alone: it passes SIGTERM to
    torchrun, which passes it to both ranks; they agree at the next loss read-back (every 2 steps here),
    rank 0 writes last/, and the launcher exits 143 with the line that says where it stopped and how to
    go on. That command (with --nproc 2 and --resume) finishes the run. Slow: four gloo processes start."""
    data = _subset(tmp_path, 8)
    run = tmp_path / "run"
    args = ["train", str(ROOT / "configs" / "nuclei-sigmoid.yaml"), "--out", str(run), "--epochs", "3",
            "--set", f"data.root={data}", *TINY, "--set", "train.steps_per_epoch=6", "--set", "train.log_every=2",
            "--nproc", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "epoch 1/3" in line:  # rank 0 logged epoch 1: both ranks are training epoch 2
                break
        else:
            raise AssertionError("".join(seen)[-3000:])
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = "".join(seen) + err
    assert proc.returncode == 143, err[-3000:]
    # The ranks print no traceback; torchrun reports the signal it got with one of its own (SignalException).
    assert err.count("Traceback (most recent call last)") == err.count("SignalException: Process "), err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("stopped at epoch ")]
    assert len(stops) == 1, err[-3000:]  # rank 0 alone says it
    state = torch.load(run / "last" / "train_state.pt", weights_only=True)
    epoch, step = state["epoch"], state["step"]
    where = f"epoch {epoch + 1} step {step}" if step else f"epoch {epoch} step 6"
    assert stops[0].startswith(f"stopped at {where}/6; continue with: segkit train "), (stops[0], epoch, step)
    assert 1 <= epoch <= 2 and step % 2 == 0 and state["layout"] == {"steps": 6, "batch_size": 4, "world": 2}
    model, head, meta = load_checkpoint(run / "last")  # loadable, and the state's epoch
    assert meta["epoch"] == epoch and head.classes == ["nucleus"]
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + epoch
    command = shlex.split(stops[0].split("continue with: ", 1)[1])
    assert command[:2] == ["segkit", "train"] and command[-3:] == ["--nproc", "2", "--resume"]
    resumed = _run(command[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch {epoch + 1} of 3 after step {step} of 6" in resumed.stderr
    assert "completed after 3 epochs" in resumed.stdout
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    assert torch.load(run / "last" / "train_state.pt", weights_only=True)["epoch"] == 3


@pytest.mark.slow
def test_predict_sharded_over_two_processes_equals_one_process(tmp_path, content_checkpoints):
    """A checkpoint whose masks follow the image: a random one draws one class almost everywhere, and
    any two such masks agree."""
    images = NUCLEI / "test" / "images"
    args = [str(content_checkpoints["softmax"]), str(images)]
    one = _run(["predict", *args, str(tmp_path / "one"), "--device", "cpu", "--workers", "0", "--no-progress"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(["predict", *args, str(tmp_path / "two"), "--device", "cpu", "--workers", "0", "--no-progress",
                "--nproc", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len(names) == len(list(images.iterdir()))
    for name in names:
        a = np.asarray(Image.open(tmp_path / "one" / name))
        b = np.asarray(Image.open(tmp_path / "two" / name))
        assert np.array_equal(a, b), name
        assert 0.05 < a.mean() < 0.95, name  # both classes, in quantity
