"""SemiSupervisedTrainer: MONAI's supervised step plus one hook for the unlabeled batch, against a step by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from monai_cxr_ssl.engines import SemiSupervisedTrainer


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 2),
    )


def _labeled(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(1, 8, 8, generator=g), "label": torch.tensor([float(i % 2), float(i % 3 == 0)])}
            for i in range(n)]


def _unlabeled(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(1, 8, 8, generator=g), "index": torch.tensor(i)} for i in range(n)]


class SquaredLogits(SemiSupervisedTrainer):
    """A toy method: the mean squared student logit on the unlabeled images; records what the hook receives."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[dict] = []

    def unlabeled_loss(self, engine, inputs, unlabeled, pred):
        self.seen.append({"epoch": engine.state.epoch, "index": unlabeled["index"].tolist(), "inputs": inputs,
                          "pred": None if pred is None else pred.detach().clone()})
        term = pred.pow(2).mean() if pred is not None else engine.network(unlabeled["image"]).pow(2).mean()
        return 0.5 * term, {"squared": term.detach()}


def _trainer(cls, network, unlabeled=None, epoch_length=1, max_epochs=1, **kwargs):
    return cls(device=torch.device("cpu"), max_epochs=max_epochs, epoch_length=epoch_length,
               train_data_loader=DataLoader(_labeled(), batch_size=4), network=network,
               optimizer=torch.optim.SGD(network.parameters(), lr=0.1), loss_function=torch.nn.BCEWithLogitsLoss(),
               decollate=False, unlabeled_data_loader=unlabeled, **kwargs)


def test_without_unlabeled_data_it_is_monais_supervised_trainer():
    ours, theirs = _net(0), _net(0)
    _trainer(SemiSupervisedTrainer, ours, epoch_length=2).run()
    SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, epoch_length=2,
                      train_data_loader=DataLoader(_labeled(), batch_size=4), network=theirs,
                      optimizer=torch.optim.SGD(theirs.parameters(), lr=0.1),
                      loss_function=torch.nn.BCEWithLogitsLoss(), decollate=False).run()
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_one_step_equals_the_joint_step_by_hand():
    network = _net(0)
    by_hand = copy.deepcopy(network)
    trainer = _trainer(SquaredLogits, network, DataLoader(_unlabeled(4), batch_size=4))
    trainer.run()
    # by hand: one forward of labeled + unlabeled (BatchNorm in train mode sees both), BCE + 0.5 · mean(z²), SGD
    labeled, unlabeled = _labeled()[:4], _unlabeled(4)
    x = torch.cat([torch.stack([it["image"] for it in labeled]), torch.stack([it["image"] for it in unlabeled])])
    y = torch.stack([it["label"] for it in labeled])
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.1)
    by_hand.train()
    logits = by_hand(x)
    supervised = F.binary_cross_entropy_with_logits(logits[:4], y)
    loss = supervised + 0.5 * logits[4:].pow(2).mean()
    torch.testing.assert_close(trainer.seen[0]["pred"], logits[4:].detach())
    loss.backward()
    optimizer.step()
    out = trainer.state.output
    assert float(out["loss"].detach()) == pytest.approx(float(loss)) and out["pred"].shape == (4, 2)
    assert float(out["supervised_loss"]) == pytest.approx(float(supervised))
    assert float(out["squared"]) == pytest.approx(float(logits[4:].pow(2).mean()))
    for (name, a), b in zip(network.state_dict().items(), by_hand.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_the_unlabeled_loader_restarts_every_epoch_and_cycles():
    trainer = _trainer(SquaredLogits, _net(0), DataLoader(_unlabeled(6), batch_size=4), epoch_length=3, max_epochs=2)
    trainer.run()
    # two batches ([0..3], [4, 5]) for three iterations: cycled, and the second epoch starts again from the first
    assert [(s["epoch"], s["index"]) for s in trainer.seen] == [
        (1, [0, 1, 2, 3]), (1, [4, 5]), (1, [0, 1, 2, 3]), (2, [0, 1, 2, 3]), (2, [4, 5]), (2, [0, 1, 2, 3])]


def test_without_a_joint_forward_the_hook_runs_the_student_itself():
    batch_sizes = []
    network = _net(0)
    network.register_forward_pre_hook(lambda module, args: batch_sizes.append(len(args[0])))
    trainer = _trainer(SquaredLogits, network, DataLoader(_unlabeled(3), batch_size=3), joint_key=None)
    trainer.run()
    assert trainer.seen[0]["pred"] is None and batch_sizes == [4, 3]  # labeled alone, then the hook's own forward


def test_iteration_events_fire_in_order_with_the_labeled_prediction():
    trainer = _trainer(SquaredLogits, _net(0), DataLoader(_unlabeled(4), batch_size=4))
    fired = []
    for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                  IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED):
        trainer.add_event_handler(event, lambda e, ev=event: fired.append((ev, tuple(e.state.output["pred"].shape),
                                                                           "loss" in e.state.output)))
    trainer.run()
    events = IterationEvents
    assert fired == [(events.FORWARD_COMPLETED, (4, 2), False), (events.LOSS_COMPLETED, (4, 2), True),
                     (events.BACKWARD_COMPLETED, (4, 2), True), (events.MODEL_COMPLETED, (4, 2), True)]


def test_a_method_without_the_hook_is_a_clear_error():
    trainer = _trainer(SemiSupervisedTrainer, _net(0), DataLoader(_unlabeled(4), batch_size=4))
    with pytest.raises(NotImplementedError, match="must implement unlabeled_loss"):
        trainer.run()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="amp (autocast + GradScaler) needs a CUDA device")
def test_amp_step_matches_the_amp_step_by_hand():
    device = torch.device("cuda")
    network = _net(0).to(device)
    by_hand = copy.deepcopy(network)
    trainer = SquaredLogits(device=device, max_epochs=1, epoch_length=1,
                            train_data_loader=DataLoader(_labeled(), batch_size=4), network=network,
                            optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
                            loss_function=torch.nn.BCEWithLogitsLoss(), decollate=False, amp=True,
                            unlabeled_data_loader=DataLoader(_unlabeled(4), batch_size=4))
    trainer.run()
    x = torch.cat([torch.stack([it["image"] for it in _labeled()[:4]]),
                   torch.stack([it["image"] for it in _unlabeled(4)])]).to(device)
    y = torch.stack([it["label"] for it in _labeled()[:4]]).to(device)
    optimizer, scaler = torch.optim.SGD(by_hand.parameters(), lr=0.1), torch.amp.GradScaler("cuda")
    by_hand.train()
    with torch.autocast("cuda"):
        logits = by_hand(x)
        loss = F.binary_cross_entropy_with_logits(logits[:4], y) + 0.5 * logits[4:].pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert trainer.state.output["pred"].dtype == torch.float16  # the forward ran under autocast
    for (name, a), b in zip(network.state_dict().items(), by_hand.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
