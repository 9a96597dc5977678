"""Several processes: DDP training with gloo on CPU, and predict sharded across ranks (torchrun)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segkit.train import EpochSampler

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
def test_predict_sharded_over_two_processes_equals_one_process(tmp_path):
    from segkit.heads import build_head
    from segkit.data.normalize import Normalization
    from segkit.model import build_model, checkpoint_meta, save_checkpoint

    head = build_head("softmax", ["background", "nucleus"])
    save_checkpoint(tmp_path / "ckpt", build_model("Unet", "resnet18", 2),
                    checkpoint_meta(head, "Unet", "resnet18", 3, Normalization.unit((0.5,) * 3, (0.25,) * 3)))
    images = NUCLEI / "test" / "images"
    args = [str(tmp_path / "ckpt"), str(images)]
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
