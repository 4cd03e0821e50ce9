#!/usr/bin/env bash
# The installable package: build the wheel from this checkout, install it in a fresh virtual environment outside
# the checkout, and run `bundle-path`, the demo (tiny), `compare`, `export` and a plain `python -m monai.bundle run`
# of the installed bundle from an empty folder. Usable locally: bash .ci/wheel_test.sh (PYTHON=... picks the Python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}  # as the Makefile: an unpinned torch resolves to a multi-GB CUDA build
step=0
say() {  # a line with the seconds the step took
    echo "wheel-test: $1 ($(( SECONDS - step )) s)"; step=$SECONDS
}
work=$(mktemp -d "${TMPDIR:-/tmp}/cxr-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Build from a copy of the tracked and not-ignored files, so that no build/ or egg-info of the checkout goes in.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -f "$f" ] && cp --parents "$f" "$work/src/"
done
"$PYTHON" -m venv "$work/venv"
venv_bin="$work/venv/bin"
"$venv_bin/pip" wheel -q --no-deps -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/monai_cxr_ssl-*.whl)
say "built $(basename "$wheel")"

# What the wheel holds: the package with the bundle and the overlays; no tests, data or run outputs.
"$venv_bin/python" - "$wheel" <<'PY'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["monai_cxr_ssl/bundles/cxr_classifier/configs/train.json",
        "monai_cxr_ssl/bundles/cxr_classifier/configs/metadata.json",
        "monai_cxr_ssl/bundles/cxr_classifier/configs/multi_gpu.json",
        "monai_cxr_ssl/bundles/cxr_classifier/configs/logging.conf",
        "monai_cxr_ssl/bundles/cxr_classifier/docs/README.md",
        "monai_cxr_ssl/configs/demo.json", "monai_cxr_ssl/deploy/app.yaml", "monai_cxr_ssl/cli.py"]
missing = [n for n in need if n not in names]
outside = [n for n in names if not n.startswith(("monai_cxr_ssl/", "monai_cxr_ssl-"))]
unwanted = [n for n in names if any(part in n.split("/") for part in ("tests", "models", "eval", "data", ".demo"))
            and not n.startswith("monai_cxr_ssl/data/")
            or n.endswith((".pt", ".ts", ".db", ".png", ".npz", ".dcm"))]
if missing or outside or unwanted:
    sys.exit(f"wheel-test: wheel contents wrong: missing {missing}, outside the package {outside}, unwanted {unwanted}")
print(f"wheel-test: {len(names)} files in the wheel, bundle and overlays included, no tests/data/outputs")
PY

"$venv_bin/pip" install -q --no-compile "$TORCH_PIN"  # no .pyc of every file: the commands compile what they import
"$venv_bin/pip" install -q --no-compile "$wheel"
say "installed torch and the wheel with its dependencies"

# Run from an empty folder outside the checkout, with nothing of the checkout on the path.
mkdir "$work/run"
cd "$work/run"
export PYTHONPATH=
cli="$venv_bin/monai-cxr-ssl"
bundle=$("$cli" bundle-path)
overlays=$("$cli" bundle-path --overlays)
case "$bundle" in
    "$work/venv/"*) ;;
    *) echo "wheel-test: bundle-path $bundle is not the installed package's"; exit 1;;
esac
test -f "$bundle/configs/train.json" && test -f "$overlays/demo.json"
echo "wheel-test: bundle-path $bundle"

"$cli" demo --workdir demo --epochs 1 --n-train 40 --n-test 20 > demo.log 2>&1 || { tail -40 demo.log; exit 1; }
grep -A3 "SYNTHETIC data demo" demo.log
test -f demo/pipeline/results.json
say "demo"
"$cli" compare demo_synthetic --tracking-uri "sqlite:///$PWD/demo/mlflow.db" --output-dir compare --no-summary \
    > compare.log 2>&1 || { tail -40 compare.log; exit 1; }
test -f compare/comparison.csv
"$cli" export demo/pipeline -o model.ts --ood-images 0 > export.log 2>&1 || { tail -40 export.log; exit 1; }
grep "exported stage" export.log
say "compare and export"

# A plain MONAI bundle run of the installed bundle: train one epoch on the demo's data, outputs in this folder.
"$venv_bin/python" -m monai.bundle run --bundle_root "$bundle" \
    --config_file "['$bundle/configs/train.json','$overlays/demo.json']" \
    --meta_file "$bundle/configs/metadata.json" --logging_file "$bundle/configs/logging.conf" \
    --dataset_dir demo/data --num_epochs 1 --image_size 40 --crop_size 32 > bundle.log 2>&1 \
    || { tail -40 bundle.log; exit 1; }
if [ ! -f eval/teacher/models/model.pt ]; then
    echo "wheel-test: no eval/teacher/models/model.pt"; tail -20 bundle.log; exit 1
fi
if find "$work/venv" -path '*monai_cxr_ssl/bundles/*' \( -name eval -o -name models -o -name '*.db' \) | grep -q .; then
    echo "wheel-test: a run wrote into the installed package"; exit 1
fi
say "monai.bundle run of the installed bundle wrote $(pwd)/eval"
echo "wheel-test: passed in $SECONDS s"
