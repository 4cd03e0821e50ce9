"""The README's commands run as written, in order, from an empty folder: the lines marked ``<- YOUR DATA`` take this
test's small generated data, and tiny settings (sizes, epochs, one λ and seed in the sweep) are added to keep it short.
Only the install and ``make`` lines are left out (``make test`` runs this test)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import radiograph_dicom

REPO = Path(__file__).resolve().parents[1]
SKIPPED = ("make ", "pip ", "python3 -m venv")  # installing, and the two make targets
YOUR_DATA = re.compile(r"^(\w+)=\S+\s+# <- YOUR DATA")
TINY = ["image_size=40", "crop_size=32", "num_epochs=1", "student_epochs=1", "finetune_epochs=1",
        "mean_teacher_epochs=1", "simclr_epochs=1", "batch_size=8", "num_workers=0"]


def readme_commands(text: str) -> list[str]:
    """The commands of the README's ``bash`` blocks, continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(re.sub(r" {2,}", " ", line.strip()))
    return commands


def tiny(command: str) -> str:
    """``command`` with this test's tiny settings: after ``--set`` for the CLI's training commands, as bundle
    arguments for ``monai.bundle run``, one λ and one seed for the sweep."""
    assert " # " not in command, f"a comment after a command would swallow the test's settings: {command}"
    if command.startswith(("monai-cxr-ssl pipeline", "monai-cxr-ssl sweep")):
        command = re.sub(r"--lambdas [\d. ]+--seeds [\d ]+", "--lambdas 0.1 --seeds 0 ", command)
        assert " --set " in command and not re.search(r"--set .* --", command), command  # --set comes last
        return f"{command} {' '.join(TINY)}"
    if command.startswith("python -m monai.bundle run"):
        return command + "".join(f" --{s.replace('=', ' ')}" for s in TINY if not s.startswith(("student", "fine",
                                                                                                  "mean", "simclr")))
    return command


def test_readme_commands_are_found():
    commands = readme_commands((REPO / "README.md").read_text())
    kinds = {c.split()[0] if not c.startswith("monai-cxr-ssl") else " ".join(c.split()[:2]) for c in commands}
    assert {"monai-cxr-ssl pipeline", "monai-cxr-ssl sweep", "monai-cxr-ssl compare", "monai-cxr-ssl export",
            "python"} <= kinds, kinds
    assert [YOUR_DATA.match(c)[1] for c in commands if YOUR_DATA.match(c)] == ["DATA", "UNLABELED", "STUDIES"]
    assert tiny("monai-cxr-ssl sweep k --lambdas 0.02 0.05 --seeds 0 1 --set a=1") == \
        f"monai-cxr-ssl sweep k --lambdas 0.1 --seeds 0 --set a=1 {' '.join(TINY)}"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    from monai_cxr_ssl.data import make_synthetic_dataset

    data = Path(make_synthetic_dataset(tmp_path / "kermany", n_train=120, n_test=16, image_size=40, prevalence=0.4))
    for split in ("train", "test"):  # the Kermany layout: NORMAL/ and PNEUMONIA/
        (data / split / "OPACITY").rename(data / split / "PNEUMONIA")
    other = Path(make_synthetic_dataset(tmp_path / "other", n_train=8, n_test=2, image_size=40, seed=7))
    unlabeled = tmp_path / "pacs"
    shutil.copytree(other / "train", unlabeled)
    studies = tmp_path / "studies"
    studies.mkdir()
    from PIL import Image

    pixels = Image.open(next((data / "test" / "PNEUMONIA").glob("*.png")))
    radiograph_dicom(pixels).save_as(studies / "image.dcm", enforce_file_format=True)

    script = ["set -euo pipefail"]
    for command in readme_commands((REPO / "README.md").read_text()):
        if command.startswith(SKIPPED) or YOUR_DATA.match(command):
            continue
        script += [f"echo {shlex.quote('>>> ' + command[:100])}", tiny(command)]
    workdir = tmp_path / "clone"
    workdir.mkdir()
    env = {**os.environ, "DATA": str(data), "UNLABELED": str(unlabeled), "STUDIES": str(studies),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # the timeout guards against a hang only: the commands took 417 s beside the other test worker (2 cores)
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=workdir, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-8000:]
    # no noise from the package's commands: MONAI's config-root warning (the meta and logging files are given) and
    # Holoscan's stack warning (only the deploy app runs Holoscan; plain monai.bundle imports MONAI first)
    for said in done.stdout.split(">>> ")[1:]:
        if said.startswith("monai-cxr-ssl"):
            assert "Not all config files are in" not in said and "Current stack size" not in said, said[:3000]
    for path in ("eval/teacher/models/model.pt", "runs/ts_l5/table1.md", "runs/mt_l5/table1.md",
                 "runs/mt_own/table1.md", "runs/simclr_l5/simclr/models/model.pt", "runs/simclr_l5/table1.md",
                 "runs/simclr_probe_l5/table1.md", "runs/s2mts2_l5/s2mts2_pretrain/models/model.pt",
                 "runs/s2mts2_l5/results-s2mts2.json", "runs/gan_l5/results-ssl_gan.json",
                 "runs/sweep/table1.md", "runs/sweep/mlflow.db", "runs/compare/comparison.csv", "model.ts",
                 "runs/deploy/result.json"):
        assert (workdir / path).is_file(), (path, done.stdout[-3000:])
    assert "| labeled | seeds | simclr linear probe | simclr + intermediate |" in (
        workdir / "runs" / "simclr_probe_l5" / "table1.md").read_text()
    assert not (workdir / "mlflow.db").exists()  # every store is in its run's folder
    assert "| 10% |" in (workdir / "runs" / "compare" / "comparison.md").read_text()
