"""Volume files: the one place that knows their formats.

- NIfTI (.nii.gz, .nii) -> nibabel; its header is kept whole, so outputs carry the input's qform/sform;
- NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) and DICOM series (a folder of one case's .dcm slices) ->
  SimpleITK (the `itk` extra), their LPS geometry turned into a RAS affine as nibabel's.

Every file opens as a `VolumeFile`: its shape, RAS affine and spacing read from the header, the voxels on
first use of `dataobj`. A header that declares more voxels than its file can hold is refused at once, before
memory is asked for them. Outputs mirror inputs (`output_ending`): NIfTI and DICOM in -> NIfTI out, NRRD in
-> NRRD out, MetaImage in -> .mha out.
"""

from __future__ import annotations

import gzip
import zlib
from functools import cached_property
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from segkit.errors import DataError, UnreadableError

NIFTI_ENDINGS = (".nii.gz", ".nii")
ITK_ENDINGS = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_ENDINGS = NIFTI_ENDINGS + ITK_ENDINGS
DICOM_ENDING = ".dcm"
MAX_DEFLATE_RATIO = 1032
"""zlib cannot compress more than ~1032:1: a compressed file this many times smaller than its voxels is cut."""
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ending(path: Path) -> str | None:
    """The volume ending of a file name, or None: not a volume file."""
    name = path.name.lower()
    return next((e for e in VOLUME_ENDINGS if name.endswith(e)), None)


def is_dicom_series(path: Path) -> bool:
    """A folder holding .dcm files: one case's DICOM series."""
    return path.is_dir() and any(p.suffix.lower() == DICOM_ENDING for p in path.iterdir())


def is_volume(path: Path) -> bool:
    """Whether `path` is a volume: a file with a volume ending, or a DICOM series folder."""
    if path.name.startswith("."):
        return False
    return is_dicom_series(path) if path.is_dir() else ending(path) is not None


def case_name(path: Path) -> str:
    """The case a volume file or DICOM folder stands for: its name without the volume ending."""
    found = ending(path) if not path.is_dir() else None
    return path.name[:-len(found)] if found else path.name


def output_ending(path: Path) -> str:
    """The ending of a prediction written for the input `path`: the same family as the input (NIfTI for
    DICOM, which segkit does not write: a series per mask would need a full DICOM-SEG writer)."""
    found = ending(path) if not path.is_dir() else None
    if found in (".nrrd", ".nhdr"):
        return ".nrrd"
    if found in (".mha", ".mhd"):
        return ".mha"
    return ".nii.gz"


def open_volume(path: Path, case: str) -> nib.spatialimages.SpatialImage | ItkFile:
    """A volume file, header read: a nibabel image for NIfTI, an `ItkFile` for the SimpleITK formats. Both
    give ndim, shape, affine (RAS), header (a NIfTI header: zooms, units, dtype) and dataobj."""
    if ending(path) in NIFTI_ENDINGS:
        try:
            image = nib.load(path)
        except (ImageFileError, OSError, EOFError) as err:
            raise UnreadableError(f"{path} (case {case}): not a readable NIfTI file ({err}). "
                                  "Fix: re-export it as .nii.gz, or remove the case.") from err
        header = image.header
        need = int(header["vox_offset"]) + int(np.prod(header.get_data_shape(), dtype=np.int64)) * \
            header.get_data_dtype().itemsize
        _check_stored(path, case, header.get_data_shape(), header.get_data_dtype(), need, _nifti_bytes(path, need))
        return image
    return ItkFile(path, case)


def _nifti_bytes(path: Path, need: int) -> int:
    """Bytes `path` holds once decompressed, counted up to `need`: a .nii's size; for a .nii.gz, gzip's
    trailer (the length mod 2**32) when it agrees with `need`, else a streamed count (several gzip
    members, or more than 4 GiB, or a file that is short)."""
    if not path.name.endswith(".gz"):
        return path.stat().st_size
    with open(path, "rb") as f:
        f.seek(-4, 2)
        if int.from_bytes(f.read(4), "little") == need % 2**32:
            return need
    have = 0
    try:
        with gzip.open(path, "rb") as stream:
            while have < need and (chunk := stream.read(1 << 24)):
                have += len(chunk)
    except (OSError, EOFError, zlib.error):
        pass  # counted up to where the stream breaks
    return have


def _check_stored(path: Path, case: str, shape: tuple[int, ...], dtype: np.dtype, need: int, have: int) -> None:
    """The voxels a header declares must fit in its file: refused from the header, before a huge header of a
    small file asks for memory it cannot have."""
    if have < need:
        raise UnreadableError(f"{path} (case {case}): the header declares {'x'.join(map(str, shape))} voxels of "
                              f"{np.dtype(dtype)} ({need / 1e6:.3g} MB), but the file holds {have / 1e6:.3g} MB. "
                              "Fix: re-export the file (it is truncated or its header is wrong), or remove the case.")


def voxels(image: Any, path: Path, case: str) -> np.ndarray:
    """The voxels of an `open_volume` result, in their stored (scaled) type."""
    try:
        return np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, ValueError) as err:  # truncated or corrupt .nii(.gz)
        raise UnreadableError(f"{path} (case {case}): the header reads but the voxels do not ({err}). "
                              "Fix: copy or re-export the file again; it is probably truncated.") from err


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:
        raise DataError("NRRD, MetaImage and DICOM volumes are read with SimpleITK, which is not installed. Fix: "
                        "pip install 'segkit[itk]' (or pip install SimpleITK), or convert the volumes to NIfTI."
                        ) from None
    return sitk


class ItkFile:
    """A NRRD, MetaImage or DICOM-series volume through SimpleITK, shaped as nibabel shapes a NIfTI: voxel
    axes (i, j, k[, channel]) and a RAS affine (SimpleITK's LPS direction, spacing and origin, x and y
    negated). `itk_geometry` keeps the file's own spacing, origin and direction, for writing outputs."""

    def __init__(self, path: Path, case: str) -> None:
        sitk = _sitk()
        self.path, self.case = Path(path), case
        if self.path.is_dir():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(self.path))
            if not files:
                raise UnreadableError(f"{self.path} (case {case}): no readable DICOM series in the folder. Fix: "
                                      "put one series' .dcm files in it, or remove the case.")
            self.files = [Path(f) for f in files]
            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
        else:
            self.files = [self.path]
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(self.path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise UnreadableError(f"{self.path} (case {case}): not a readable {ending(self.path) or 'DICOM'} volume "
                                  f"({str(err).strip().splitlines()[-1]}). Fix: re-export it, or remove the case.") from None
        self._image = self._series() if self.path.is_dir() else None  # a series' geometry needs all its slices
        source = self._image if self._image is not None else reader
        size = list(source.GetSize())
        if len(size) != 3:
            raise DataError(f"{self.path} (case {case}): a {len(size)}-D image of size {size}; a volume is 3-D (with "
                            "its channels as pixel components). Fix: save it as a 3-D volume.")
        components = source.GetNumberOfComponentsPerPixel() if self._image is not None else \
            reader.GetNumberOfComponents()
        self.dtype = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], source.GetPixelID(),
                                                                    components)).dtype)
        self.shape = tuple(size) + ((components,) if components > 1 else ())
        self.ndim = len(self.shape)
        spacing, origin, direction = source.GetSpacing(), source.GetOrigin(), source.GetDirection()
        self.itk_geometry = (tuple(spacing), tuple(origin), tuple(direction))
        self.affine = itk_affine(spacing, origin, direction)
        self.header = nib.Nifti1Header()
        self.header.set_data_shape(self.shape)
        self.header.set_data_dtype(self.dtype)
        self.header.set_zooms(tuple(float(s) for s in spacing) + ((1.0,) if components > 1 else ()))
        self.header.set_xyzt_units("mm")
        self.header.set_qform(self.affine, 1)
        self.header.set_sform(self.affine, 1)
        if not self.path.is_dir():
            need = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
            have = sum(p.stat().st_size for p in _data_files(self.path)) * MAX_DEFLATE_RATIO
            _check_stored(self.path, case, self.shape, self.dtype, need, have)

    def _series(self):
        sitk = _sitk()
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in self.files])
        try:
            return reader.Execute()
        except RuntimeError as err:
            raise UnreadableError(f"{self.path} (case {self.case}): the DICOM series does not read "
                                  f"({str(err).strip().splitlines()[-1]}). Fix: check that the folder holds one "
                                  "complete series.") from None

    @cached_property
    def dataobj(self) -> np.ndarray:
        """(i, j, k[, C]) voxels: SimpleITK's (k, j, i[, C]) array, axes reversed."""
        sitk = _sitk()
        if self._image is not None:
            image, self._image = self._image, None
        else:
            try:
                image = sitk.ReadImage(str(self.path))
            except RuntimeError as err:
                raise UnreadableError(f"{self.path} (case {self.case}): the header reads but the voxels do not "
                                      f"({str(err).strip().splitlines()[-1]}). Fix: copy or re-export the file "
                                      "again; it is probably truncated.") from None
        array = sitk.GetArrayFromImage(image)
        return np.ascontiguousarray(np.moveaxis(array, [0, 1, 2], [2, 1, 0]))


def itk_affine(spacing, origin, direction) -> np.ndarray:
    """The RAS voxel-to-mm affine of SimpleITK's LPS geometry."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.array(direction, float).reshape(3, 3) @ np.diag(np.array(spacing, float))
    affine[:3, 3] = LPS_TO_RAS @ np.array(origin, float)
    return affine


def _data_files(path: Path) -> list[Path]:
    """The files holding a NRRD or MetaImage volume's voxels: the file itself, or the data file that a
    detached header (.nhdr, .mhd) names."""
    if ending(path) not in (".nhdr", ".mhd"):
        return [path]
    key = "elementdatafile" if ending(path) == ".mhd" else "data file"
    for line in path.read_text(errors="replace").splitlines():
        name, _, value = line.partition("=" if key == "elementdatafile" else ":")
        if name.strip().lower() in (key, "datafile") and value.strip():
            data = path.parent / value.strip()
            return [data] if data.is_file() else []
    return []
