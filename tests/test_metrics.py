import pytest
import torch

from longtail.evaluation.metrics import (
    ShotThresholds,
    classification_metrics,
    confusion_matrix,
    macro_precision,
    per_class_accuracy,
)


def test_shot_groups_at_the_thresholds():
    counts = torch.tensor([101, 100, 20, 19])
    g = ShotThresholds().groups(counts)  # many > 100, few < 20
    assert g["many"].tolist() == [True, False, False, False]
    assert g["medium"].tolist() == [False, True, True, False]
    assert g["few"].tolist() == [False, False, False, True]
    g = ShotThresholds(inclusive=True).groups(counts)  # OLTR: many >= 100, few <= 20
    assert g["many"].tolist() == [True, True, False, False]
    assert g["few"].tolist() == [False, False, True, True]


def test_hand_made_case():
    # 4 classes with 200 / 50 / 20 / 5 training images: many {0}, medium {1, 2}, few {3}.
    counts = torch.tensor([200, 50, 20, 5])
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    preds = torch.tensor([0, 0, 1, 0, 0, 0, 3, 0])
    m = classification_metrics(preds, targets, counts)
    assert m["top1"] == pytest.approx(50.0)
    assert m["per_class"] == [100.0, 50.0, 0.0, 50.0]
    assert m["many"] == pytest.approx(100.0)
    assert m["medium"] == pytest.approx(25.0)  # mean of 50 and 0
    assert m["few"] == pytest.approx(50.0)
    assert m["group_sizes"] == {"many": 1, "medium": 2, "few": 1}
    assert m["confusion"][0] == [2, 0, 0, 0] and m["confusion"][2] == [2, 0, 0, 0]
    # precision: class 0 predicted 6 times, 2 right; class 1: 1/1; class 2: never predicted -> 0; class 3: 1/1
    assert m["precision"] == pytest.approx(100 * (2 / 6 + 1 + 0 + 1) / 4)
    assert "many > 100" in m["thresholds"]


def test_empty_group_is_none():
    m = classification_metrics(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([500, 300]))
    assert m["few"] is None and m["medium"] is None and m["many"] == 100.0


def test_absent_class_is_none_in_per_class():
    acc = per_class_accuracy(torch.tensor([0, 0]), torch.tensor([0, 1]), 3)
    assert acc[0] == 1.0 and acc[1] == 0.0 and torch.isnan(acc[2])


def test_macro_precision_group_uses_whole_set_counts():
    targets = torch.tensor([0, 1, 1])
    preds = torch.tensor([0, 0, 1])
    assert macro_precision(preds, targets, 2) == pytest.approx((0.5 + 1.0) / 2)
    assert macro_precision(preds, targets, 2, classes=torch.tensor([True, False])) == pytest.approx(0.5)


def test_confusion_matrix_counts():
    cm = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 0]), 2)
    assert cm.tolist() == [[1, 1], [0, 1]]


def test_per_attribute_accuracy():
    m = classification_metrics(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 0, 1]), torch.tensor([10, 10]),
                               attributes=torch.tensor([0, 0, 1, 1]))
    assert m["per_attribute"] == {"0": 100.0, "1": 50.0}


def test_no_confusion_for_many_classes():
    m = classification_metrics(torch.tensor([0]), torch.tensor([0]), torch.ones(101, dtype=torch.long),
                               confusion_max_classes=100)
    assert "confusion" not in m


def test_glt_group_precision_and_class_rank_groups():
    """Group precision: TP_c / #predicted-as-c over the group's classes, predicted counts from the whole set;
    class_groups (the benchmark's class-rank groups) replace the image-count thresholds."""
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 2])  # predicted: 0 x2 (1 TP), 1 x3 (2 TP), 2 x1 (1 TP)
    counts = torch.tensor([500, 50, 5])  # thresholds would say many / medium / few
    m = classification_metrics(preds, targets, counts, class_groups=torch.tensor([0, 0, 2]))
    assert m["group_sizes"] == {"many": 2, "medium": 0, "few": 1}
    assert m["many_precision"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert m["medium_precision"] is None and m["few_precision"] == pytest.approx(100.0)
    assert m["many"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert m["thresholds"].startswith("the benchmark's class-rank groups (2 many / 0 medium / 1 few")
    attrs = torch.tensor([0, 1, 0, 1, 0, 1])
    m = classification_metrics(preds, targets, counts, attributes=attrs)
    # attribute 0: samples (0->0, 1->1, 2->0): predicted 0 twice (1 TP), 1 once (1 TP); classes present 0, 1, 2
    assert m["per_attribute_precision"]["0"] == pytest.approx(100 * (0.5 + 1.0 + 0.0) / 3)
