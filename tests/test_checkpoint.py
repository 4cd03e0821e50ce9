"""Checkpoint handlers: atomic fixed-name files, best-model tracking across restarts, resuming a trainer."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from monai_cxr_ssl.handlers import BestCheckpoint, ResumableCheckpoint


def _evaluator(scores):
    """An engine whose n-th run reports ``scores[n]`` as ``val_auroc``."""
    engine = Engine(lambda e, b: None)
    it = iter(scores)

    @engine.on(Events.EPOCH_COMPLETED)
    def _(e):
        e.state.metrics["val_auroc"] = next(it)

    return engine


def test_best_checkpoint_keeps_best_and_survives_restart(tmp_path):
    net = torch.nn.Linear(2, 1)
    best = BestCheckpoint(str(tmp_path), net, "val_auroc")
    evaluator = _evaluator([0.6, 0.8, 0.7])
    best.attach(evaluator)
    saved = []
    for _ in range(3):
        with torch.no_grad():
            net.weight.add_(1.0)
        evaluator.run([0])
        saved.append(torch.load(tmp_path / "model.pt", weights_only=True)["weight"].clone())
    assert best.best_score == 0.8
    torch.testing.assert_close(saved[2], saved[1])  # 0.7 < 0.8: not saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]

    # A restarted run that restores the tracker does not overwrite the best model with a worse one.
    restored = BestCheckpoint(str(tmp_path), torch.nn.Linear(2, 1), "val_auroc")
    restored.load_state_dict(best.state_dict())
    evaluator2 = _evaluator([0.75])
    restored.attach(evaluator2)
    evaluator2.run([0])
    torch.testing.assert_close(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], saved[1])


def _trainer(net, opt, log):
    def step(engine, batch):
        opt.zero_grad()
        loss = (net(batch) ** 2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    engine = Engine(step)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: log.append(e.state.epoch))
    return engine


def test_resumable_checkpoint_resumes_training_state(tmp_path):
    data = [torch.ones(1, 2)] * 3
    torch.manual_seed(0)
    net, log = torch.nn.Linear(2, 1), []
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = _trainer(net, opt, log)
    ResumableCheckpoint(str(tmp_path), {"network": net, "optimizer": opt}).attach(trainer)
    trainer.run(data, max_epochs=2)
    after_two = net.weight.detach().clone()

    # "Restart the process": fresh objects, same folder, longer budget.
    net2, log2 = torch.nn.Linear(2, 1), []
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1)
    trainer2 = _trainer(net2, opt2, log2)
    ResumableCheckpoint(str(tmp_path), {"network": net2, "optimizer": opt2}).attach(trainer2)
    trainer2.run(data, max_epochs=3)
    assert log2 == [3]  # only the third epoch ran
    assert trainer2.state.epoch == 3
    assert not torch.equal(net2.weight, after_two)

    # Compared with an uninterrupted 3-epoch run, the result is the same.
    torch.manual_seed(0)
    net3 = torch.nn.Linear(2, 1)
    opt3 = torch.optim.SGD(net3.parameters(), lr=0.1)
    _trainer(net3, opt3, []).run(data, max_epochs=3)
    torch.testing.assert_close(net2.weight, net3.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "provenance.json"]


def test_resume_disabled_starts_over(tmp_path):
    data = [torch.ones(1, 2)]
    net, log = torch.nn.Linear(2, 1), []
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = _trainer(net, opt, log)
    ResumableCheckpoint(str(tmp_path), {"network": net}).attach(trainer)
    trainer.run(data, max_epochs=2)
    log2 = []
    trainer2 = _trainer(net, opt, log2)
    ResumableCheckpoint(str(tmp_path), {"network": net}, resume=False).attach(trainer2)
    trainer2.run(data, max_epochs=2)
    assert log2 == [1, 2]


@pytest.mark.parametrize("record", ['{"split_fingerprint": "abc", "settings": [1, 2]}', '[1, 2]',
                                    '{"split_fingerprint": 3, "settings": {}}'])
def test_a_damaged_provenance_record_is_named_before_resuming(tmp_path, record):
    net = torch.nn.Linear(2, 1)
    trainer = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), [])
    ResumableCheckpoint(str(tmp_path), {"network": net}).attach(trainer)
    trainer.run([torch.ones(1, 2)], max_epochs=1)
    (tmp_path / "provenance.json").write_text(record)
    with pytest.raises(ValueError, match=r"provenance.json: a damaged checkpoint provenance record \((its \w+ is a|"
                                         r"list, not an object).*delete the stage folder and re-run the stage"):
        ResumableCheckpoint(str(tmp_path), {"network": net})
