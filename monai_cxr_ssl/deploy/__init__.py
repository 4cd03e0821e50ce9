"""MONAI Deploy application: a folder of DICOM files in, the classifier's findings out as JSON and a DICOM SR.

Needs the ``deploy`` extra (``pip install "monai-cxr-ssl[deploy]"``); nothing else in the package imports the SDK.
Run with ``python -m monai_cxr_ssl.deploy -i <dicom dir> -o <out dir> -m <model.ts>``.
"""
