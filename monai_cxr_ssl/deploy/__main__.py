"""``python -m monai_cxr_ssl.deploy -i <dicom dir> -o <out dir> -m <model.ts>`` (or the HOLOSCAN_* variables)."""

import resource
import sys

HOLOSCAN_STACK_BYTES = 32 * 1024 * 1024  # the minimum Holoscan recommends

try:
    import monai.deploy.core  # noqa: F401
except ImportError as err:
    sys.exit(f"monai-cxr-ssl deploy: the MONAI Deploy App SDK is not installed ({err}); "
             'pip install "monai-cxr-ssl[deploy]"')

soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
if soft != resource.RLIM_INFINITY and soft < HOLOSCAN_STACK_BYTES:
    print(f"monai-cxr-ssl deploy: the stack size ({soft // 2**20} MB) is below the 32 MB Holoscan recommends; "
          "raise it with `ulimit -s 32768` (Docker: --ulimit stack=33554432) if the app crashes.", file=sys.stderr)

from monai_cxr_ssl.deploy.app import main  # noqa: E402

sys.exit(main())
