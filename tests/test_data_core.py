"""Core data pipeline: stats, normaliser, splits, prompts, dataset samples, collate, augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robot_data import (
    READERS,
    SAMPLE_KEYS,
    SYNTHETIC_VOCAB,
    Normalizer,
    PromptTokenizer,
    RobotDataset,
    SyntheticReader,
    build_reader,
    collate,
    compute_stats,
    normalize,
    split_episodes,
)
from robot_data.language import bins_to_action
from robot_data.reader import EpisodeArrays
from robot_data.synthetic import DEFAULT_TEMPLATE


class WordTokenizer:
    """The HF tokenizer call convention, over the synthetic vocabulary (ids 3.., 2 = eos, 1 = unknown);
    it adds no special tokens, as Qwen's."""

    def __init__(self, eos: int | None = 2):
        self.vocab = {w: i + 3 for i, w in enumerate(SYNTHETIC_VOCAB)}
        self.eos_token_id = eos

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self.vocab.get(w, 1) for w in text.split()]}


class NanActions(SyntheticReader):
    """Synthetic episodes whose action at frame 3 is missing (NaN)."""

    def numeric(self, episode_index: int) -> EpisodeArrays:
        arrays = super().numeric(episode_index)
        arrays.action[3] = np.nan
        return arrays


class Untold(SyntheticReader):
    """Synthetic episodes without narration at frame 3 (a null text cell), and none at all in episode 5."""

    def numeric(self, episode_index: int) -> EpisodeArrays:
        arrays = super().numeric(episode_index)
        if episode_index == 5:
            arrays.text = None
        else:
            arrays.text[3] = None
        return arrays


@pytest.fixture(scope="module")
def reader() -> SyntheticReader:
    return SyntheticReader(episodes=8, episode_length=12, image_size=32)


@pytest.fixture(scope="module")
def stats(reader: SyntheticReader) -> dict:
    return compute_stats(reader, range(8))


def _dataset(reader, stats, **kw) -> RobotDataset:
    args = {
        "episodes": list(range(8)),
        "chunk": 4,
        "history": 2,
        "normalizer": Normalizer(stats, "mean_std", [2]),
        "image_size": 40,
        "prompt_tokenizer": PromptTokenizer(WordTokenizer(), DEFAULT_TEMPLATE, "text"),
    }
    return RobotDataset(reader, **{**args, **kw})


# ----------------------------------------------------------------------------- stats
def test_stats_match_numpy(reader, stats):
    for key in ("state", "action"):
        x = np.concatenate([getattr(reader.numeric(e), key) for e in range(8)]).astype(np.float64)
        s = stats[key]
        assert all(v.dtype == np.float32 and v.shape == (3,) for v in s.values())
        np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["std"], x.std(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["min"], x.min(0))
        np.testing.assert_allclose(s["max"], x.max(0))
        np.testing.assert_allclose(s["q01"], np.quantile(x, 0.01, axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["q99"], np.quantile(x, 0.99, axis=0), rtol=1e-5, atol=1e-6)
        assert np.all(s["count"] == len(x))


def test_stats_skip_nan():
    nan_reader = NanActions(episodes=2, episode_length=8)
    s = compute_stats(nan_reader, [0, 1])["action"]
    x = np.concatenate([nan_reader.numeric(e).action for e in (0, 1)]).astype(np.float64)
    assert np.all(s["count"] == 14)
    np.testing.assert_allclose(s["mean"], np.nanmean(x, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s["std"], np.nanstd(x, 0), rtol=1e-5, atol=1e-6)
    # a dim with no finite value at all (a missing sensor) gets neutral stats, never inf or NaN
    acc = normalize._Accumulator()
    acc.add(np.array([[1.0, np.nan], [3.0, np.nan]]))
    empty = acc.finish()
    assert all(empty[k][1] == 0 for k in empty) and empty["max"][0] == 3 and empty["q99"][0] > 2.9


def test_stats_stable_with_large_offset():
    class Offset(SyntheticReader):
        def numeric(self, episode_index: int) -> EpisodeArrays:
            arrays = super().numeric(episode_index)
            arrays.state = (arrays.state.astype(np.float64) * 1e-3 + 1e4).astype(np.float32)
            return arrays

    r = Offset(episodes=4)
    x = np.concatenate([r.numeric(e).state for e in range(4)]).astype(np.float64)
    np.testing.assert_allclose(compute_stats(r, range(4))["state"]["std"], x.std(0), rtol=1e-3)


def test_quantile_sample_is_not_copied_per_episode(monkeypatch):
    """Adding an episode must not copy the whole quantile sample (quadratic in the dataset's frames:
    400k rows took 11 s): the buffer grows by doubling up to QUANTILE_ROWS, then stays."""
    monkeypatch.setattr(normalize, "QUANTILE_ROWS", 64)
    acc = normalize._Accumulator()
    buffers = []
    for episode in range(200):
        acc.add(np.full((3, 2), episode, np.float32))
        buffers.append(acc.reservoir)  # kept alive, so two buffers never share an id
    assert len({id(b) for b in buffers}) == 6  # capacities 3, 6, 12, 24, 48, 64
    assert acc.reservoir.shape == (64, 2) and acc.fill == 64


def test_quantiles_past_the_cap_come_from_a_uniform_sample(monkeypatch):
    """Past QUANTILE_ROWS frames the quantiles come from a reservoir sample of every frame seen (not
    the first ones), the same for the same data."""
    monkeypatch.setattr(normalize, "QUANTILE_ROWS", 100)

    class Counting(SyntheticReader):
        def numeric(self, episode_index: int) -> EpisodeArrays:
            arrays = super().numeric(episode_index)
            arrays.action = (episode_index * 10 + np.arange(10, dtype=np.float32))[:, None].repeat(3, 1)
            return arrays

    reader = Counting(episodes=100, episode_length=10)  # actions 0..999, each once
    first = compute_stats(reader, range(100))["action"]
    assert first["q99"][0] > 900  # a sample of the first 100 frames would give 98.01
    assert first["max"][0] == 999 and first["count"][0] == 1000
    again = compute_stats(reader, range(100))["action"]
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_a_dim_missing_from_the_quantile_sample_takes_its_range(monkeypatch):
    """A dim with a few values among many frames (a sensor that reported briefly) may have none in
    the sample past QUANTILE_ROWS: its quantiles are then its min and max, never NaN, which would
    make every q01_q99-normalised action NaN and so masked out of the loss."""
    monkeypatch.setattr(normalize, "QUANTILE_ROWS", 100)
    x = np.random.default_rng(0).normal(size=(2000, 2))
    x[20:, 1] = np.nan
    acc = normalize._Accumulator()
    for part in np.split(x, 20):
        acc.add(part)
    s = acc.finish()
    assert s["count"][1] == 20
    np.testing.assert_allclose([s["q01"][1], s["q99"][1]], [np.nanmin(x[:, 1]), np.nanmax(x[:, 1])], rtol=1e-6)
    stats = {"state": s, "action": s}
    assert np.isfinite(Normalizer(stats, "q01_q99").normalize("action", x[:1].astype(np.float32))).all()
    shipped = {k: {**v, "q01": np.array([np.nan, 0.0], np.float32)} for k, v in stats.items()}  # NaN in a file
    np.testing.assert_array_equal(Normalizer(shipped, "q01_q99").normalize("action", np.ones((1, 2)))[0, 0], 1.0)


# ----------------------------------------------------------------------------- normaliser
@pytest.mark.parametrize("mode", ["mean_std", "min_max", "q01_q99", "none"])
def test_normalizer_round_trip(stats, reader, mode):
    norm = Normalizer(stats, mode, raw_action_dims=[2])
    x = reader.numeric(0).action
    y = norm.normalize("action", x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y[:, 2], x[:, 2])  # raw dim untouched
    np.testing.assert_allclose(norm.unnormalize("action", y), x, atol=1e-6)
    t = torch.from_numpy(x).double()
    yt = norm.normalize("action", t)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float64
    np.testing.assert_allclose(yt.numpy(), y, atol=1e-6)
    np.testing.assert_allclose(norm.unnormalize("action", yt).numpy(), x, atol=1e-6)


def test_normalizer_formulas(stats, reader):
    x = np.concatenate([reader.numeric(e).state for e in range(8)])
    s = stats["state"]
    expected = (x - s["mean"]) / s["std"]
    np.testing.assert_allclose(Normalizer(stats, "mean_std").normalize("state", x), expected, rtol=1e-5)
    y = Normalizer(stats, "min_max").normalize("state", x)
    np.testing.assert_allclose(y[:, :2].min(0), -1, atol=1e-5)
    np.testing.assert_allclose(y[:, :2].max(0), 1, atol=1e-5)
    # q01_q99 maps the data's own 1st/99th percentiles (numpy's, not the stats' min/max) onto -1/1
    q01, q99 = np.quantile(x.astype(np.float64), [0.01, 0.99], axis=0)
    expected = (x - (q99 + q01) / 2) / ((q99 - q01) / 2)
    np.testing.assert_allclose(Normalizer(stats, "q01_q99").normalize("state", x), expected, rtol=1e-4, atol=1e-5)


def test_raw_dims_leave_the_stats_untouched(reader):
    """Raw dims pass through (centre 0, scale 1), but their statistics stay what the data says:
    norm_stats.json and the mean-action baseline read them, and the caller's dict is not ours."""
    fresh = compute_stats(reader, range(8))
    mean = fresh["action"]["mean"].copy()
    assert mean[2] != 0
    norm = Normalizer(fresh, "mean_std", raw_action_dims=[2])
    np.testing.assert_array_equal(fresh["action"]["mean"], mean)
    np.testing.assert_array_equal(norm.stats["action"]["mean"], mean)
    assert norm.to_dict()["stats"]["action"]["mean"][2] == float(mean[2])
    x = reader.numeric(0).action
    expected = (x - mean) / fresh["action"]["std"]
    np.testing.assert_allclose(Normalizer(fresh, "mean_std").normalize("action", x), expected, rtol=1e-5)


def test_normalizer_guards_constant_dims(stats):
    flat = {k: {s: v.copy() for s, v in d.items()} for k, d in stats.items()}
    for s in ("std", "min", "max", "q01", "q99"):
        flat["state"][s][0] = 0.0 if s == "std" else 5.0
    flat["state"]["mean"][0] = 5.0
    # dim 1 nearly constant: a spread of 1e-7 (float rounding of a constant) is below EPS too
    flat["state"]["mean"][1], flat["state"]["std"][1] = 0.5, 1e-7
    for s, v in (("min", 0.5 - 1e-7), ("q01", 0.5 - 1e-7), ("max", 0.5 + 1e-7), ("q99", 0.5 + 1e-7)):
        flat["state"][s][1] = v
    for mode in ("mean_std", "min_max", "q01_q99"):
        y = Normalizer(flat, mode).normalize("state", np.array([[5.5, 0.75, 0.0]], np.float32))
        assert np.isfinite(y).all() and y[0, 0] == pytest.approx(0.5)  # scale 1, not 1/eps
        assert y[0, 1] == pytest.approx(0.25, abs=1e-6), mode


def test_normalizer_dict_round_trip_is_exact(stats):
    norm = Normalizer(stats, "q01_q99", raw_action_dims=[2], raw_state_dims=[2])
    again = Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again.to_dict() == norm.to_dict()
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    for key in ("state", "action"):
        np.testing.assert_array_equal(again.normalize(key, x), norm.normalize(key, x))


def test_normalizer_errors(stats):
    with pytest.raises(ValueError, match="mean_std, min_max, q01_q99, none"):
        Normalizer(stats, "zscore")
    with pytest.raises(ValueError, match="out of range"):
        Normalizer(stats, raw_action_dims=[7])
    with pytest.raises(ValueError, match="action has 3 dims"):
        Normalizer(stats).normalize("action", np.zeros((2, 5)))


# ----------------------------------------------------------------------------- splits
def test_split_deterministic_and_by_episode():
    eps = list(range(20))
    train, val = split_episodes(eps, 0.2, [], seed=1)
    assert (train, val) == split_episodes(list(reversed(eps)), 0.2, [], seed=1)
    assert len(val) == 4 and sorted(train + val) == eps
    assert split_episodes(eps, 0.2, [], seed=2) != (train, val)
    assert split_episodes(eps, 0.1, [3, 5], seed=1) == ([e for e in eps if e not in (3, 5)], [3, 5])
    assert split_episodes([0], 0.5) == ([0], [])  # at least one train episode
    assert split_episodes(eps, 0.0) == (eps, [])
    assert len(split_episodes(range(10), 0.17)[1]) == 2  # round(1.7), not int(1.7)


def test_split_errors():
    with pytest.raises(ValueError, match=r"unknown episode\(s\) \[7, 9\]"):
        split_episodes(range(5), 0.1, [9, 7, 1])
    with pytest.raises(ValueError, match="keep one for training"):
        split_episodes(range(2), 0.1, [0, 1])


# ----------------------------------------------------------------------------- prompts
def test_prompt_tokenizer_targets():
    tok = WordTokenizer()
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    acts, mask = np.array([[-1.0, 0.0, 1.0], [2.0, -0.999, 0.5]], np.float32), np.array([True, False])
    text_target = PromptTokenizer(tok, DEFAULT_TEMPLATE, "text")
    prompt, target = text_target("pick up the red block", "close gripper", acts, mask)
    assert prompt.dtype == target.dtype == np.int64
    assert prompt.tolist() == ids("what should the robot do to pick up the red block ?")
    assert target.tolist() == [*ids("close gripper"), 2]
    action_target = PromptTokenizer(tok, DEFAULT_TEMPLATE, "action_tokens", range(100, 356))
    _, target = action_target("pick up the red block", None, acts, mask)
    assert target.tolist() == [100, 228, 355, 2]  # bins 0, 128, 255 of the one valid step, then eos
    # a missing step in the middle ends the target: the steps after it would take its place
    gap = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], np.float32)
    _, target = action_target("pick up the red block", None, gap, np.array([True, False, True]))
    assert target.tolist() == [228, 228, 228, 2]
    assert action_target("pick up the red block", None, gap, np.array([False, True, True]))[1].shape == (0,)
    np.testing.assert_allclose(bins_to_action(np.array([0, 128, 255]), 256), [-1, 0, 1], atol=1 / 256)
    assert text_target("pick up the red block", None, acts, mask)[1].shape == (0,)  # no narration: no target
    no_target = PromptTokenizer(WordTokenizer(eos=None), DEFAULT_TEMPLATE, "none")
    _, target = no_target("pick up the red block", "hold", acts, mask)
    assert target.shape == (0,)
    with pytest.raises(ValueError, match="'do {task}' has no {instruction}"):
        PromptTokenizer(tok, "do {task}", "text")


@pytest.mark.parametrize("bos", [True, False])
def test_prompts_start_with_what_the_tokenizer_puts_first(tmp_path, bos):
    """Llama's and Gemma's tokenizers put a BOS before every text, the LM saw it at every sequence
    start, so prompts start with it; the EOS such a tokenizer appends does not end a prompt. Qwen's
    adds nothing, and nothing is added."""
    from tiny_models import save_tokenizer_dir
    from transformers import AutoTokenizer

    save_tokenizer_dir(tmp_path, bos=bos)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    words = tok("pick up the red block", add_special_tokens=False)["input_ids"]
    assert tok("pick up the red block")["input_ids"] == ([2, *words, 3] if bos else words)  # a real BOS rule
    prompts = PromptTokenizer(tok, "{instruction}", "text")
    prompt, target = prompts("pick up the red block", "close gripper", np.zeros((1, 3)), np.ones(1, bool))
    assert prompt.tolist() == ([2] if bos else []) + words
    assert target.tolist() == [*tok("close gripper", add_special_tokens=False)["input_ids"], 3]  # one eos
    as_recorded = PromptTokenizer(tok, "{instruction}", "none", prefix=[])  # a checkpoint that trained without
    assert as_recorded("pick up the red block", None, np.zeros((0, 3)), np.zeros(0, bool))[0].tolist() == words


# ----------------------------------------------------------------------------- dataset
def test_sample_keys_shapes_dtypes(reader, stats):
    ds = _dataset(reader, stats)
    assert len(ds) == 8 * 12
    s = ds[13]
    assert tuple(s) == SAMPLE_KEYS
    assert s["images"].shape == (1, 3, 40, 40) and s["images"].dtype == torch.uint8
    assert s["state"].shape == (2, 3) and s["state"].dtype == torch.float32
    assert s["actions"].shape == (4, 3) and s["action_mask"].dtype == torch.bool
    assert (int(s["episode_index"]), int(s["frame_index"]), int(s["index"])) == (1, 1, 13)
    raw = reader.numeric(1)
    norm = ds.normalizer
    np.testing.assert_allclose(s["actions"].numpy(), norm.normalize("action", raw.action[1:5]), atol=1e-6)
    np.testing.assert_allclose(s["state"].numpy(), norm.normalize("state", raw.state[0:2]), atol=1e-6)
    # The camera frame of time t itself (native size: no resize), channels first.
    native = _dataset(reader, stats, image_size=32)
    for index, (episode, t) in ((13, (1, 1)), (30, (2, 6))):
        frame = reader.frames(episode, reader.cameras[0], [t])[0]
        assert not np.array_equal(frame, reader.frames(episode, reader.cameras[0], [t - 1])[0])
        np.testing.assert_array_equal(native[index]["images"][0].numpy(), frame.transpose(2, 0, 1))


def test_chunk_padding_and_history_clamp(reader, stats):
    ds = _dataset(reader, stats, chunk=5, history=3, episodes=[2, 5])
    last = ds[12 + 10]  # episode 5, frame 10 of 12
    assert int(last["episode_index"]) == 5 and int(last["frame_index"]) == 10
    assert last["action_mask"].tolist() == [True, True, False, False, False]
    assert torch.equal(last["actions"][2:], last["actions"][1:2].expand(3, 3))  # last action repeated
    first = ds[12]  # episode 5, frame 0: history clamped at the episode start
    assert torch.equal(first["state"][0], first["state"][2]) and torch.equal(first["state"][1], first["state"][2])


def test_nan_actions_are_masked_and_zeroed(stats):
    ds = _dataset(NanActions(episodes=8, episode_length=12, image_size=32), stats, chunk=3)
    s = ds[2]  # frames 2, 3, 4 of episode 0; frame 3 is NaN
    assert s["action_mask"].tolist() == [True, False, True]
    assert torch.all(s["actions"][1] == 0)


def test_a_frame_without_text_has_no_language_target(stats):
    """A frame whose narration is missing trains no language output (an empty, fully masked target,
    not even eos); an episode with no text at all is an error naming it."""
    untold = Untold(episodes=8, episode_length=12, image_size=32)
    ds = _dataset(untold, stats, episodes=[0, 1, 5])
    assert ds[3]["target_ids"].tolist() == [] and len(ds[2]["target_ids"]) > 1 and len(ds[16]["target_ids"]) > 1
    batch = collate([ds[2], ds[3]])
    assert batch["target_mask"][1].sum() == 0 and batch["target_mask"][0].sum() == len(ds[2]["target_ids"])
    with pytest.raises(ValueError, match="language_target=text but episode 5 has no per-frame text"):
        ds[24]
    with pytest.raises(ValueError, match="episode 5 has no per-frame text"):
        _dataset(untold, stats, episodes=[5])


def test_dataset_errors(reader, stats):
    with pytest.raises(ValueError, match=r"unknown camera\(s\) \['wrist'\]; valid: observation.images.top"):
        _dataset(reader, stats, cameras=["wrist"])
    with pytest.raises(ValueError, match=r"unknown episode\(s\) \[99\]"):
        _dataset(reader, stats, episodes=[0, 99])
    with pytest.raises(ValueError, match="valid: synthetic, lerobot, hdf5"):
        build_reader("lerobott")
    assert isinstance(build_reader("synthetic", episodes=2), READERS["synthetic"])


def test_collate_pads_prompt_left_and_target_right(reader, stats):
    ds = _dataset(reader, stats)
    samples = [ds[0], ds[8]]  # "move ..." and "carry <colour> block": targets of different lengths
    batch = collate(samples, pad_id=0, pad_to_multiple=8)
    lengths = [len(s["target_ids"]) for s in samples]
    assert batch["target_ids"].shape[1] == 8 and batch["images"].shape == (2, 1, 3, 40, 40)
    for row, s in enumerate(samples):
        n = len(s["prompt_ids"])
        assert torch.equal(batch["prompt_ids"][row, -n:], s["prompt_ids"])
        assert batch["prompt_mask"][row].sum() == n and batch["prompt_mask"][row, -1]
        assert torch.equal(batch["target_ids"][row, : lengths[row]], s["target_ids"])
        assert batch["target_mask"][row].tolist() == [True] * lengths[row] + [False] * (8 - lengths[row])


def test_augmentation_train_only_reproducible_order_free(reader, stats):
    augment = {"crop_scale": [0.5, 0.9], "color_jitter": 0.3}
    plain = _dataset(reader, stats)
    val = _dataset(reader, stats, augment=augment, train=False)
    train_a = _dataset(reader, stats, augment=augment, train=True, seed=1)
    train_b = _dataset(reader, stats, augment=augment, train=True, seed=1)
    assert torch.equal(val[5]["images"], plain[5]["images"])
    assert not torch.equal(train_a[5]["images"], plain[5]["images"])
    forward = [train_a[i]["images"] for i in range(6)]
    backward = [train_b[i]["images"] for i in reversed(range(6))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(forward, backward, strict=True))
    train_b.set_epoch(1)
    assert not torch.equal(train_b[5]["images"], forward[5])
    off = _dataset(reader, stats, augment={**augment, "enabled": False}, train=True)
    assert torch.equal(off[5]["images"], plain[5]["images"])


def test_resize_is_bilinear_and_the_crop_box_stays_inside_the_image():
    from robot_data.images import ASPECT_RANGE, crop_box, resize

    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)  # 1-pixel black/white checkerboard
    small = resize(np.repeat(checker[..., None], 3, axis=2), 32)
    assert small.shape == (32, 32, 3) and np.abs(small.astype(int) - 128).max() <= 3  # averaged, not sampled
    rng = np.random.default_rng(0)
    for height, width in ((30, 200), (200, 30), (48, 64)):
        for _ in range(50):
            x0, y0, x1, y1 = crop_box(height, width, rng, (0.3, 0.6))
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (height, width)
            if (x1 - x0, y1 - y0) != (width, height):  # not the full-image fallback
                assert 0.3 - 1e-9 <= (x1 - x0) * (y1 - y0) / (height * width) <= 0.6 + 1e-9
                assert ASPECT_RANGE[0] - 1e-9 <= (x1 - x0) / (y1 - y0) <= ASPECT_RANGE[1] + 1e-9


def test_colour_jitter_above_1_never_inverts_an_image():
    """Factors are drawn from [max(0, 1 - s), 1 + s], as torchvision's ColorJitter: a strength of 1.5
    drew negative contrast factors, which turned images into their negatives."""
    from robot_data.images import color_jitter

    image = np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    rng = np.random.default_rng(1)
    for _ in range(200):
        out = color_jitter(image, rng, 1.5).astype(np.float64)
        if out.std() > 0:
            assert np.corrcoef(out.reshape(-1), image.reshape(-1))[0, 1] > 0


def test_colour_jitter_of_a_uniform_grey_image_rounds_its_brightness_to_nearest():
    """On a uniform grey image contrast (pivot = its own mean) and saturation change nothing, so
    each pixel becomes round(v * brightness), brightness being the first factor drawn."""
    from robot_data.images import color_jitter

    brightness = np.random.default_rng(1).uniform(0.7, 1.3, size=3)[0]
    for v in range(10, 250, 7):
        out = color_jitter(np.full((3, 8, 8), v, np.uint8), np.random.default_rng(1), 0.3)
        assert out.dtype == np.uint8 and (out == min(255, round(v * brightness))).all(), (v, brightness)


def test_workers_do_not_change_samples(reader, stats):
    ds = _dataset(reader, stats, augment={"crop_scale": [0.5, 1.0], "color_jitter": 0.2}, train=True)
    loaders = [torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate, num_workers=n) for n in (0, 2)]
    for a, b in zip(*loaders, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
