"""Read chest radiographs from PNG/JPEG, DICOM and NIfTI files as one grey float image in [0, 1].

Every format ends up in the same convention (float32, rows x columns, fixed range, bone bright), so the rest of
the pipeline never needs to know where an image came from, and a scanner's export settings cannot shift the
intensities a model sees.
"""

from __future__ import annotations

import logging
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
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = [
    "ACCEPTED_MODALITIES",
    "ImageReadError",
    "read_cxr",
    "read_dicom_dataset",
    "dicom_to_image",
    "check_image",
    "is_dicom",
    "inference_datalist",
    "scan_images",
    "LoadCXRImage",
    "LoadCXRImaged",
]

logger = logging.getLogger("monai_cxr_ssl")

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
# Modalities that are projection radiographs (or say nothing): CR, DX, the non-standard DR, the retired RG, and
# OT (secondary capture, as many converted chest X-rays are). A file without Modality is accepted too.
ACCEPTED_MODALITIES = ("CR", "DX", "DR", "RG", "OT")
# Robust window of images with more than 8 stored bits and no VOI LUT/window: these pixel-value percentiles.
ROBUST_WINDOW_PERCENTILES = (0.5, 99.5)
_CORRUPT_HINT = "Re-export the image or remove it from the dataset (check_image finds all such files)"


class ImageReadError(ValueError):
    """An image file is missing, corrupt, or not a single 2D radiograph; ``problem`` is the cause alone."""

    def __init__(self, message: str, problem: str = "") -> None:
        super().__init__(message)
        self.problem = problem or message


def _error(path: Path, problem: str, hint: str = _CORRUPT_HINT) -> ImageReadError:
    return ImageReadError(f"Cannot read image '{path}': {problem}. {hint}.", problem)


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
    if _has_preamble(path):
        return "dicom"
    try:
        with Image.open(path):
            return "pillow"
    except UnidentifiedImageError:
        return "dicom"  # last resort: pydicom's forced read rejects what holds no pixel data


def _has_preamble(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file by content: the Part-10 preamble, or a forced read that finds pixel data
    (a file written without the header). The suffix plays no part."""
    path = Path(path)
    if not path.is_file():
        return False
    if _has_preamble(path):
        return True
    try:
        return "PixelData" in pydicom.dcmread(path, force=True, defer_size=1024)
    except Exception:  # a forced parse of a foreign file fails in many ways: it is not DICOM
        return False


def _to_unit(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` to 0 and ``high`` to 1 linearly as float32, clipping values beyond them."""
    if high == low:
        return np.zeros(arr.shape, dtype=np.float32)
    out = (arr.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def _read_pillow(path: Path, check: bool = False) -> np.ndarray:
    """The Pillow image in [0, 1]; ``check`` decodes a JPEG at 1/8 scale only, which still walks the whole
    entropy-coded stream, so a truncated file fails as in a full read."""
    with Image.open(path) as im:
        if check and im.format == "JPEG":
            im.draft("L", (max(1, im.width // 8), max(1, im.height // 8)))
        if im.mode not in _PILLOW_MAX:
            im = im.convert("L")
        return _to_unit(np.asarray(im), 0, _PILLOW_MAX[im.mode])


def _check_dicom_header(ds: pydicom.Dataset, path: Path) -> None:
    """Raise unless ``ds`` is a radiograph (``ACCEPTED_MODALITIES`` or no Modality) holding exactly one 2D frame in a
    photometric interpretation that can be read, with a valid window when it has one."""
    modality = str(ds.get("Modality") or "").strip().upper()
    if modality and modality not in ACCEPTED_MODALITIES:
        raise _error(
            path,
            f"the DICOM modality is {modality}, not a projection radiograph",
            f"Only {', '.join(ACCEPTED_MODALITIES)} (or no Modality) are read; remove the file from the dataset",
        )
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
    if _voi_transform(ds) is apply_windowing and str(ds.get("VOILUTFunction", "LINEAR")).upper().startswith("LINEAR"):
        width = ds.WindowWidth
        width = float(width[0] if isinstance(width, MultiValue) else width)  # pydicom windows with the first one
        if width < 1:
            raise _error(
                path,
                f"the DICOM Window Width is {width:g}, below 1 (a LINEAR window needs a width of at least 1)",
                "Fix or remove WindowCenter/WindowWidth in the file",
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
    elif int(ds.BitsStored) > 8:  # no window: a robust one, since such images rarely fill their stored range
        low, high = np.percentile(arr, ROBUST_WINDOW_PERCENTILES)
        if high == low:
            low, high = arr.min(), arr.max()
    else:  # 8 bits are display-ready, as PNG/JPEG images are: the range of the stored bits
        stored = [0, 255] if ds.PixelRepresentation == 0 else [-128, 127]
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
        raise _error(path, f"the DICOM pixel data does not decode ({_cause(err)})") from err
    if raw.ndim == 3:  # colour, which pydicom has already converted to RGB
        return _to_unit(raw[..., :3] @ _LUMA, 0, 2 ** int(ds.BitsStored) - 1)
    unit = _monochrome_to_unit(raw, ds)
    return 1.0 - unit if ds.PhotometricInterpretation == "MONOCHROME1" else unit


def read_dicom_dataset(path: str | os.PathLike) -> pydicom.FileDataset:
    """Parse a DICOM file, with or without the Part-10 header (then the transfer syntax is filled in from the
    encoding pydicom detected), so that every caller sees the same dataset."""
    ds = pydicom.dcmread(path, force=True)
    _transfer_syntax(ds)
    return ds


def _read_dicom(path: Path, check: bool = False) -> np.ndarray:
    return dicom_to_image(read_dicom_dataset(path), path)


def _check_nifti_shape(shape: tuple[int, ...], path: Path) -> None:
    if len(shape) < 2 or any(size != 1 for size in shape[2:]):
        raise _error(
            path,
            f"the NIfTI file is a 3D volume of shape {tuple(shape)}",
            "Only 2D radiographs are supported; save the projection as a 2D image",
        )


def _read_nifti(path: Path, check: bool = False) -> np.ndarray:
    img = nib.load(path)
    _check_nifti_shape(img.shape, path)
    data = img.get_fdata(dtype=np.float32).reshape(img.shape[:2]).T  # nibabel's (X, Y) -> (rows, columns)
    return _to_unit(data, data.min(), data.max())


_READERS = {"pillow": _read_pillow, "dicom": _read_dicom, "nifti": _read_nifti}


def _cause(err: BaseException) -> str:
    """``Type: message`` of an exception, so that an error names its cause."""
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _read(path: str | os.PathLike, check: bool) -> np.ndarray:
    path = Path(path)
    fmt = _detect_format(path)
    try:
        return _READERS[fmt](path, check)
    except ImageReadError:
        raise
    except Exception as err:  # decoders fail in many ways; all mean this file cannot be used
        raise _error(path, f"not a readable {_FORMAT_NAMES[fmt]} image ({_cause(err)})") from err


def read_cxr(path: str | os.PathLike) -> np.ndarray:
    """Read a chest radiograph as float32 ``(H, W)`` in [0, 1], bone bright.

    PNG/JPEG integers are divided by their type's maximum and colour becomes luminance. DICOM goes through the
    modality LUT and the VOI LUT/window and is scaled by that output range; without a VOI LUT or window, images of
    more than 8 stored bits get a robust window (the 0.5th to 99.5th percentile of their values, since such files
    rarely fill their stored range), 8-bit ones the range of the stored bits. MONOCHROME1 is inverted. DICOM files
    must be radiographs (Modality in ``ACCEPTED_MODALITIES`` or absent). NIfTI (2D, or 3D with one slice) is
    min/max scaled, rows along nibabel's Y axis.

    Raises:
        ImageReadError: when the file is missing, corrupt, another modality, multi-frame, a 3D volume or holds no
            image; the message names the cause.
    """
    return _read(path, check=False)


def check_image(path: str | os.PathLike) -> None:
    """Validate that ``read_cxr`` can read ``path``: the same code path (header checks and decode), except that a
    JPEG is decoded at 1/8 scale. Run over whole datasets before training.

    Raises:
        ImageReadError: exactly when ``read_cxr`` would.
    """
    _read(path, check=True)


def scan_images(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Every image file under ``folder`` (recursively, sorted) and the other files, each named with why it is not one.

    Images are the files with an image suffix (``find_images``) and DICOM files by content whatever their name (no
    suffix, no Part-10 header). Hidden files and folders, ``DICOMDIR`` (a media index, not an image) and every
    other file are left out. The caller checks that ``folder`` is a folder.
    """
    from monai_cxr_ssl.data.datasets import IMAGE_SUFFIXES

    root = Path(folder)
    images, others = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = os.path.relpath(path, root)
        if any(part.startswith(".") for part in Path(rel).parts):
            others.append(f"{rel} (hidden)")
        elif path.name.upper() == "DICOMDIR":
            others.append(f"{rel} (a DICOMDIR media index, not an image)")
        elif path.name.lower().endswith(IMAGE_SUFFIXES) or is_dicom(path):
            images.append(path)
        else:
            others.append(f"{rel} (no image suffix and not DICOM: no preamble, no pixel data)")
    return images, others


def inference_datalist(folder: str | os.PathLike) -> list[dict]:
    """``{"image", "id"}`` items of every image under ``folder`` (recursively) for inference, as ``scan_images``
    finds them. Every other file is skipped and named in one warning, with the reason.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the inference dataset_dir does not exist; set it to a folder of images.")
    images, skipped = scan_images(root)
    items = [{"image": str(path), "id": os.path.relpath(path, root)} for path in images]
    if skipped:
        logger.warning("inference skips %d file(s) of %s: %s", len(skipped), root, "; ".join(skipped))
    if not items:
        raise ValueError(f"{root}: no images to run inference on (PNG, JPEG, DICOM, NIfTI); check dataset_dir.")
    return items


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
