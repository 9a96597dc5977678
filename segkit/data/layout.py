"""Finding images and masks on disk and pairing them by stem.

Accepted layouts (DESIGN.md):
  ROOT/<split>/images + ROOT/<split>/masks
  ROOT/images/<split> + ROOT/masks/<split>
  ROOT/images + ROOT/masks                      (flat; validation is a seeded share of it)
Multi-label masks live in masks/<class name>/ folders, one binary mask per class.
An image stored as one file per band is a folder of them (images/<stem>/B02.tif, ...), recognised when
`data.bands` names the band files.
A mask pairs with the image of the same stem, or, failing that, with the image whose
stem is the longest prefix followed by `_` (ISIC's `X_segmentation.png` -> `X`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from segkit.data.io import is_image
from segkit.data.readers import band_names, is_band_folder, open_raster
from segkit.errors import DataError

log = logging.getLogger("segkit")

SPLITS = ("train", "val", "test")
T = TypeVar("T")


@dataclass(frozen=True)
class Sample:
    """One image and its mask file(s): a path, or class name -> path for multi-label masks."""

    stem: str
    image: Path
    mask: Path | dict[str, Path] | None

    @property
    def scored_in(self) -> str | None:
        """The unit validation scores are reduced over: None pools every image (dataset-level, as
        `segkit evaluate` reports images); a volume's slices name their case."""
        return None


@dataclass
class Pairing:
    samples: list[Sample]
    unlabeled: list[Path] = field(default_factory=list)
    orphan_masks: list[Path] = field(default_factory=list)


def split_dirs(root: Path) -> dict[str, tuple[Path, Path]]:
    """split name -> (images dir, masks dir); the flat layout is the split 'all'."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found. Fix: set data.root to a folder with images/ and masks/.")
    found: dict[str, tuple[Path, Path]] = {}
    for split in SPLITS:
        if (root / split / "images").is_dir():
            found[split] = (root / split / "images", root / split / "masks")
        elif (root / "images" / split).is_dir():
            found[split] = (root / "images" / split, root / "masks" / split)
    if not found and (root / "images").is_dir():
        found["all"] = (root / "images", root / "masks")
    if not found:
        raise DataError(
            f"{root}: no images/ folder. Fix: use ROOT/images + ROOT/masks, ROOT/train/images + ROOT/train/masks, "
            "or ROOT/images/train + ROOT/masks/train."
        )
    return found


def by_stem(folder: Path, bands: Sequence[int | str] | None = None) -> dict[str, Path]:
    """Stem -> image file (or band folder, when `bands` names band files) of `folder`."""
    files: dict[str, Path] = {}
    if not folder.is_dir():
        return files
    names = band_names(bands)
    for path in sorted(folder.iterdir()):
        if names and path.is_dir() and not is_band_folder(path, names) and any(map(is_image, path.iterdir())):
            open_raster(path, names).close()  # raises: names the band files it lacks
        if (path.is_file() and is_image(path)) or is_band_folder(path, names):
            if path.stem in files:
                raise DataError(f"{path}: two files with stem '{path.stem}' ({files[path.stem].name}). "
                                "Fix: keep one; images and masks pair by stem.")
            files[path.stem] = path
    return files


def _match(masks: dict[str, Path], stems: set[str]) -> tuple[dict[str, Path], list[Path]]:
    """Image stem -> mask path, by exact stem or longest `stem_` prefix; and the masks that match nothing."""
    matched: dict[str, Path] = {}
    orphans: list[Path] = []
    for mstem, path in masks.items():
        if mstem in stems:
            key = mstem
        else:
            prefixes = [s for s in stems if mstem.startswith(s + "_")]
            key = max(prefixes, key=len) if prefixes else None
        if key is None:
            orphans.append(path)
        elif key in matched and matched[key].stem == key:
            continue
        else:
            matched[key] = path
    return matched, orphans


def pair(images_dir: Path, masks_dir: Path, classes: list[str] | None = None, multilabel: bool = False,
         bands: Sequence[int | str] | None = None) -> Pairing:
    """Pair images with masks; with `multilabel`, one folder per class under masks_dir."""
    images = by_stem(images_dir, bands)
    if not images:
        raise DataError(f"{images_dir}: no images ({', '.join(('png', 'jpg', 'tif', 'bmp', 'gif'))}).")
    stems = set(images)
    if not multilabel:
        matched, orphans = _match(by_stem(masks_dir), stems)
        samples = [Sample(s, images[s], matched[s]) for s in sorted(images) if s in matched]
        unlabeled = [images[s] for s in sorted(images) if s not in matched]
        return Pairing(samples, unlabeled, orphans)
    assert classes is not None
    folders = [c for c in classes if (masks_dir / c).is_dir()]
    if not folders:
        raise DataError(f"{masks_dir}: no class folders {classes}. Fix: put one binary mask per class in "
                        f"{masks_dir}/<class>/<stem>.png, named as in data.classes.")
    if len(classes) - len(folders) > 1:
        missing = [c for c in classes if c not in folders]
        raise DataError(f"{masks_dir}: no folders for classes {missing}; only one class may lack a folder "
                        "(it then means 'pixels with no other label'). Fix: add the folders or rename data.classes.")
    per_class: dict[str, dict[str, Path]] = {}
    orphans: list[Path] = []
    for c in folders:
        per_class[c], lost = _match(by_stem(masks_dir / c), stems)
        orphans += lost
    samples, unlabeled = [], []
    for s in sorted(images):
        have = {c: per_class[c][s] for c in folders if s in per_class[c]}
        if len(have) == len(folders):
            samples.append(Sample(s, images[s], have))
        elif have:
            missing = [c for c in folders if c not in have]
            raise DataError(f"{images[s]}: no mask in {[str(masks_dir / c) for c in missing]}. "
                            "Fix: add an all-black mask for a class absent from this image.")
        else:
            unlabeled.append(images[s])
    return Pairing(samples, unlabeled, orphans)


def find_pairs(root: Path, split: str, classes: list[str] | None = None, multilabel: bool = False,
               bands: Sequence[int | str] | None = None) -> Pairing:
    dirs = split_dirs(root)
    if split not in dirs:
        raise DataError(f"{root}: no '{split}' split (found {sorted(dirs)}).")
    return pair(*dirs[split], classes=classes, multilabel=multilabel, bands=bands)


def seeded_split(samples: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic (train, val) split of a flat dataset (images, or cases); at least one each."""
    if len(samples) < 2:
        raise DataError(f"{len(samples)} labelled image(s): too few to hold some back for validation. "
                        "Fix: add images, or give a val/ split.")
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = min(max(1, round(len(samples) * fraction)), len(samples) - 1)
    held = set(order[:n_val].tolist())
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])
