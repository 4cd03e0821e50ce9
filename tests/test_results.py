"""Table I notes: the classes the mean test AUROC covers, those left out, and classes with few test positives."""

from __future__ import annotations

from monai_cxr_ssl.evaluation import auroc_report
from monai_cxr_ssl.results import coverage, format_table1, table1, table1_notes


def _result(seed: int, hernia_positives: int) -> dict:
    labels = [[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]] + [[k % 2, int(k < hernia_positives), 0] for k in range(16)]
    probs = [[0.5] * 3 for _ in labels]
    report = auroc_report(labels, probs, ["Effusion", "Hernia", "Edema"])
    return {"labeled_fraction": 0.1, "seed": seed, "auroc": {"teacher": 0.7 + seed / 100},
            "test_classes": {"teacher": coverage(report)}}


def test_table1_says_which_classes_the_mean_covers_and_flags_few_positives():
    results = [_result(0, 3), _result(1, 0)]
    notes = table1_notes(results)
    assert notes == [
        "Mean AUROC over different classes per run: Effusion, Hernia, Edema (1 run); Effusion, Edema (1 run); "
        "left out (test AUROC undefined, one label value only): Hernia.",
        "Fewer than 10 positive test images (AUROC uncertain): Hernia (3), Edema (4).",  # Effusion has 10
    ]
    text = format_table1(table1(results), notes)
    assert text.splitlines()[2] == "| 10% | 0,1 | 0.705 ± 0.007 |"
    assert text.endswith("\n\n" + "\n".join(notes) + "\n")
    assert table1_notes([_result(0, 12), _result(1, 5)]) == [
        "Mean AUROC over 3 class(es): Effusion, Hernia, Edema.",
        "Fewer than 10 positive test images (AUROC uncertain): Hernia (5-12), Edema (4).",  # range over the runs
    ]
    assert format_table1(table1([{"labeled_fraction": 0.1, "seed": 0, "auroc": {"teacher": 0.7}}]),
                         table1_notes([{"auroc": {}}])).count("\n") == 3  # no notes without reports: table only
