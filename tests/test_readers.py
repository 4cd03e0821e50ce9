"""Tests for monai_cxr_ssl.data.readers: every format reads to the same float32 [0, 1] grey image."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import shared_path
from monai.bundle import ConfigParser
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, RLELossless, generate_uid

from monai_cxr_ssl.data.readers import ImageReadError, LoadCXRImaged, check_image, read_cxr

GREY = np.arange(256, dtype=np.uint8).reshape(16, 16)  # spans 0..255, so min/max and fixed scaling agree
STORED = np.linspace(100, 3000, 12 * 8).round().astype(np.uint16).reshape(12, 8)  # 12-bit, not full range


def _robust(arr: np.ndarray) -> np.ndarray:
    """The documented window of images with more than 8 bits and none of their own: 0.5th-99.5th percentiles."""
    low, high = np.percentile(arr.astype(np.float64), [0.5, 99.5])
    return np.clip((arr - low) / (high - low), 0.0, 1.0)


ROBUST = _robust(STORED)


def _save_png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def _dicom(pixels: np.ndarray = STORED, photometric: str = "MONOCHROME2", bits: int = 12, **elements) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits)
    for name, value in elements.items():
        setattr(ds, name, value)
    return ds


def _save_dcm(path: Path, ds: Dataset) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _save_headerless(path: Path, ds: Dataset, implicit_vr: bool = True) -> Path:
    del ds.file_meta
    ds.preamble = None
    ds.save_as(path, enforce_file_format=False, implicit_vr=implicit_vr, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    return path


def _assert_unit_image(image: np.ndarray, shape: tuple[int, int]) -> None:
    assert image.shape == shape
    assert image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0


# ---------------------------------------------------------------- PNG / JPEG


def test_png_8bit_is_divided_by_255(tmp_path):
    image = read_cxr(_save_png(tmp_path / "a.png", GREY))
    _assert_unit_image(image, GREY.shape)
    np.testing.assert_allclose(image, GREY / 255.0, atol=1e-7)


def test_png_16bit_is_divided_by_65535(tmp_path):
    image = read_cxr(_save_png(tmp_path / "a.png", np.array([[0, 32768, 65535]], dtype=np.uint16)))
    _assert_unit_image(image, (1, 3))
    np.testing.assert_allclose(image, [[0.0, 32768 / 65535, 1.0]], atol=1e-7)


@pytest.mark.parametrize("mode", ["LA", "RGB", "RGBA", "P"])
def test_colour_and_alpha_png_equal_the_grey_one(tmp_path, mode):
    grey = Image.fromarray(GREY)
    converted = grey.convert(mode)
    if "A" in mode:
        converted.putalpha(Image.fromarray(np.random.default_rng(0).integers(0, 256, GREY.shape, dtype=np.uint8)))
    converted.save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_cxr(tmp_path / "a.png"), read_cxr(_save_png(tmp_path / "g.png", GREY)))


def test_colour_png_uses_luminance(tmp_path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[..., 1] = 255  # pure green has ITU-R 601 luminance 0.587
    np.testing.assert_allclose(read_cxr(_save_png(tmp_path / "g.png", rgb)), 150 / 255, atol=1e-6)


def test_jpeg_is_close_to_its_source(tmp_path):
    smooth = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8) * 2
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    image = read_cxr(tmp_path / "a.jpg")
    _assert_unit_image(image, smooth.shape)
    assert np.abs(image - smooth / 255.0).mean() < 0.01


def test_format_is_detected_from_content_without_suffix(tmp_path):
    Image.fromarray(GREY).save(tmp_path / "png_image", format="PNG")
    _save_dcm(tmp_path / "dicom_image", _dicom())
    np.testing.assert_allclose(read_cxr(tmp_path / "png_image"), GREY / 255.0, atol=1e-7)
    np.testing.assert_allclose(read_cxr(tmp_path / "dicom_image"), ROBUST, atol=1e-6)


# ---------------------------------------------------------------- DICOM built from scratch


def test_dicom_12bit_without_window_uses_the_robust_window(tmp_path):
    image = read_cxr(_save_dcm(tmp_path / "a.dcm", _dicom()))
    _assert_unit_image(image, STORED.shape)
    np.testing.assert_allclose(image, ROBUST, atol=1e-6)


@pytest.mark.parametrize("signed", [False, True])
def test_dicom_16bit_without_window_is_not_flat_grey(tmp_path, signed):
    """A 16-bit image using a small part of its range used to read as 0.465-0.537 grey: now it spans [0, 1]."""
    values = np.linspace(-1200 if signed else 1000, 2000, 32 * 32).reshape(32, 32)
    pixels = values.round().astype(np.int16 if signed else np.uint16)
    image = read_cxr(_save_dcm(tmp_path / "a.dcm", _dicom(pixels, bits=16)))
    np.testing.assert_allclose(image, _robust(pixels), atol=1e-6)
    assert image.min() == 0.0 and image.max() == 1.0 and np.percentile(image, 99) - np.percentile(image, 1) > 0.9


def test_dicom_monochrome1_is_inverted(tmp_path):
    image = read_cxr(_save_dcm(tmp_path / "a.dcm", _dicom(photometric="MONOCHROME1")))
    np.testing.assert_allclose(image, 1.0 - ROBUST, atol=1e-6)


def test_dicom_rescale_does_not_change_the_robust_window(tmp_path):
    ds = _dicom(RescaleSlope=2, RescaleIntercept=-1024)
    np.testing.assert_allclose(read_cxr(_save_dcm(tmp_path / "a.dcm", ds)), ROBUST, atol=1e-6)


def test_dicom_window_saturates_outside_and_stretches_inside(tmp_path):
    image = read_cxr(_save_dcm(tmp_path / "a.dcm", _dicom(WindowCenter=1500, WindowWidth=1000)))
    expected = np.clip((STORED - 1499.5) / 999.0 + 0.5, 0.0, 1.0)  # DICOM LINEAR window, output 0..4095
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert (image[STORED <= 1000] == 0.0).all() and (image[STORED > 2000] == 1.0).all()
    assert ((image > 0) & (image < 1)).sum() > 10


def test_dicom_voi_lut_sequence_is_applied(tmp_path):
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new("LUTData", "US", (np.sqrt(np.arange(4096) / 4095.0) * 4095).round().astype(int).tolist())
    image = read_cxr(_save_dcm(tmp_path / "a.dcm", _dicom(VOILUTSequence=[item])))
    np.testing.assert_allclose(image, np.sqrt(STORED / 4095.0), atol=2e-4)


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_dicom_without_part10_header_reads_identically(tmp_path, implicit_vr):
    path = _save_headerless(tmp_path / "a.dcm", _dicom(), implicit_vr)
    np.testing.assert_array_equal(read_cxr(path), read_cxr(_save_dcm(tmp_path / "b.dcm", _dicom())))
    check_image(path)
    np.testing.assert_array_equal(read_cxr(path.rename(tmp_path / "no_suffix")), read_cxr(tmp_path / "b.dcm"))


def test_dicom_compressed_transfer_syntax(tmp_path):
    ds = _dicom()
    ds.compress(RLELossless)
    path = _save_dcm(tmp_path / "a.dcm", ds)
    check_image(path)
    np.testing.assert_allclose(read_cxr(path), ROBUST, atol=1e-6)


def test_dicom_rgb_uses_luminance(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red has ITU-R 601 luminance 0.299
    np.testing.assert_allclose(read_cxr(_save_dcm(tmp_path / "a.dcm", _dicom(rgb, "RGB", 8))), 0.299, atol=1e-6)


def test_dicom_multiframe_raises(tmp_path):
    path = _save_dcm(tmp_path / "multi.dcm", _dicom(np.stack([STORED] * 3)))
    for func in (read_cxr, check_image):
        with pytest.raises(ImageReadError, match=r"multi\.dcm.*3 frames"):
            func(path)


def test_dicom_without_pixel_data_raises(tmp_path):
    ds = _dicom()
    del ds.PixelData
    path = _save_dcm(tmp_path / "report.dcm", ds)
    for func in (read_cxr, check_image):
        with pytest.raises(ImageReadError, match=r"report\.dcm.*no complete DICOM pixel data"):
            func(path)


def test_corrupt_and_missing_files_raise_with_the_path(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for name in ("noise.dcm", "noise.png", "noise.jpg", "noise.nii", "noise"):
        (tmp_path / name).write_bytes(noise)
        with pytest.raises(ImageReadError, match=str(tmp_path / name)):
            read_cxr(tmp_path / name)
    with pytest.raises(ImageReadError, match="does not exist"):
        read_cxr(tmp_path / "missing.png")
    with pytest.raises(ImageReadError) as info:
        read_cxr(tmp_path / "noise.png")
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("modality", ["MR", "CT", "US", "PX"])
def test_dicom_of_another_modality_is_refused_by_read_and_check(tmp_path, modality):
    path = _save_dcm(tmp_path / "scan.dcm", _dicom(Modality=modality))
    for func in (read_cxr, check_image):
        with pytest.raises(ImageReadError, match=rf"scan\.dcm': the DICOM modality is {modality}, not a projection"):
            func(path)


@pytest.mark.parametrize("modality", ["CR", "DX", "DR", "OT", None])
def test_dicom_radiograph_modalities_are_read(tmp_path, modality):
    ds = _dicom()
    if modality is None:
        del ds.Modality
    else:
        ds.Modality = modality
    check_image(_save_dcm(tmp_path / "a.dcm", ds))
    np.testing.assert_allclose(read_cxr(tmp_path / "a.dcm"), ROBUST, atol=1e-6)


def test_deflated_dicom_passes_check_and_reads(tmp_path):
    ds = _dicom()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    path = _save_dcm(tmp_path / "deflated.dcm", ds)
    check_image(path)
    np.testing.assert_allclose(read_cxr(path), ROBUST, atol=1e-6)


def test_window_width_below_one_names_the_cause(tmp_path):
    path = _save_dcm(tmp_path / "rt.dcm", _dicom(WindowCenter=1500, WindowWidth=0.5))
    for func in (read_cxr, check_image):
        with pytest.raises(ImageReadError, match=r"rt\.dcm': the DICOM Window Width is 0.5, below 1"):
            func(path)


def test_decode_errors_carry_the_decoder_message(tmp_path):
    ds = _dicom()
    ds.PixelData = ds.PixelData[:-32]  # pixel data shorter than Rows x Columns need
    path = _save_dcm(tmp_path / "short.dcm", ds)
    for func in (read_cxr, check_image):
        with pytest.raises(ImageReadError, match=r"short\.dcm': the DICOM pixel data does not decode \(ValueError: "
                           r"The number of bytes of pixel data is less than expected"):
            func(path)


def test_check_image_fails_exactly_when_read_cxr_does(tmp_path):
    """One code path: for good and bad files of every format, check and read agree, with the same message."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    mr = _save_dcm(tmp_path / "mr.dcm", _dicom(Modality="MR"))
    frames = _save_dcm(tmp_path / "frames.dcm", _dicom(np.stack([STORED] * 2)))
    (tmp_path / "junk.png").write_bytes(b"\x89PNG" + bytes(100))
    paths = [tmp_path / "full.jpg", tmp_path / "cut.jpg", mr, frames, tmp_path / "junk.png", tmp_path / "missing.dcm",
             _save_dcm(tmp_path / "ok.dcm", _dicom()), _save_headerless(tmp_path / "raw", _dicom())]
    for path in paths:
        outcomes = []
        for func in (read_cxr, check_image):
            try:
                func(path)
                outcomes.append(None)
            except ImageReadError as err:
                outcomes.append(str(err))
        assert outcomes[0] == outcomes[1], path


def test_is_dicom_and_inference_datalist_detect_dicom_by_content(tmp_path, caplog):
    from monai_cxr_ssl.data import inference_datalist, is_dicom

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    _save_dcm(data / "sub" / "IM0001", _dicom())  # Part-10 file without suffix, as PACS exports name them
    _save_headerless(data / "raw_no_header", _dicom())  # no preamble, no suffix
    _save_png(data / "a.png", GREY)
    (data / "notes.txt").write_text("not an image")
    (data / ".DS_Store").write_bytes(b"\x00" * 64)
    assert is_dicom(data / "sub" / "IM0001") and is_dicom(data / "raw_no_header")
    assert not is_dicom(data / "notes.txt") and not is_dicom(data / "a.png")
    with caplog.at_level("WARNING", logger="monai_cxr_ssl"):
        items = inference_datalist(data)
    assert [it["id"] for it in items] == ["a.png", "raw_no_header", "sub/IM0001"]
    np.testing.assert_array_equal(read_cxr(items[1]["image"]), read_cxr(items[2]["image"]))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "skips 2 file(s)" in warning and "notes.txt (no image suffix and not DICOM" in warning
    assert ".DS_Store (hidden)" in warning
    with pytest.raises(FileNotFoundError, match="missing: the inference dataset_dir does not exist"):
        inference_datalist(tmp_path / "missing")


# ---------------------------------------------------------------- NIfTI


def test_nifti_2d_and_singleton_3d_match_the_png(tmp_path):
    grey = np.add.outer(np.arange(12), np.arange(20) * 10).astype(np.uint8)  # not square, spans 0..201
    grey[0, 0], grey[-1, -1] = 0, 255
    png = read_cxr(_save_png(tmp_path / "a.png", grey))
    nib.save(nib.Nifti1Image(np.asarray(Image.open(tmp_path / "a.png")).T, np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(grey.T[..., None], np.eye(4)), tmp_path / "b.nii")
    for name in ("a.nii.gz", "b.nii"):
        check_image(tmp_path / name)
        np.testing.assert_allclose(read_cxr(tmp_path / name), png, atol=1e-6)


def test_nifti_volume_raises(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 6, 3), dtype=np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    for func in (read_cxr, check_image):
        with pytest.raises(ImageReadError, match=r"vol\.nii\.gz.*3D volume of shape \(8, 6, 3\)"):
            func(tmp_path / "vol.nii.gz")


# ---------------------------------------------------------------- check_image


def test_check_image_passes_good_files(tmp_path):
    smooth = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "a.jpg")
    for path in (_save_png(tmp_path / "a.png", GREY), tmp_path / "a.jpg", _save_dcm(tmp_path / "a.dcm", _dicom())):
        assert check_image(path) is None


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg", "cut.dcm"])
def test_check_image_rejects_truncated_files(tmp_path, name):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    if name.endswith(".dcm"):
        _save_dcm(tmp_path / "full", _dicom(noise, bits=8))
    else:
        Image.fromarray(noise).save(tmp_path / "full", format="PNG" if name.endswith(".png") else "JPEG")
    data = (tmp_path / "full").read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match=name):
        check_image(tmp_path / name)


def test_check_image_rejects_random_bytes_dicom(tmp_path):
    (tmp_path / "noise.dcm").write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match="noise.dcm"):
        check_image(tmp_path / "noise.dcm")


# ---------------------------------------------------------------- MONAI transforms


def test_load_cxr_imaged_from_a_bundle_config(tmp_path):
    path = _save_png(tmp_path / "a.png", GREY)
    parser = ConfigParser({"load": {"_target_": "monai_cxr_ssl.data.readers.LoadCXRImaged", "keys": "image"}})
    out = parser.get_parsed_content("load")({"image": str(path), "label": 1})
    assert out["label"] == 1
    assert out["image"].shape == (1, *GREY.shape) and out["image"].dtype == torch.float32
    np.testing.assert_allclose(out["image"][0].numpy(), GREY / 255.0, atol=1e-7)
    with pytest.raises(KeyError):
        LoadCXRImaged(keys="image")({"label": 1})
    assert LoadCXRImaged(keys="image", allow_missing_keys=True)({"label": 1}) == {"label": 1}


# ---------------------------------------------------------------- real data


REAL_DICOMS = ["nih_cxr_dx_uncompressed.dcm", "siim_cxr_cr_jpeg_baseline.dcm"]


@pytest.mark.realdata
@pytest.mark.parametrize("name", REAL_DICOMS)
def test_real_dicom_reads(name):
    path = shared_path("dicom", name)
    check_image(path)
    image = read_cxr(path)
    _assert_unit_image(image, (1024, 1024))
    assert image.std() > 0.05
    np.testing.assert_allclose(image, pydicom.dcmread(path).pixel_array / 255.0, atol=1e-6)  # 8-bit, no window


@pytest.mark.realdata
@pytest.mark.parametrize("name", REAL_DICOMS)
def test_real_dicom_variants(tmp_path, name):
    path = shared_path("dicom", name)
    base = read_cxr(path)

    def variant(**elements) -> Dataset:
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        for key, value in elements.items():
            setattr(ds, key, value)
        return ds

    inverted = read_cxr(_save_dcm(tmp_path / "mono1.dcm", variant(PhotometricInterpretation="MONOCHROME1")))
    np.testing.assert_allclose(inverted, 1.0 - base, atol=1e-6)

    ds = variant()
    twelve = np.round(ds.pixel_array * (4095 / 255)).astype(np.uint16)
    ds.set_pixel_data(twelve, "MONOCHROME2", 12)
    np.testing.assert_allclose(read_cxr(_save_dcm(tmp_path / "12bit.dcm", ds)), _robust(twelve), atol=1e-5)

    headerless = _save_headerless(tmp_path / "raw.dcm", variant())
    np.testing.assert_array_equal(read_cxr(headerless), base)

    windowed = read_cxr(_save_dcm(tmp_path / "window.dcm", variant(WindowCenter=128, WindowWidth=64)))
    raw = base * 255.0
    np.testing.assert_allclose(windowed, np.clip((raw - 127.5) / 63.0 + 0.5, 0.0, 1.0), atol=1e-5)
    assert (windowed[raw <= 96] == 0).all() and (windowed[raw > 160] == 1).all()


@pytest.mark.realdata
def test_real_kermany_jpeg():
    path = shared_path("kermany_pneumonia", "test", "NORMAL", "IM-0001-0001.jpeg")
    check_image(path)
    image = read_cxr(path)
    _assert_unit_image(image, (224, 224))
    assert image.std() > 0.05
    np.testing.assert_allclose(image, np.asarray(Image.open(path))[..., 0] / 255.0, atol=2 / 255)
