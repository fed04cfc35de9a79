"""ChunkRunner: one action per control step from a chunk policy, by receding horizon or by ACT's
temporal ensembling, checked against actions written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vla_ft import ChunkRunner

CHUNK = 4


class StubPolicy:
    """Predicts, at its n-th call, action ``10 n + k`` for chunk step k (dim 0) and a gripper dim 1
    that is closed (1.0) for k < 2 and open (0.0) after; the state is passed through untouched."""

    chunk = CHUNK

    def __init__(self):
        self.calls = 0

    def gripper_range(self):
        return [1], np.array([0.0]), np.array([1.0])  # dim 1: open at 0, closed at 1

    def predict_action(self, images, instruction, state):
        n, self.calls = self.calls, self.calls + 1
        k = np.arange(CHUNK)
        return np.stack([10.0 * n + k, (k < 2).astype(float)], axis=1).astype(np.float32)


def test_receding_horizon_sends_the_first_actions_of_each_chunk():
    policy = StubPolicy()
    runner = ChunkRunner(policy, execute=2)
    sent = [runner.act(None, "task", None) for _ in range(5)]
    assert [float(a[0]) for a in sent] == [0.0, 1.0, 10.0, 11.0, 20.0]
    assert policy.calls == 3 and all(a.dtype == np.float32 and a.shape == (2,) for a in sent)
    runner.reset()  # a new episode predicts afresh
    assert float(runner.act(None, "task", None)[0]) == 30.0 and policy.calls == 4


def test_temporal_ensembling_weights_the_oldest_prediction_most():
    m = 0.5
    runner = ChunkRunner(StubPolicy(), ensemble=m)
    sent = [runner.act(None, "task", None) for _ in range(6)]
    w = [1.0, math.exp(-0.5), math.exp(-1.0), math.exp(-1.5)]
    # step 2: the chunks of steps 0, 1, 2 predicted 2, 11 and 20 for it (their steps 2, 1 and 0)
    assert sent[2][0] == pytest.approx((2 * w[0] + 11 * w[1] + 20 * w[2]) / sum(w[:3]))
    # step 5: the chunk of step 1 ended at step 4; chunks 2..5 predicted 23, 32, 41 and 50
    assert sent[5][0] == pytest.approx((23 * w[0] + 32 * w[1] + 41 * w[2] + 50 * w[3]) / sum(w))
    assert sent[0][0] == 0.0


def test_an_ensembled_gripper_is_snapped_to_open_or_closed():
    runner = ChunkRunner(StubPolicy(), ensemble=0.0)  # equal weights
    grips = [float(runner.act(None, "task", None)[1]) for _ in range(4)]
    # step 2: closed (k=0, 1) from chunks 1, 2 and open (k=2) from chunk 0: mean 2/3 -> closed
    # step 3: open (k=3, 2) from chunks 0, 1, closed from chunks 2, 3: mean 1/2 -> the nearer of the
    # two is a tie, which goes to the open value (the dim's minimum)
    assert grips == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give execute (receding horizon) or ensemble"),
        ({"execute": 2, "ensemble": 0.1}, "give execute (receding horizon) or ensemble"),
        ({"execute": 5}, "execute: 5 actions per prediction, the policy predicts chunks of 4"),
        ({"execute": 0}, "execute: 0 actions per prediction"),
        ({"ensemble": -1.0}, "ensemble: the weights' decay m must be finite and >= 0, got -1.0"),
    ],
)
def test_settings_that_cannot_run_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ChunkRunner(StubPolicy(), **kwargs)
