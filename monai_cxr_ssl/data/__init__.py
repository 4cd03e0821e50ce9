"""Chest X-ray data: image reading, dataset sources, labeled/unlabeled splits, weak labels, synthetic demo data."""

from monai_cxr_ssl.data.datasets import (
    CHESTXRAY14_PATHOLOGIES,
    ChestXray14,
    ClassFolders,
    CsvSource,
    SourceData,
    find_images,
)
from monai_cxr_ssl.data.readers import (
    ACCEPTED_MODALITIES,
    ImageReadError,
    LoadCXRImage,
    LoadCXRImaged,
    check_image,
    dicom_to_image,
    inference_datalist,
    is_dicom,
    read_cxr,
    read_dicom_dataset,
    scan_images,
)
from monai_cxr_ssl.data.sampling import EpochSampler, epoch_seed, loader_like, samples_per_epoch
from monai_cxr_ssl.data.splits import (
    check_num_classes,
    fingerprint,
    load_split,
    make_split,
    prepare_split,
    select_classes,
    split_fingerprint,
    subsample,
    training_images,
)
from monai_cxr_ssl.data.synthetic import make_synthetic_dataset
from monai_cxr_ssl.data.unlabeled import UnlabeledImages, drop_duplicates, load_unlabeled_source
from monai_cxr_ssl.data.weak_labels import load_weak_labels, unlabeled_datalist

__all__ = [
    "ACCEPTED_MODALITIES",
    "CHESTXRAY14_PATHOLOGIES",
    "ChestXray14",
    "ClassFolders",
    "EpochSampler",
    "CsvSource",
    "ImageReadError",
    "LoadCXRImage",
    "LoadCXRImaged",
    "SourceData",
    "UnlabeledImages",
    "check_image",
    "check_num_classes",
    "dicom_to_image",
    "drop_duplicates",
    "epoch_seed",
    "find_images",
    "fingerprint",
    "inference_datalist",
    "is_dicom",
    "load_split",
    "loader_like",
    "load_unlabeled_source",
    "load_weak_labels",
    "make_split",
    "make_synthetic_dataset",
    "prepare_split",
    "read_cxr",
    "read_dicom_dataset",
    "samples_per_epoch",
    "scan_images",
    "select_classes",
    "split_fingerprint",
    "subsample",
    "training_images",
    "unlabeled_datalist",
]
