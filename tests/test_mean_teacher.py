"""Mean-teacher engine: EMA teacher, ramp-up, AALS targets, the loss, two-model validation and the best of both."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Average
from monai.data import DataLoader
from monai.handlers import ROCAUC, from_engine
from monai.transforms import Compose, RandFlipd, RandGaussianNoised

from monai_cxr_ssl.handlers import BestCheckpoint
from monai_cxr_ssl.losses import BernoulliKLDivLoss
from monai_cxr_ssl.methods.mean_teacher.engine import (
    MeanTeacherEvaluator,
    MeanTeacherTrainer,
    check_ema_decay,
    sigmoid_rampup,
    teacher_ema,
)
from monai_cxr_ssl.sharpening import aals
from monai_cxr_ssl.transforms import TwoViewsd


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 1),
    )


def _items(n: int, seed: int, labeled: bool = True, **extra) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        item = {"image": torch.rand(1, 8, 8, generator=g), **extra}
        if labeled:
            item["label"] = torch.tensor([float(i % 2)])
        items.append(item)
    return items


def _trainer(student, unlabeled, max_epochs=1, epoch_length=1, ema_decay=0.999, loss_function=None, lr=0.1,
             **kwargs) -> MeanTeacherTrainer:
    """The trainer as the bundle wires it: the teacher is the ``ema_model`` of a ``teacher_ema`` handler."""
    ema = teacher_ema(student, ema_decay)
    return MeanTeacherTrainer(
        teacher_network=ema.ema_model, unlabeled_data_loader=DataLoader(unlabeled, batch_size=4),
        device=torch.device("cpu"), max_epochs=max_epochs, epoch_length=epoch_length,
        train_data_loader=DataLoader(_items(8, 0), batch_size=4), network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=lr),
        loss_function=loss_function or torch.nn.BCEWithLogitsLoss(), decollate=False, train_handlers=[ema], **kwargs,
    )


def test_teacher_ema_blends_parameters_and_float_buffers():
    student = _net(0)
    ema = teacher_ema(student, 0.75)
    teacher, before = ema.ema_model, copy.deepcopy(student)  # the teacher starts as a copy of the student
    student.load_state_dict(_net(1).state_dict())
    student[1].running_mean.fill_(2.0)
    student[1].num_batches_tracked.fill_(7)
    engine = Engine(lambda e, batch: None)
    ema.attach(engine)
    engine.run([0], max_epochs=1)  # one iteration: one update
    for t, b, s in zip(teacher.parameters(), before.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)
    torch.testing.assert_close(teacher[1].running_mean, 0.75 * before[1].running_mean + 0.25 * 2.0)
    torch.testing.assert_close(teacher[1].running_var, 0.75 * before[1].running_var + 0.25 * student[1].running_var)
    assert int(teacher[1].num_batches_tracked) == 7  # the batch counter follows the student's
    assert teacher is not student and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("alpha", [-0.1, 0.0, 1.0, 1.5])
def test_ema_decay_outside_open_unit_interval_is_rejected(alpha):
    with pytest.raises(ValueError, match=r"ema_decay .* must be in \(0, 1\)"):
        check_ema_decay(alpha)
    with pytest.raises(ValueError, match="ema_decay"):
        _trainer(_net(), _items(4, 1, labeled=False), ema_decay=alpha)


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(25, 10) == 1.0 and sigmoid_rampup(3, 0) == 1.0
    values = [sigmoid_rampup(i, 10) for i in range(11)]
    assert values == sorted(values)


def test_one_iteration_combines_the_losses_and_updates_the_teacher_as_an_ema():
    student = _net(0)
    trainer = _trainer(student, _items(6, 1, labeled=False), ema_decay=0.9, consistency_weight=2.0)
    teacher = trainer.teacher_network
    start = copy.deepcopy(student)
    trainer.run()
    out = trainer.state.output
    assert out["consistency_weight"] == 2.0  # no ramp-up by default
    expected = float(out["supervised_loss"]) + 2.0 * float(out["consistency_loss"])
    assert float(out["loss"].detach()) == pytest.approx(expected)
    # after one SGD step the teacher is 0.9 · its start (= the student's start) + 0.1 · the updated student
    for t, s0, s1 in zip(teacher.parameters(), start.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * s0 + 0.1 * s1)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_distillation_targets_are_the_sharpened_teacher_predictions():
    trainer = _trainer(_net(0), _items(4, 1, labeled=False), aals_t=0.3, aals_a0=8.0)
    probs = torch.tensor([[0.1], [0.35], [0.6], [0.99]])
    targets, stats = trainer.sharpened_targets(probs, None)
    torch.testing.assert_close(targets, aals(probs, 0.3, 8.0))
    assert stats["aals_raised"] == pytest.approx(0.75)  # everything above t moves up
    assert stats["aals_a"] == pytest.approx(float((8.0 - 7.0 * probs).mean()))
    # a weak-positive mask limits sharpening to its entries; the rest keep the teacher's probability
    mask = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    targets, stats = trainer.sharpened_targets(probs, mask)
    assert targets[1] > probs[1] and torch.equal(targets[[0, 2, 3]], probs[[0, 2, 3]])
    assert stats["aals_raised"] == 1.0 and stats["aals_a"] == pytest.approx(8.0 - 7.0 * 0.35)


def test_consistency_weight_ramps_up_over_the_epochs():
    student = _net(0)
    trainer = _trainer(student, _items(6, 1, labeled=False), max_epochs=3, epoch_length=5, rampup_epochs=3,
                       aals_a0=1.0)
    weight = Average(output_transform=lambda o: o["consistency_weight"])
    weight.attach(trainer, "consistency_weight")
    raised = Average(output_transform=lambda o: o["aals_raised"])
    raised.attach(trainer, "aals_raised")
    history = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: history.append(dict(e.state.metrics)))
    trainer.run()  # 5 iterations an epoch: the 2-batch unlabeled loader is cycled
    # iteration i (from 0) of 15 ramps up as exp(−5 (1 − i/15)²); each epoch logs the mean of its five
    by_hand = [sum(math.exp(-5 * (1 - i / 15) ** 2) for i in range(5 * e, 5 * e + 5)) / 5 for e in range(3)]
    assert [h["consistency_weight"] for h in history] == pytest.approx(by_hand)
    assert by_hand[0] < 0.2 < by_hand[2]
    assert all(h["aals_raised"] == 0.0 for h in history)  # a0 = 1: no sharpening


def _plain_net(seed: int) -> torch.nn.Module:
    """No BatchNorm: the same output in train and eval mode, so the pull can be measured outside the trainer."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 1))


def _aals_by_hand(p: torch.Tensor, t: float = 0.4, a0: float = 4.0) -> torch.Tensor:
    a = a0 - (a0 - 1) * p
    z = a * torch.log(p / (1 - p)) + (1 - a) * math.log(t / (1 - t))
    return torch.maximum(1 / (1 + torch.exp(-z)), p)


def test_consistency_loss_alone_pulls_the_student_to_the_sharpened_teacher():
    unlabeled = _items(4, 1, labeled=False)
    images = torch.stack([it["image"] for it in unlabeled])
    student = _plain_net(0)
    trainer = _trainer(student, unlabeled, max_epochs=1, epoch_length=30, ema_decay=0.999, lr=1.0,
                       loss_function=lambda pred, target: pred.sum() * 0.0)  # the distillation term alone
    teacher = trainer.teacher_network
    teacher.load_state_dict(_plain_net(1).state_dict())

    def gap() -> float:
        """Mean |student probability − teacher's AALS target| on the unlabeled images, computed here."""
        with torch.no_grad():
            target = _aals_by_hand(1 / (1 + torch.exp(-teacher(images).double())))
            return float((1 / (1 + torch.exp(-student(images).double())) - target).abs().mean())

    before = gap()
    trainer.run()
    after = gap()
    assert before > 0.05  # two different networks: something to pull
    assert after < 0.25 * before, (before, after)


def test_empty_unlabeled_loader_is_a_clear_error():
    trainer = _trainer(_net(), [])
    with pytest.raises(ValueError, match="unlabeled data loader is empty"):
        trainer.run()


def test_evaluator_scores_student_and_teacher_and_keeps_the_better(tmp_path):
    student, teacher = _net(0), _net(1)
    data = DataLoader(_items(12, 3), batch_size=4)
    evaluator = MeanTeacherEvaluator(
        teacher_network=teacher, device=torch.device("cpu"), val_data_loader=data, network=student,
        key_val_metric={"val_auroc": ROCAUC(output_transform=from_engine(["pred", "label"]))},
        additional_metrics={"val_auroc_teacher": ROCAUC(output_transform=from_engine(["pred_teacher", "label"]))},
    )
    best = BestCheckpoint(str(tmp_path), student, "val_auroc", candidates={"val_auroc_teacher": teacher})
    best.attach(evaluator)
    evaluator.run()
    metrics = evaluator.state.metrics
    assert set(metrics) == {"val_auroc", "val_auroc_teacher"} and metrics["val_auroc"] != metrics["val_auroc_teacher"]
    winner = teacher if metrics["val_auroc_teacher"] > metrics["val_auroc"] else student
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    for name, value in winner.state_dict().items():
        torch.testing.assert_close(saved[name], value)
    assert best.best_score == pytest.approx(max(metrics.values()))


def test_best_checkpoint_switches_to_whichever_model_is_best(tmp_path):
    a, b = _net(0), _net(1)
    scores = iter([{"s": 0.6, "t": 0.5}, {"s": 0.55, "t": 0.7}, {"s": 0.65, "t": 0.6}])
    engine = Engine(lambda e, batch: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(next(scores)))
    best = BestCheckpoint(str(tmp_path), a, "s", candidates={"t": b})
    best.attach(engine)
    saved = []
    engine.add_event_handler(Events.EPOCH_COMPLETED,
                             lambda e: saved.append(torch.load(tmp_path / "model.pt", weights_only=True)))
    engine.run([0], max_epochs=3)
    key = "5.weight"
    assert torch.equal(saved[0][key], a.state_dict()[key])  # 0.6 by the student
    assert torch.equal(saved[1][key], b.state_dict()[key])  # 0.7 by the teacher
    assert torch.equal(saved[2][key], b.state_dict()[key])  # 0.65 < 0.7: unchanged
    assert best.best_score == pytest.approx(0.7)


def test_two_views_are_augmented_independently():
    augment = Compose([RandFlipd("image", prob=0.5, spatial_axis=1), RandGaussianNoised("image", prob=1.0)])
    item = {"image": torch.rand(1, 8, 8), "label": torch.tensor([1.0])}
    views = TwoViewsd(augment).set_random_state(0)(item)
    assert set(views) == {"image", "image_teacher", "label"}
    assert not torch.equal(views["image"], views["image_teacher"])
    again = TwoViewsd(augment).set_random_state(0)(item)
    assert torch.equal(views["image"], again["image"]) and torch.equal(views["image_teacher"], again["image_teacher"])
    single = TwoViewsd(augment, separate=False)(item)
    assert "image_teacher" not in single


def test_bernoulli_kl_is_zero_when_the_student_matches_the_targets():
    targets = torch.tensor([[0.2], [0.9]])
    assert float(BernoulliKLDivLoss()(torch.logit(targets), targets)) == pytest.approx(0.0, abs=1e-6)


def test_a_resumed_run_restores_the_teacher_and_ends_where_a_straight_run_does():
    def trainer(student, max_epochs):
        return _trainer(student, _items(6, 1, labeled=False), max_epochs=max_epochs, epoch_length=2, ema_decay=0.9)

    straight = trainer(_net(0), 3)
    straight.run()
    first = trainer(_net(0), 2)
    first.run()
    saved = copy.deepcopy({"network": first.network.state_dict(), "teacher": first.teacher_network.state_dict(),
                           "trainer": first.state_dict()})
    resumed = trainer(_net(5), 3)  # another start: everything must come from the checkpoint
    resumed.network.load_state_dict(saved["network"])
    resumed.teacher_network.load_state_dict(saved["teacher"])
    resumed.load_state_dict(saved["trainer"])
    resumed.state.max_epochs = 3  # the checkpoint ran to 2
    resumed.run()  # the third epoch
    assert resumed.state.epoch == 3 and resumed.state.iteration == 6
    for net in ("network", "teacher_network"):
        for (name, a), b in zip(getattr(resumed, net).state_dict().items(),
                                getattr(straight, net).state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{net}.{name}")


def test_mse_consistency_on_every_image_by_hand():
    """consistency=mse: the mean squared difference of the student's and the teacher's sigmoid probabilities over
    the labeled and the unlabeled images of the step (AALS off), recomputed here from the two networks."""
    from monai_cxr_ssl.losses import ProbabilityMSELoss

    logits, target = torch.tensor([[0.0, 2.0], [-1.0, 1.0]]), torch.tensor([[0.25, 1.0], [0.5, 0.5]])
    s = torch.sigmoid(logits)
    assert ProbabilityMSELoss()(logits, target).item() == pytest.approx(float(((s - target) ** 2).mean()))
    assert ProbabilityMSELoss()(torch.zeros(1, 1), torch.tensor([[0.5]])).item() == 0.0

    student = _plain_net(0)
    unlabeled = _items(4, 1, labeled=False)
    trainer = _trainer(student, unlabeled, consistency="mse", aals_a0=1.0, ema_decay=0.9,
                       loss_function=torch.nn.BCEWithLogitsLoss())
    labeled = torch.stack([it["image"] for it in _items(8, 0)[:4]])
    images = torch.cat([labeled, torch.stack([it["image"] for it in unlabeled])])
    with torch.no_grad():  # a teacher away from the student, so that the term is not zero
        teacher = copy.deepcopy(student)
        for p in teacher.parameters():
            p.add_(0.05)
        expected_moved = ((torch.sigmoid(student(images)) - torch.sigmoid(teacher(images))) ** 2).mean()
    trainer.teacher_network.load_state_dict(teacher.state_dict())
    trainer.run()
    assert float(trainer.state.output["consistency_loss"]) == pytest.approx(float(expected_moved), rel=1e-5)
    assert float(expected_moved) > 0.0
    with pytest.raises(ValueError, match="consistency must be one of kl, mse"):
        _trainer(_net(), unlabeled, consistency="l1")


def test_linear_rampup_is_epoch_over_epochs():
    from monai_cxr_ssl.methods.mean_teacher.engine import linear_rampup

    student = _net(0)
    trainer = _trainer(student, _items(6, 1, labeled=False), max_epochs=4, epoch_length=2, rampup_epochs=4,
                       rampup="linear", consistency_weight=2.0)
    weights = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: weights.append(e.state.output["consistency_weight"]))
    trainer.run()
    assert weights == [0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 2.0, 2.0]  # 2 × epoch / 4, per epoch
    assert linear_rampup(6, 4) == 1.0 and linear_rampup(1, 0) == 1.0
    with pytest.raises(ValueError, match="consistency_rampup must be one of sigmoid, linear"):
        _trainer(student, _items(6, 1, labeled=False), rampup="cosine")
