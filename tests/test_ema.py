"""Weight averaging during fine-tuning: the running average, swapping it in, and where training uses it."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from cbmir.errors import InvalidInputError
from cbmir.training import TrainConfig
from cbmir.training.ema import WeightAverage


def _step_weights(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_average_follows_the_warmed_up_decay_and_copies_integer_buffers() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    _step_weights(net, 0.0)
    average = WeightAverage([net], decay=0.5)
    expected = 0.0
    for t, value in enumerate([4.0, 8.0, 2.0], start=1):
        _step_weights(net, value)
        net[1].num_batches_tracked.add_(1)
        average.update()
        d = min(0.5, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * value
    with average.applied():
        np.testing.assert_allclose(net[0].weight.detach().numpy(), expected, rtol=1e-6)
        assert int(net[1].num_batches_tracked) == 3
        np.testing.assert_allclose(net[1].running_var.numpy(), 1.0)
    np.testing.assert_allclose(net[0].weight.detach().numpy(), 2.0)
    assert net[0].weight.requires_grad


def test_live_weights_come_back_when_the_block_raises() -> None:
    net = torch.nn.Linear(2, 2)
    _step_weights(net, 1.0)
    average = WeightAverage([net], decay=0.9)
    _step_weights(net, 5.0)
    with pytest.raises(RuntimeError), average.applied():
        assert float(net.weight.detach()[0, 0]) == 1.0
        raise RuntimeError("validation failed")
    assert float(net.weight.detach()[0, 0]) == 5.0


@pytest.mark.parametrize("decay", [-0.1, 1.0, 2.0])
def test_decay_outside_the_unit_interval_is_refused_with_the_option_name(decay: float) -> None:
    with pytest.raises(InvalidInputError, match="--ema-decay"):
        TrainConfig(ema_decay=decay)
    with pytest.raises(InvalidInputError, match="decay"):
        WeightAverage([torch.nn.Linear(1, 1)], decay=decay)


def test_self_supervised_training_refuses_an_average_it_would_not_use() -> None:
    with pytest.raises(InvalidInputError, match="--self-supervised"):
        TrainConfig(self_supervised=True, ema_decay=0.99)
    assert TrainConfig(self_supervised=True).ema_decay == 0.0


def _start_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    """The backbone's weights before any training step."""
    from cbmir.training.trainer import new_extractor

    extractor, _ = new_extractor(config, "torch", "fp32")
    return {k: v.clone() for k, v in extractor.net.state_dict().items()}


def test_training_saves_the_average_not_the_last_step(unifesp_subset) -> None:
    from cbmir.index_build import open_archive
    from cbmir.training.dataset import decode_archive
    from cbmir.training.trainer import train_extractor

    data = decode_archive(open_archive(*unifesp_subset), progress=False)
    config = TrainConfig(image_size=64, epochs=1, batch_size=16, lr=1e-3, val_fraction=0.0, device="cpu")

    def head_and_net(cfg: TrainConfig) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        result = train_extractor(data.images, data.column("label"), None, cfg, progress=False, max_steps=5)
        return result.extractor._head[0], result.extractor.net.state_dict()

    plain_head, plain_net = head_and_net(config)
    averaged_head, averaged_net = head_and_net(TrainConfig(**{**asdict(config), "ema_decay": 0.9}))
    start = _start_weights(config)
    moved = [k for k, v in plain_net.items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert moved, "five steps changed no weight"
    # the average trails the live weights: every trained tensor lies strictly between the start and the last step
    for key in moved[:20]:
        plain_step = (plain_net[key] - start[key]).norm()
        averaged_step = (averaged_net[key] - start[key]).norm()
        assert 0 < averaged_step < plain_step, key
    assert not np.allclose(plain_head, averaged_head)


def test_fold_models_saved_before_a_setting_existed_are_still_reused() -> None:
    from cbmir.evaluation.cross_validation import _fold_identity, _without_weights_path

    config = TrainConfig(image_size=64)
    identity = _fold_identity(0, 5, "label", ["a", "b"], config, "sha")
    older = {**identity, "config": {k: v for k, v in identity["config"].items() if k != "ema_decay"}}
    assert _without_weights_path(older) == _without_weights_path(identity)
    averaged = _fold_identity(0, 5, "label", ["a", "b"], TrainConfig(image_size=64, ema_decay=0.99), "sha")
    assert _without_weights_path(older) != _without_weights_path(averaged)
