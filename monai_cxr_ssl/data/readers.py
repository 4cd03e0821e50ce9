"""Read chest radiographs from PNG/JPEG, DICOM and NIfTI files as one grey float image in [0, 1].

Every format ends up in the same convention (float32, rows x columns, fixed range, bone bright), so the rest of
the pipeline never needs to know where an image came from, and a scanner's export settings cannot shift the
intensities a model sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from PIL import Image, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = ["ImageReadError", "read_cxr", "dicom_to_image", "check_image", "LoadCXRImage", "LoadCXRImaged"]

_PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_FORMAT_NAMES = {"pillow": "PNG/JPEG", "dicom": "DICOM", "nifti": "NIfTI"}

# Pillow modes read as they are, with the largest value of their integer type; every other mode (RGB, RGBA,
# LA, P, ...) is converted to "L", which is Pillow's ITU-R 601-2 luminance and drops alpha.
_PILLOW_MAX = {"1": 1, "L": 255, "I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}
# A DICOM file without the Part-10 header carries no transfer syntax; pydicom's guess while parsing names it.
_NATIVE_SYNTAX = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_CORRUPT_HINT = "Re-export the image or remove it from the dataset (check_image finds all such files)"


class ImageReadError(ValueError):
    """An image file is missing, corrupt, or not a single 2D radiograph."""


def _error(path: Path, problem: str, hint: str = _CORRUPT_HINT) -> ImageReadError:
    return ImageReadError(f"Cannot read image '{path}': {problem}. {hint}.")


def _detect_format(path: Path) -> str:
    """Name the reader for ``path``: by suffix, else by content (DICOM magic, then Pillow, then DICOM by force)."""
    if not path.is_file():
        raise _error(path, "the file does not exist", "Check the path and the dataset folder")
    name = path.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(_PILLOW_SUFFIXES):
        return "pillow"
    if name.endswith(_DICOM_SUFFIXES):
        return "dicom"
    with open(path, "rb") as f:
        if f.read(132)[128:] == b"DICM":
            return "dicom"
    try:
        with Image.open(path):
            return "pillow"
    except UnidentifiedImageError:
        return "dicom"  # last resort: pydicom's forced read rejects what holds no pixel data


def _to_unit(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` to 0 and ``high`` to 1 linearly as float32, clipping values beyond them."""
    if high == low:
        return np.zeros(arr.shape, dtype=np.float32)
    out = (arr.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def _read_pillow(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in _PILLOW_MAX:
            im = im.convert("L")
        return _to_unit(np.asarray(im), 0, _PILLOW_MAX[im.mode])


def _check_dicom_header(ds: pydicom.Dataset, path: Path) -> None:
    """Raise unless ``ds`` holds exactly one 2D frame in a photometric interpretation that can be read."""
    if "PixelData" not in ds:
        raise _error(
            path,
            "the file has no complete DICOM pixel data (truncated, not DICOM, or an object such as a report)",
            "Re-export it, or remove it from the dataset",
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise _error(path, "the DICOM header has no Rows/Columns")
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise _error(
            path,
            f"the DICOM file holds {int(ds.NumberOfFrames)} frames, not one 2D radiograph",
            "Split it into single-frame files",
        )
    photometric = ds.get("PhotometricInterpretation", "MONOCHROME2")
    if not (photometric.startswith("MONOCHROME") or ds.get("SamplesPerPixel", 1) == 3):
        raise _error(
            path,
            f"photometric interpretation {photometric} is not supported",
            "Convert the image to MONOCHROME2 or RGB",
        )


def _transfer_syntax(ds: pydicom.FileDataset) -> UID:
    """Return the transfer syntax, filling it in from the parsed encoding when the Part-10 header is missing."""
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = _NATIVE_SYNTAX[ds.original_encoding]
    return ds.file_meta.TransferSyntaxUID


def _voi_transform(ds: pydicom.Dataset) -> Callable[[np.ndarray, pydicom.Dataset], np.ndarray] | None:
    """Pick the VOI step as ``pydicom.pixels.apply_voi_lut`` does: a VOI LUT Sequence wins over a window."""
    lut = ds.get("VOILUTSequence")
    if lut and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]:
        return apply_voi
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return apply_windowing
    return None


def _monochrome_to_unit(raw: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Apply the modality LUT and the VOI LUT/window, then scale the output range of the last step to [0, 1]."""
    arr = apply_modality_lut(raw, ds)
    voi = _voi_transform(ds)
    if voi is apply_voi:
        entries, first = ds.VOILUTSequence[0].LUTDescriptor[:2]
        outputs = apply_voi(np.arange(first, first + (entries or 2**16)), ds)  # every value the LUT can give
        low, high = outputs.min(), outputs.max()
    elif voi is apply_windowing:
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)  # the window maps +-inf to its output bounds
    else:
        bits = int(ds.BitsStored)
        stored = [0, 2**bits - 1] if ds.PixelRepresentation == 0 else [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]
        outputs = apply_modality_lut(np.array(stored), ds)
        low, high = outputs.min(), outputs.max()
        if high == low:
            low, high = arr.min(), arr.max()
    if voi is not None:
        arr = voi(arr, ds)
    return _to_unit(arr, low, high)


def dicom_to_image(ds: pydicom.Dataset, source: str | os.PathLike) -> np.ndarray:
    """The float32 ``(H, W)`` image in [0, 1] of a DICOM dataset already in memory, as ``read_cxr`` reads files.

    For callers that receive parsed datasets (the MONAI Deploy app's DICOM loader), so that they see exactly the
    bundle's intensities; ``source`` names the file in errors.

    Raises:
        ImageReadError: no pixel data, several frames, an unsupported photometric interpretation, or pixel data
            that does not decode.
    """
    path = Path(source)
    _check_dicom_header(ds, path)
    _transfer_syntax(ds)
    try:
        raw = ds.pixel_array
    except Exception as err:  # decoders fail in many ways; all mean this file cannot be used
        raise _error(path, f"the DICOM pixel data does not decode ({type(err).__name__}: {err})") from err
    if raw.ndim == 3:  # colour, which pydicom has already converted to RGB
        return _to_unit(raw[..., :3] @ _LUMA, 0, 2 ** int(ds.BitsStored) - 1)
    unit = _monochrome_to_unit(raw, ds)
    return 1.0 - unit if ds.PhotometricInterpretation == "MONOCHROME1" else unit


def _read_dicom(path: Path) -> np.ndarray:
    return dicom_to_image(pydicom.dcmread(path, force=True), path)


def _check_nifti_shape(shape: tuple[int, ...], path: Path) -> None:
    if len(shape) < 2 or any(size != 1 for size in shape[2:]):
        raise _error(
            path,
            f"the NIfTI file is a 3D volume of shape {tuple(shape)}",
            "Only 2D radiographs are supported; save the projection as a 2D image",
        )


def _read_nifti(path: Path) -> np.ndarray:
    img = nib.load(path)
    _check_nifti_shape(img.shape, path)
    data = img.get_fdata(dtype=np.float32).reshape(img.shape[:2]).T  # nibabel's (X, Y) -> (rows, columns)
    return _to_unit(data, data.min(), data.max())


_READERS = {"pillow": _read_pillow, "dicom": _read_dicom, "nifti": _read_nifti}


def read_cxr(path: str | os.PathLike) -> np.ndarray:
    """Read a chest radiograph as float32 ``(H, W)`` in [0, 1], bone bright.

    PNG/JPEG integers are divided by their type's maximum and colour becomes luminance. DICOM goes through the
    modality LUT and the VOI LUT/window, is scaled by that output range (or the range of the stored bits) and
    MONOCHROME1 is inverted. NIfTI (2D, or 3D with one slice) is min/max scaled, rows along nibabel's Y axis.

    Raises:
        ImageReadError: when the file is missing, corrupt, multi-frame, a 3D volume or holds no image.
    """
    path = Path(path)
    fmt = _detect_format(path)
    try:
        return _READERS[fmt](path)
    except ImageReadError:
        raise
    except Exception as err:  # decoders fail in many ways; all mean this file cannot be used
        raise _error(path, f"not a readable {_FORMAT_NAMES[fmt]} image ({type(err).__name__})") from err


def _check_pillow(path: Path) -> None:
    with Image.open(path) as im:
        if im.format == "JPEG":
            # A reduced-scale decode still walks the whole entropy-coded stream, so a truncated file shows.
            im.draft("L", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        else:
            im.verify()


def _check_dicom(path: Path) -> None:
    ds = pydicom.dcmread(path, force=True, defer_size=1024)  # parses the header; the pixel data stays on disk
    _check_dicom_header(ds, path)
    syntax = _transfer_syntax(ds)
    if not get_decoder(syntax).is_available:
        raise _error(
            path,
            f"no installed decoder handles the transfer syntax {syntax.name}",
            "Install the pydicom plugin for it (e.g. pylibjpeg-openjpeg) or decompress the file",
        )
    pixels = ds.get_item("PixelData", keep_deferred=True)
    if not syntax.is_encapsulated and pixels.value_tell + pixels.length > path.stat().st_size:
        raise _error(path, "the DICOM pixel data is truncated")


def _check_nifti(path: Path) -> None:
    img = nib.load(path)  # reads the header only
    _check_nifti_shape(img.shape, path)
    if not path.name.lower().endswith(".gz"):
        expected = int(img.header.get_data_offset()) + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
        if path.stat().st_size < expected:
            raise _error(path, "the NIfTI voxel data is truncated")


_CHECKS = {"pillow": _check_pillow, "dicom": _check_dicom, "nifti": _check_nifti}


def check_image(path: str | os.PathLike) -> None:
    """Validate that ``read_cxr`` can read ``path``, decoding as little as possible (run over whole datasets).

    Raises:
        ImageReadError: when the file is missing, corrupt, truncated, multi-frame, a 3D volume or holds no image.
    """
    path = Path(path)
    fmt = _detect_format(path)
    try:
        _CHECKS[fmt](path)
    except ImageReadError:
        raise
    except Exception as err:  # as in read_cxr: any parser failure means the file is unusable
        raise _error(path, f"not a valid {_FORMAT_NAMES[fmt]} image ({type(err).__name__})") from err


class LoadCXRImage(Transform):
    """Load a chest radiograph from a path as a float32 tensor ``(1, H, W)`` in [0, 1] (see ``read_cxr``)."""

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        return torch.from_numpy(read_cxr(path)).unsqueeze(0)


class LoadCXRImaged(MapTransform):
    """Dictionary version of ``LoadCXRImage``: replaces the paths under ``keys`` with image tensors."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadCXRImage()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
