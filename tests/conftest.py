"""Fixtures: run the CLI in-process, tiny real data subsets, tiny training settings; the test tiers.

Real data only. The default tier reads only files inside the repository: the embedded nuclei subset
(data/nuclei) and the samples in tests/data (see tests/samples.py). Subsets are copied into tmp folders;
the originals are never written.

Tiers: `make test` runs the default tier. Tests marked `slow` (long end-to-end runs, fuzzing at scale)
and the modules in tests/extended (they read the larger datasets under $SEGKIT_DATA) run with
`pytest --all` (`make test-all`). The default tier's property tests draw the same examples on every run
(hypothesis derandomized, per test); `--all` draws new ones each run, which is where new faults turn up.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import settings
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXTENDED = Path(os.environ.get("SEGKIT_DATA") or ROOT.parent / "shared" / "datasets")
NUCLEI = ROOT / "data" / "nuclei"
CONFIGS = ROOT / "configs"

# Training settings that keep a run to a few seconds on 2 CPU cores.
TINY = ("--device", "cpu", "--no-progress",
        "--set", "train.steps_per_epoch=2", "--set", "train.crop=64", "--set", "train.batch_size=2",
        "--set", "train.workers=0", "--set", "model.encoder=resnet18", "--set", "train.val_every=1")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def extended_data(name: str) -> Path:
    """The extended tier's dataset `name` under $SEGKIT_DATA; skips the calling module, in one line, where absent."""
    path = EXTENDED / name
    if not path.is_dir():
        pytest.skip(f"extended tier: {path} not found (set SEGKIT_DATA to the datasets folder)",
                    allow_module_level=True)
    return path


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all", action="store_true", help="also run the slow and extended tiers (make test-all)")
    parser.addoption("--no-skips", action="store_true",
                     help="a skipped test fails (CI's default tier: nothing may be skipped for missing data)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.config.getoption("--no-skips"):
        report.outcome = "failed"
        report.longrepr = f"skipped under --no-skips: {report.longrepr}"


def _default_tier(config: pytest.Config) -> bool:
    return not (config.getoption("--all") or config.getoption("markexpr"))


def pytest_configure(config: pytest.Config) -> None:
    """The default tier's hypothesis examples are fixed (seeded from each test), so one `make test` passes or
    fails as the last did: a fuzzed file that once hung it (a TIFF claiming 15 769 881 rows in 9 tiles) came
    from a fresh draw. The other tiers keep drawing new examples. Loaded before the test modules are
    imported, so their `settings(...)` inherit it."""
    if _default_tier(config):
        settings.register_profile("default-tier", derandomize=True)
        settings.load_profile("default-tier")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The default tier does not import tests/extended: its modules would only skip for want of data."""
    if collection_path == Path(__file__).parent / "extended" and _default_tier(config):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules under tests/extended are `extended`; without --all (or an explicit -m) only the default tier runs."""
    extended = Path(__file__).parent / "extended"
    for item in items:
        if extended in Path(item.fspath).parents:
            item.add_marker(pytest.mark.extended)
    if not _default_tier(config):
        return
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        (dropped if item.get_closest_marker("slow") or item.get_closest_marker("extended") else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


class Result(NamedTuple):
    """What a CLI run gave; unpacks as (code, out, err)."""

    code: int
    out: str
    err: str


def run_cli(*args) -> Result:
    """`segkit ARGS` in this process: exit code, stdout and stderr (SystemExit caught). Every command, ended
    however, has finished its threads (its writes) by then: the program ends at once after it (`console`)."""
    from cli.app import main, running_threads

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    running = [t.name for t in running_threads()]
    assert not running, f"segkit {' '.join(map(str, args))} left threads running: {running}"
    return Result(code, out.getvalue(), err.getvalue())


def no_traceback(text: str) -> bool:
    return "Traceback" not in text


def small_nuclei_stems(n: int, split: str = "train") -> list[str]:
    """The first `n` (sorted) 256x256 nuclei images of a split: small, so validation is quick."""
    stems = []
    for path in sorted((NUCLEI / split / "images").iterdir()):
        with Image.open(path) as im:
            if im.size == (256, 256):
                stems.append(path.stem)
        if len(stems) == n:
            return stems
    raise AssertionError(f"fewer than {n} 256x256 images in {NUCLEI / split}")


def copy_nuclei(dst: Path, n: int = 8, split: str = "train") -> Path:
    """`n` real image/mask pairs of data/nuclei/<split> into dst/<split>/{images,masks}; returns dst."""
    for kind in ("images", "masks"):
        (dst / split / kind).mkdir(parents=True, exist_ok=True)
    for stem in small_nuclei_stems(n, split):
        for kind in ("images", "masks"):
            shutil.copy(NUCLEI / split / kind / f"{stem}.png", dst / split / kind / f"{stem}.png")
    return dst


def train_args(config: Path, data: Path, out: Path, *extra, epochs: int | None = 2) -> list:
    """`segkit train` arguments for a tiny CPU run of `config` on `data` into `out`.

    `--epochs` (when given) is applied after every `--set`, so it wins over `--set train.epochs`.
    """
    more = ["--epochs", str(epochs)] if epochs is not None else []
    return ["train", config, "--out", out, *more, "--set", f"data.root={data}", *TINY, *extra]


@pytest.fixture
def cli():
    """The CLI runner: cli("train", ...) -> Result(code, out, err)."""
    return run_cli


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """`module_tmp(name)`: a fresh folder like `tmp_path_factory.mktemp`, removed when the module's tests are
    done if they all passed (a trained run is ~220 MB: kept for the whole session they filled CI's disk)."""
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    failed_before = request.session.testsfailed
    yield mktemp
    if request.session.testsfailed == failed_before:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_nuclei(tmp_path_factory) -> Path:
    """8 real nuclei pairs in ROOT/train/{images,masks} (read-only for tests: copy before changing)."""
    return copy_nuclei(tmp_path_factory.mktemp("tiny") / "data", 8)


def assert_refused(result: Result, out: Path, *words: str) -> None:
    """A usage error: exit 2, `error: ...` on stderr naming `words`, no traceback, nothing written."""
    assert result.code == 2, (result.code, result.out, result.err)
    assert result.err.startswith("error:"), result.err
    assert "Traceback" not in result.err + result.out
    for word in words:
        assert word in result.err, (word, result.err)
    assert not Path(out).exists(), f"{out} was written"


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""The default input normalisation (mean, std) of 3-channel configs, as written in model.json."""


def follow_content(model, x):
    """`model` (untrained, changed in place and returned) made to give masks that follow the images `x`
    (N, C, H, W): batch-norm statistics taken from `x` (a fresh network's statistics give an almost
    constant output), then each logit channel scaled to mean 0, std 3 on `x`."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batch
    with torch.no_grad():
        model.train()(x)
        y = model.eval()(x)
        conv = model.segmentation_head[0]
        mean, std = y.mean((0, 2, 3)), y.std((0, 2, 3))
        conv.weight.mul_((3 / std).view(-1, 1, 1, 1))
        conv.bias.sub_(mean).mul_(3 / std)
    return model


@pytest.fixture(scope="session")
def content_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Untrained resnet18 U-Net checkpoints ({"sigmoid": [nucleus], "softmax": [background, nucleus]})
    whose masks follow the image: batch-norm statistics taken from 4 real nuclei images (a fresh network's
    statistics give an almost constant output), then logits scaled to mean 0, std 3 on those images.
    About 30% of their pixels change under flip TTA; sigmoid probabilities spread over (0, 1). Their model.json
    records a training crop of 256: prediction mirrors a 360-pixel side into its padding (`segkit.padding`)."""
    import numpy as np
    import torch

    from segkit.data.normalize import Normalization
    from segkit.heads import build_head
    from segkit.model import build_model, checkpoint_meta, save_checkpoint

    images = np.stack([np.asarray(Image.open(NUCLEI / "train" / "images" / f"{s}.png").convert("RGB"))
                       for s in small_nuclei_stems(4)]).astype(np.float32)
    x = torch.from_numpy((images - 255 * np.array(IMAGENET[0])) / (255 * np.array(IMAGENET[1])))
    x = x.permute(0, 3, 1, 2).float()
    root = tmp_path_factory.mktemp("content")
    folders = {}
    for head_name, classes in (("sigmoid", ["nucleus"]), ("softmax", ["background", "nucleus"])):
        torch.manual_seed(0)
        head = build_head(head_name, classes)
        model = follow_content(build_model("Unet", "resnet18", head.channels), x)
        folders[head_name] = root / head_name
        save_checkpoint(folders[head_name], model, checkpoint_meta(head, "Unet", "resnet18", 3,
                                                                   Normalization.unit(*IMAGENET), crop=256,
                                                                   data={"mask": "binary"}))
    return folders
