"""Head-only runs on cached trunk features: the same numbers as the uncached run, the right
refusals, and a disk cache that is reused only while it is valid."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import ROOT, TINY
from tiny_models import save_lm_dir

from robot_data import collate
from vla_ft import feature_cache, train
from vla_ft.config import RecipeError, load_recipe
from vla_ft.model import VLA, pad_token_id
from vla_ft.run_setup import build_components, setup, teardown

HEAD_ONLY = ROOT / "recipes" / "head_only.yaml"
SHORT = [*TINY, "train.steps=4", "train.val_every=2", "checkpoint.every=2", "logging.tensorboard=false"]


def _recipe(tmp_path: Path, *extra: str):
    return load_recipe(HEAD_ONLY, [*SHORT, f"output_dir={tmp_path / 'run'}", *extra])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cached_and_uncached_head_only_runs_agree(tmp_path):
    results, rows = {}, {}
    for cached in (False, True):
        recipe = load_recipe(
            HEAD_ONLY, [*SHORT, f"output_dir={tmp_path / str(cached)}", f"train.cache_features={str(cached).lower()}"]
        )
        results[cached] = train.main(recipe)
        rows[cached] = _rows(tmp_path / str(cached))
    assert {"val/action_l1", "val/gripper_acc", "val/loss/action", "val/action_l1/h2"} <= results[True].keys()
    assert results[True].keys() == results[False].keys()
    for key, value in results[False].items():
        assert results[True][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    # Not just the end: every logged training loss and every validation agrees, step by step.
    for plain, cached in zip(rows[False], rows[True], strict=True):
        assert plain["step"] == cached["step"]
        for key in (k for k in plain if k.startswith(("loss", "val/"))):
            assert cached[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), (plain["step"], key)

    # The cached run, interrupted after its step-2 checkpoint and resumed, reaches the same numbers.
    ckpts = tmp_path / "True" / "checkpoints"
    shutil.rmtree(ckpts / "step_000004")
    (ckpts / "latest").write_text("step_000002")
    resumed = train.main(load_recipe(HEAD_ONLY, [*SHORT, f"output_dir={tmp_path / 'True'}", "train.resume=true"]))
    for key, value in results[True].items():
        assert resumed[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_cached_batches_hold_the_trunk_readout_and_no_images(tmp_path, monkeypatch):
    run = setup(_recipe(tmp_path))
    try:
        batch = next(iter(run.train_loader))
        assert set(batch) == {"readout", "actions", "action_mask", "episode_index", "frame_index", "index", "source"}
        # Reference: the same samples straight from the dataset, through the trunk in eval mode.
        samples = [run.data.train_set[i] for i in batch["index"].tolist()]
        reference = collate(samples, pad_id=pad_token_id(run.tokenizer))
        run.model.eval()
        with torch.no_grad():
            expected = run.model.trunk(reference)["readout"]
        assert batch["readout"].shape == (4, 3, 32)
        torch.testing.assert_close(batch["readout"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch["actions"], reference["actions"])
        assert torch.equal(batch["action_mask"], reference["action_mask"])
        # Same sample order as the uncached loader would use: the run's own sampler.
        run.sampler.set_epoch(0)
        assert batch["index"].tolist() == [i for _, i, _ in run.sampler][:4]
        # A batch size that does not divide the set: the last, partial batch is cached too.
        dataset = run.data.train_set
        monkeypatch.setattr(run.recipe.train, "batch_size", 6)
        assert len(dataset) % 6
        store = feature_cache.build_memory(run, dataset)
        assert len(store) == len(dataset)
        last = store.batch(torch.tensor([len(dataset) - 1]))
        with torch.no_grad():
            expected = run.model.trunk(collate([dataset[len(dataset) - 1]], pad_id=pad_token_id(run.tokenizer)))
        torch.testing.assert_close(last["readout"], expected["readout"], rtol=1e-5, atol=1e-6)
        assert last["index"].tolist() == [len(dataset) - 1]
    finally:
        teardown(run)


def test_disk_cache_is_sharded_reused_and_rebuilt_when_stale(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    recipe = _recipe(tmp_path, f"train.feature_cache_dir={cache_dir}")
    run = setup(recipe)
    try:
        dataset = run.data.train_set
        per_row = 3 * 32 * 4  # (C, D) fp32 bytes of one readout row
        monkeypatch.setattr(feature_cache, "SHARD_BYTES", 7 * per_row)  # 7 rows per shard: several shards
        store, built = feature_cache.disk_store(run, "shardtest", dataset, cache_dir)
        assert built and len(store) == len(dataset) == 40
        manifest = json.loads((cache_dir / "shardtest" / "manifest.json").read_text())
        assert manifest["shard_size"] == 7 and len(manifest["shards"]) == math.ceil(40 / 7)
        memory = feature_cache.build_memory(run, dataset)
        idx = torch.tensor([39, 0, 7, 6, 13, 14, 22])  # across shard boundaries, unordered
        from_disk, from_memory = store.batch(idx), memory.batch(idx)
        assert from_disk.keys() == from_memory.keys()
        for key in from_memory:
            assert torch.equal(from_disk[key], from_memory[key]), key

        _, built_again = feature_cache.disk_store(run, "shardtest", dataset, cache_dir)
        assert not built_again  # same weights and data: reused
        with torch.no_grad():
            run.model.projector.weight.add_(0.01)  # other trunk weights: the cache is stale
        manifest = (cache_dir / "shardtest" / "manifest.json").read_text()
        with monkeypatch.context() as m:  # a rebuild cut short keeps the cache there was
            m.setattr(feature_cache, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
            with pytest.raises(KeyboardInterrupt):
                feature_cache.disk_store(run, "shardtest", dataset, cache_dir)
        assert (cache_dir / "shardtest" / "manifest.json").read_text() == manifest
        assert not [p for p in cache_dir.iterdir() if "tmp" in p.name]
        changed, rebuilt = feature_cache.disk_store(run, "shardtest", dataset, cache_dir)
        assert rebuilt
        assert not torch.equal(changed.batch(idx)["readout"], from_disk["readout"])
    finally:
        teardown(run)


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda d: (d / "manifest.json").write_text('{"fingerprint": "ab'), "unreadable manifest.json"),
        (lambda d: (d / "manifest.json").write_text("[]"), "unreadable manifest.json"),
        (lambda d: (d / "readout_00000.safetensors").unlink(), "lacks readout_00000.safetensors"),
        (lambda d: (d / "labels.safetensors").unlink(), "lacks labels.safetensors"),
    ],
    ids=["cut-short", "not-a-mapping", "lost-shard", "lost-labels"],
)
def test_a_damaged_disk_cache_is_rebuilt_saying_why(tmp_path, damage, said):
    """A manifest cut short (a full disk) or a shard deleted by hand: the run rebuilds the cache."""
    cache_dir = tmp_path / "cache"
    run = setup(_recipe(tmp_path, f"train.feature_cache_dir={cache_dir}"))
    said_lines: list[str] = []
    run.progress = SimpleNamespace(write=said_lines.append)
    try:
        dataset = run.data.train_set
        store, _ = feature_cache.disk_store(run, "train", dataset, cache_dir)
        idx = torch.arange(len(dataset))
        whole = store.batch(idx)
        damage(cache_dir / "train")
        rebuilt, built = feature_cache.disk_store(run, "train", dataset, cache_dir)
        assert built and any(said in line and "rebuilding" in line for line in said_lines), said_lines
        for key, value in rebuilt.batch(idx).items():
            assert torch.equal(value, whole[key]), key
    finally:
        teardown(run)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_feature_cache_dir_holding_a_users_own_split_folder_is_refused_and_kept(tmp_path, split):
    """A ``train/`` or ``val/`` that is not a cache (a user's data) is never replaced by a cache."""
    cache_dir = tmp_path / "mine"
    (cache_dir / split).mkdir(parents=True)
    (cache_dir / split / "episode_0.hdf5").write_text("the user's only copy")
    (cache_dir / split / "manifest.json").write_text("{}")  # a manifest of their own does not make it a cache
    with pytest.raises(RecipeError) as err:
        train.main(_recipe(tmp_path, f"train.feature_cache_dir={cache_dir}"))
    assert str(cache_dir / split) in str(err.value)
    assert "train.feature_cache_dir" in str(err.value) and "episode_0.hdf5" in str(err.value)
    assert (cache_dir / split / "episode_0.hdf5").read_text() == "the user's only copy"
    assert sorted(p.name for p in cache_dir.iterdir()) == [split]  # nothing written next to it either


def test_a_feature_cache_dir_whose_split_is_a_file_is_refused(tmp_path):
    cache_dir = tmp_path / "mine"
    cache_dir.mkdir()
    (cache_dir / "train").write_text("notes")
    with pytest.raises(RecipeError, match="is not a folder"):
        train.main(_recipe(tmp_path, f"train.feature_cache_dir={cache_dir}"))
    assert (cache_dir / "train").read_text() == "notes"


def test_a_cache_that_lost_only_its_manifest_is_rebuilt(tmp_path):
    """Every entry named like a cache file: a damaged cache, rebuilt rather than refused."""
    cache_dir = tmp_path / "cache"
    run = setup(_recipe(tmp_path, f"train.feature_cache_dir={cache_dir}"))
    try:
        feature_cache.disk_store(run, "train", run.data.train_set, cache_dir)
        (cache_dir / "train" / "manifest.json").unlink()
        store, built = feature_cache.disk_store(run, "train", run.data.train_set, cache_dir)
        assert built and len(store) == len(run.data.train_set)
    finally:
        teardown(run)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["data.augment.enabled=true"], "because data.augment.enabled is true"),
        (["freeze.projector=false"], "because freeze.projector is false"),
        (["freeze.action_queries=false"], "because freeze.action_queries is false"),
        (["unfreeze.language_model.at_step=2"], "because unfreeze.language_model trains the trunk from step 2"),
        (["model.lora.enabled=true"], "because model.lora.enabled is true"),
        (["model.lora.vision=true"], "because model.lora.vision is true"),
        (["data.language_target=text", "loss.weights.language=0.1"], "set loss.weights.language: 0"),
    ],
)
def test_cache_refused_with_the_key_that_blocks_it(overrides, why):
    with pytest.raises(RecipeError) as err:
        load_recipe(HEAD_ONLY, [*TINY, *overrides])
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("train.cache_features: refused because")
    assert why in err.value.problems[0]
    load_recipe(HEAD_ONLY, [*TINY, *overrides, "train.cache_features=false"])  # fine without the cache


def test_the_cache_asks_whether_a_language_ramp_ever_weighs_the_term():
    """Under loss.strategy=scheduled a language ramp replaces loss.weights.language at every step: one
    held at 0 never runs the LM (was refused for the static 0.1), one from 0 up does (refused, naming it)."""
    ramp = ["data.language_target=text", "loss.weights.language=0.1", "loss.strategy=scheduled"]
    load_recipe(HEAD_ONLY, [*TINY, *ramp, "loss.schedule.language.start=0", "loss.schedule.language.end=0"])
    with pytest.raises(RecipeError, match="hold loss.schedule.language at 0 or remove it"):
        load_recipe(HEAD_ONLY, [*TINY, *ramp, "loss.weights.language=0", "loss.schedule.language.end=1"])


def test_cache_refused_when_dropout_is_active_in_the_trunk(monkeypatch):
    recipe = load_recipe(
        HEAD_ONLY, [*TINY, "model.vision.kwargs.drop_rate=0.1", "model.language.config.attention_dropout=0.1"]
    )
    model, *_ = build_components(recipe, torch.device("cpu"))
    model.set_frozen({"vision_encoder", "projector", "proprio_encoder", "language_model", "action_queries"})
    model.eval()
    run = SimpleNamespace(recipe=recipe, model=model)
    # Frozen modules run in eval mode in the loop, so configured dropout is inactive: caching is exact.
    assert feature_cache.stochastic_trunk_layers(model) == []
    feature_cache.check_cacheable(run)
    assert model.training is False  # the check leaves the mode as it found it

    # A trunk that would still sample while training (here: VLA.train no longer keeps frozen
    # modules in eval) makes cached features differ from the live trunk: refused.
    monkeypatch.setattr(VLA, "train", torch.nn.Module.train)
    layers = feature_cache.stochastic_trunk_layers(model)
    assert any(name.startswith("vision_encoder.") and name.endswith("_drop") for name in layers)
    assert any(name.startswith("language_model.") and name.endswith("self_attn") for name in layers)
    with pytest.raises(RecipeError, match="dropout is active in the trunk"):
        feature_cache.check_cacheable(run)


def test_a_dataset_edited_in_place_changes_the_fingerprint_and_the_caches_do_not(tmp_path):
    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    (data / "episode_0.hdf5").write_bytes(b"x" * 100)
    (data / "videos" / "a.mp4").write_bytes(b"y" * 10)
    hdf5 = ["data.format=hdf5", "data.layout=aloha"]  # data.path is read by the recorded formats only
    recipe = _recipe(tmp_path, *hdf5, f"data.path={data}", f"data.frame_cache={data / 'frames'}")
    before = feature_cache.data_files(recipe)
    assert [f[0] for f in before] == ["episode_0.hdf5", "videos/a.mp4"]
    (data / "frames").mkdir()
    (data / "frames" / "decoded.npy").write_bytes(b"z")  # the frame cache filling up: not the data
    assert feature_cache.data_files(recipe) == before
    os.utime(data / "episode_0.hdf5", ns=(0, 123))  # rewritten in place, same size
    assert feature_cache.data_files(recipe) != before


def test_an_lm_config_edited_next_to_its_weights_or_a_library_upgrade_changes_the_fingerprint(tmp_path):
    # model.language.name names a directory: the recipe and the weights stay the same while its
    # config.json changes what the LM computes, so the cached readout would be stale.
    save_lm_dir(tmp_path / "lm")
    lm = [f"model.language.name={tmp_path / 'lm'}", "model.language.config={}"]

    def key_and_readout(name: str) -> tuple[str, torch.Tensor]:
        run = setup(load_recipe(HEAD_ONLY, [*SHORT, f"output_dir={tmp_path / name}", *lm]))
        try:
            readout = feature_cache.build_memory(run, run.data.train_set).tensors["readout"]
            return feature_cache.fingerprint(run, "train", run.data.train_set), readout
        finally:
            teardown(run)

    key, readout = key_and_readout("a")
    assert key_and_readout("b")[0] == key  # the same model again: reused
    version = importlib.metadata.version
    with mock.patch("importlib.metadata.version", lambda name: "99.0" if name == "timm" else version(name)):
        assert key_and_readout("timm_upgraded")[0] != key  # a new timm may run the backbone otherwise
    with mock.patch("vla_ft.__version__", "99.0"):
        assert key_and_readout("vla_ft_upgraded")[0] != key  # so may a new vla-ft
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (tmp_path / "lm" / "config.json").write_text(json.dumps(config))
    edited_key, edited = key_and_readout("c")
    assert not torch.allclose(edited, readout, atol=1e-3)  # the edit matters to the trunk...
    assert edited_key != key  # ...so the cache built before it is not served


def test_the_fingerprint_follows_the_tokenizers_rules_and_not_the_seed(tmp_path):
    """Same vocabulary, another normaliser: other prompt ids, so another key. Another seed with the
    same trunk weights and split: the same readout, so the same key (a seed sweep shares the cache)."""
    import dataclasses

    from tokenizers import normalizers

    run = setup(load_recipe(HEAD_ONLY, [*SHORT, f"output_dir={tmp_path / 'a'}"]))
    try:
        key = feature_cache.fingerprint(run, "train", run.data.train_set)
        train = run.recipe.train
        run.recipe.train = dataclasses.replace(train, seed=train.seed + 1)
        assert feature_cache.fingerprint(run, "train", run.data.train_set) == key
        run.recipe.train = train
        before = run.tokenizer("pick up the red block")["input_ids"]
        run.tokenizer.backend_tokenizer.normalizer = normalizers.Replace("red", "green")
        assert run.tokenizer("pick up the red block")["input_ids"] != before
        assert feature_cache.fingerprint(run, "train", run.data.train_set) != key
    finally:
        teardown(run)


def test_files_in_a_symlinked_folder_of_the_dataset_are_part_of_the_fingerprint(tmp_path):
    data, videos = tmp_path / "data", tmp_path / "other_disk" / "videos"
    data.mkdir()
    videos.mkdir(parents=True)
    (data / "episode_0.hdf5").write_bytes(b"x" * 100)
    (videos / "a.mp4").write_bytes(b"y" * 10)
    (data / "videos").symlink_to(videos, target_is_directory=True)
    (videos / "loop").symlink_to(data, target_is_directory=True)  # a link cycle is walked once
    recipe = _recipe(tmp_path, "data.format=hdf5", "data.layout=aloha", f"data.path={data}")
    before = feature_cache.data_files(recipe)
    assert [f[0] for f in before] == ["episode_0.hdf5", "videos/a.mp4"]
    (videos / "a.mp4").write_bytes(b"z" * 12)  # the videos re-encoded on the other disk
    assert feature_cache.data_files(recipe) != before


def test_a_disk_cache_is_shared_by_runs_that_differ_only_in_their_heads(tmp_path, monkeypatch):
    cache_dir, builds = tmp_path / "cache", []
    write_disk = feature_cache.write_disk
    monkeypatch.setattr(
        feature_cache, "write_disk", lambda run, ds, d, key: builds.append(d.name) or write_disk(run, ds, d, key)
    )

    def cached(name: str, *extra: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(every cached train sample, the dataset's own actions (N, C, A)) of a run set up with ``extra``."""
        builds.clear()
        run = setup(_recipe(tmp_path / name, f"train.feature_cache_dir={cache_dir}", *extra))
        try:
            store = feature_cache.DiskFeatures(cache_dir / "train")
            actions = torch.stack([run.data.train_set[i]["actions"] for i in range(len(store))])
            return store.batch(torch.arange(len(store))), actions
        finally:
            teardown(run)

    first, _ = cached("a")
    assert builds == ["train", "val"]
    wider, _ = cached("b", "model.action_head_hidden=64")  # a head sweep: the trunk is the same
    assert builds == []
    assert torch.equal(wider["readout"], first["readout"])
    # Without the gripper head its dims are normalised like the others: the labels change, so it rebuilds.
    plain, actions = cached("c", "model.gripper_head=false", "loss.weights.gripper=0")
    assert builds == ["train", "val"]
    torch.testing.assert_close(plain["actions"], actions)
    assert not torch.allclose(plain["actions"], first["actions"])
