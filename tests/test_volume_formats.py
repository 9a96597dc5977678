"""NRRD, MetaImage and DICOM volumes (through SimpleITK) read and written with their geometry.

The same real hippocampus case is stored as NIfTI and, with its voxel axes permuted and flipped, as NRRD, MHA
and a DICOM series, each with the geometry that puts every voxel at the same place in the scanner (computed
here by hand from the NIfTI affine, and checked against SimpleITK's own index-to-point transform). A model then
sees the same slices from every file, so its masks must be the same voxel for voxel, and each output must lie
on its input's grid: NRRD in -> NRRD out, MHA in -> MHA out, DICOM in -> NIfTI out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import volumedata
from segkit.data.readers.volume import itk_affine
from segkit.data.volumes import Volume
from segkit.errors import DataError, UnreadableError

import SimpleITK as sitk  # noqa: E402  (the itk extra: make setup installs it)

CASE = "hippocampus_004"
LPS = np.diag([-1.0, -1.0, 1.0])


def lps_geometry(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """SimpleITK's (spacing, origin, direction) of a RAS affine, by hand: the column norms, the columns divided
    by them, x and y negated."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = LPS @ affine[:3, :3] / spacing
    return tuple(spacing), tuple(LPS @ affine[:3, 3]), tuple(direction.ravel())


def to_itk(array: np.ndarray, affine: np.ndarray):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    spacing, origin, direction = lps_geometry(affine)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def permuted(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored another way: Y[a, b, c] = X[n0 - 1 - b, a, c], with the affine that keeps each
    voxel's position."""
    n0 = array.shape[0]
    swap = np.array([[0, -1, 0, n0 - 1], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return np.ascontiguousarray(array[::-1].transpose(1, 0, 2)), affine @ swap


def write_dicom(image, folder: Path) -> None:
    """A DICOM series of `image` (int16), one file per slice, as SimpleITK's own example writes one."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    tags = [("0008|0060", "MR"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.4242"),
            ("0020|0037", "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
            ("0008|103e", "segkit test series")]
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in tags:
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        plane.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(plane)


def test_the_affine_of_an_oblique_itk_geometry_is_simpleitks_own_transform():
    """`itk_affine` against SimpleITK's TransformIndexToPhysicalPoint (LPS, x and y negated) on a rotated,
    anisotropic grid: the RAS affine nibabel would give."""
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image = sitk.Image([5, 6, 7], sitk.sitkInt16)
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetOrigin((-12.5, 40.0, 7.25))
    image.SetDirection(tuple(rotation[[2, 0, 1]].ravel()))
    affine = itk_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    for index in [(0, 0, 0), (4, 0, 0), (0, 5, 0), (0, 0, 6), (4, 5, 6), (2, 3, 1)]:
        point = LPS @ np.array(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(affine @ [*index, 1], [*point, 1], atol=1e-9)


@pytest.fixture(scope="module")
def case_files(tmp_path_factory) -> dict[str, Path]:
    """The case as NIfTI (as stored) and permuted as NRRD, MHA and a DICOM series, each in its own folder."""
    base = tmp_path_factory.mktemp("formats")
    image, _, affine = volumedata.thick_volume(CASE, crop=volumedata.CROP)
    image = np.round(image).astype(np.int16)  # DICOM stores integers; the same values in every file
    files = {"nifti": volumedata.save_nifti(image, affine, base / "nifti" / f"{CASE}_0000.nii.gz")}
    other, other_affine = permuted(image, affine)
    for name, end in (("nrrd", ".nrrd"), ("mha", ".mha")):
        (base / name).mkdir()
        files[name] = base / name / f"{CASE}_0000{end}"
        sitk.WriteImage(to_itk(other, other_affine), str(files[name]), useCompression=True)
    files["dicom"] = base / "dicom" / CASE  # a series folder per case
    write_dicom(to_itk(other, other_affine), files["dicom"])
    return files


@pytest.mark.parametrize("kind", ["nrrd", "mha", "dicom"])
def test_every_format_reads_as_the_same_canonical_volume(case_files, kind):
    """Reoriented to RAS, the permuted file gives the NIfTI's voxels, shape and spacing exactly."""
    reference = Volume(CASE, [case_files["nifti"]])
    volume = Volume(CASE, [case_files[kind]])
    assert volume.shape == reference.shape
    np.testing.assert_allclose(volume.spacing, reference.spacing, rtol=1e-6)
    np.testing.assert_array_equal(volume.data, reference.data)


@pytest.mark.parametrize("kind,written", [("nrrd", ".nrrd"), ("mha", ".mha"), ("dicom", ".nii.gz")])
def test_predictions_land_on_the_input_grid_in_its_format(cli, tmp_path, tmp_path_factory, case_files, kind, written):
    """`segkit predict` on each file: the masks are the NIfTI input's masks (the same voxels, stored the same
    permuted way), written in the input's format on its exact grid."""
    ckpt = volumedata.region_content(tmp_path_factory)
    outs = {}
    for name in ("nifti", kind):
        outs[name] = tmp_path / name
        result = cli("predict", ckpt, case_files[name].parent, outs[name], "--device", "cpu", "--no-progress")
        assert result.code == 0, result.err
    for part in ("whole", "core", None):
        rel = Path(part or ".") / CASE
        expected = np.asanyarray(nib.load(outs["nifti"] / rel.with_name(rel.name + ".nii.gz")).dataobj)
        assert 0.02 < (expected > 0).mean() < 0.9  # the masks have content: the comparison can fail
        path = outs[kind] / rel.with_name(rel.name + written)
        assert path.is_file(), sorted(p.name for p in outs[kind].rglob("*"))
        if kind == "dicom":
            out = nib.load(path)
            series = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(case_files["dicom"])))
            for index in [(0, 0, 0), (31, 0, 0), (0, 31, 0), (0, 0, out.shape[2] - 1), (7, 20, 3)]:
                point = LPS @ np.array(series.TransformIndexToPhysicalPoint(index))
                np.testing.assert_allclose(out.affine @ [*index, 1], [*point, 1], atol=1e-4)
            got = np.asanyarray(out.dataobj)
        else:
            out, source = sitk.ReadImage(str(path)), sitk.ReadImage(str(case_files[kind]))
            assert out.GetSize() == source.GetSize()
            np.testing.assert_allclose(out.GetSpacing(), source.GetSpacing(), rtol=1e-12)
            np.testing.assert_allclose(out.GetOrigin(), source.GetOrigin(), atol=1e-9)
            np.testing.assert_allclose(out.GetDirection(), source.GetDirection(), atol=1e-12)
            got = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
        np.testing.assert_array_equal(got, permuted(expected, np.eye(4))[0])


def test_a_header_declaring_more_voxels_than_its_file_holds_is_refused(tmp_path):
    """A 1 KB MetaImage whose header declares 4000^3 voxels: refused from its header, naming the file, before
    64 GB are asked for (even compressed, zlib cannot hold 1032 times its size)."""
    path = tmp_path / "huge.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\nElementType = MET_UCHAR\n"
                     b"CompressedData = True\nElementDataFile = LOCAL\n" + bytes(1000))
    with pytest.raises(UnreadableError, match=r"huge\.mha.*4000x4000x4000"):
        Volume("huge", [path])


def test_without_simpleitk_the_error_names_the_extra(case_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    with pytest.raises(DataError, match=r"segkit\[itk\]"):
        Volume(CASE, [case_files["nrrd"]])
