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


def test_classes_the_split_left_out_are_named_in_test_classes_and_under_table1():
    """A class without enough labeled positives is dropped by the split (``min_positives``): the test report never
    sees it, yet Table I must name it, as the pipeline records it (``coverage(report, split left_out_classes)``)."""
    from monai_cxr_ssl.data.splits import make_split

    # 40 patients: Effusion on every other one, Hernia on two patients only
    pool = [{"id": f"p{k}", "patient_id": f"p{k}", "label": [k % 2, int(k in (3, 17))]} for k in range(40)]
    split = make_split(pool, labeled_fraction=0.1, val_fraction=0.2, test_fraction=0.2, seed=0, min_positives=1,
                       classes=["Effusion", "Hernia"])
    hernia_labeled = sum(it["label"][1] for it in pool if it["id"] in {x["id"] for x in split["labeled"]})
    assert hernia_labeled == 0 and split["classes"] == ["Effusion"]  # the case this test is about
    test = split["test"]
    report = auroc_report([it["label"] for it in test], [[k / len(test)] for k in range(len(test))], ["Effusion"])
    covered = coverage(report, split["left_out_classes"])
    assert covered["left_out"] == ["Hernia"] and covered["covered"] == ["Effusion"]
    pool_count = split["left_out_classes"]["Hernia"]["pool"]
    held_out = {x["id"] for x in test + split["validation"]}
    assert pool_count == sum(it["label"][1] for it in pool if it["id"] not in held_out)
    (line, *_) = table1_notes([{"auroc": {"teacher": report["mean_auroc"]}, "test_classes": {"teacher": covered}}])
    assert line == ("Mean AUROC over 1 class(es): Effusion; left out of training and testing (too few labeled "
                    f"positives, setting min_positives): Hernia (0 labeled of {pool_count} in the training pool).")


def test_table1_rows_of_labeled_per_class_runs_stand_apart_from_the_fractions():
    def result(seed: int, auroc: float, per_class: int | None = None) -> dict:
        return {"labeled_fraction": 0.1, "seed": seed, "auroc": {"teacher": auroc},
                **({"labeled_per_class": per_class} if per_class else {})}

    rows = table1([result(0, 0.6), result(0, 0.7, 100), result(1, 0.8, 100), result(0, 0.9, 10)])
    assert [(r.get("labeled_per_class"), r["seeds"]) for r in rows] == [(None, [0]), (10, [0]), (100, [0, 1])]
    lines = format_table1(rows).splitlines()
    assert lines[2:] == ["| 10% | 0 | 0.600 |", "| 10 per class | 0 | 0.900 |",
                         "| 100 per class | 0,1 | 0.750 ± 0.071 |"]
