"""`segkit predict` as one library call: a folder of the user's files to masks on disk, by what the model was
trained on: a model trained on volume slices predicts NIfTI cases (`infer_volumes`), any other model images
and rasters (`Segmenter.predict_folder`). The same summary comes back either way."""

from __future__ import annotations

from pathlib import Path

from segkit.data.volume_spec import VolumeSpec
from segkit.data.volumes import is_volume_folder
from segkit.errors import SegkitError
from segkit.infer import FolderSummary, Segmenter
from segkit.infer_volumes import predict_volume_folder


def predict_files(seg: Segmenter, input_dir: str | Path, output_dir: str | Path, probs: bool = False,
                  overwrite: bool = False, workers: int = 2, progress: bool = False, vectorize: bool = False
                  ) -> FolderSummary:
    """Masks (and with `probs` probabilities) of every input under `input_dir`, written under `output_dir`;
    inputs that fail are in the summary's `failed`, the others written."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if VolumeSpec.from_meta(seg.meta) is not None:
        if vectorize:
            raise SegkitError("--vectorize: polygons are for georeferenced 2-D rasters; this checkpoint predicts "
                              "NIfTI volumes. Fix: leave out --vectorize.")
        return predict_volume_folder(seg, input_dir, output_dir, probs=probs, overwrite=overwrite,
                                     progress=progress, workers=workers)
    if is_volume_folder(input_dir):
        raise SegkitError(f"{input_dir}: NIfTI volumes, but this checkpoint was trained on 2-D images (its "
                          "model.json has no data.volume). Fix: train on the volume dataset (data.root: its folder "
                          "with dataset.json) and predict with that checkpoint.")
    return seg.predict_folder(input_dir, output_dir, probs=probs, overwrite=overwrite, workers=workers,
                              progress=progress, vectorize=vectorize)
