"""``python -m monai_cxr_ssl.deploy -i <dicom dir> -o <out dir> -m <model.ts>`` (or the HOLOSCAN_* variables)."""

import sys

try:
    import monai.deploy.core  # noqa: F401
except ImportError as err:
    sys.exit(f"monai-cxr-ssl deploy: the MONAI Deploy App SDK is not installed ({err}); "
             'pip install "monai-cxr-ssl[deploy]"')

from monai_cxr_ssl.deploy.app import main

sys.exit(main())
