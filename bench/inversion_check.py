"""How well the deploy app's grey-scale check (``monai_cxr_ssl.deploy.inversion``) tells a radiograph from its
negative: the score of real chest X-rays as stored and of their negatives (what a MONOCHROME1 label on pixels that
were never inverted reads as), the share of real images it would wrongly withhold and of negatives it catches.

    python bench/inversion_check.py     # NIH ChestX-ray14 sample and Kermany, about a minute on 2 cores
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _results import write_results  # a sibling module: bench/ is on sys.path when run as bench/<script>.py
from PIL import Image

from monai_cxr_ssl.deploy.inversion import INVERTED_BELOW, inversion_score

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {"ChestX-ray14 sample (NIH, adults)": ("chestxray14_sample", "images/*.png"),
        "Kermany (children, all splits)": ("kermany_pneumonia", "*/*/*.jpeg")}


def main() -> None:
    rows = []
    for name, (folder, pattern) in SETS.items():
        files = sorted((SHARED / folder).glob(pattern))
        if not files:
            print(f"{name}: not found under {SHARED / folder}, skipped")
            continue
        images = [np.asarray(Image.open(f).convert("L"), dtype=np.float64) for f in files]
        scores = np.array([inversion_score(im) for im in images])
        negatives = np.array([inversion_score(255 - im) for im in images])
        rows.append({"images": name, "n": len(files), "score median": round(float(np.median(scores)), 2),
                     "score 1st percentile": round(float(np.percentile(scores, 1)), 2),
                     "real images withheld": round(float((scores < INVERTED_BELOW).mean()), 4),
                     "negatives caught": round(float((negatives < INVERTED_BELOW).mean()), 4)})
        print(rows[-1])
    write_results(__file__, {"rows": rows, "inverted_below": INVERTED_BELOW}, {})


if __name__ == "__main__":
    main()
