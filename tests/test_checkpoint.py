"""Checkpoint directories: atomic writes, pointers, rotation, safe loading, and a bit-exact round trip."""

from __future__ import annotations

import errno
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICKSTART, TINY

from vla_ft import checkpoint as ck
from vla_ft.checkpoint import CheckpointError
from vla_ft.config import load_recipe
from vla_ft.run_setup import setup
from vla_ft.train import fit


def files(content: str):
    def write(tmp: Path) -> None:
        (tmp / "weights.bin").write_text(content)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "more.json").write_text("{}")

    return write


def test_a_checkpoint_appears_complete_and_pointed_at_or_not_at_all(tmp_path):
    root = tmp_path / "checkpoints"
    first = ck.write_checkpoint(root, 1, files("one"))
    assert first == root / "step_000001" and ck.is_complete(first)
    assert (root / "latest").read_text() == "step_000001"

    def fails_midway(tmp: Path) -> None:
        files("two")(tmp)
        raise ValueError("serialisation bug")

    with pytest.raises(ValueError, match="serialisation bug"):
        ck.write_checkpoint(root, 2, fails_midway)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
    assert (first / "weights.bin").read_text() == "one"
    assert ck.latest_checkpoint(root) == first


def test_complete_is_written_after_every_other_file_is_synced(tmp_path, monkeypatch):
    synced = []
    real = ck._fsync
    monkeypatch.setattr(ck, "_fsync", lambda p: synced.append(Path(p).name) or real(p))
    ck.write_checkpoint(tmp_path, 3, files("x"))
    assert synced[-3:] == [ck.COMPLETE, ".tmp_step_000003", tmp_path.name]  # the marker, its entry, the rename
    assert {"weights.bin", "more.json"} <= set(synced[:-3])


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    ],
)
def test_a_full_disk_names_the_space_needed(tmp_path, error):
    ck.write_checkpoint(tmp_path, 1, files("one"))

    def full(tmp: Path) -> None:
        (tmp / "partial").write_bytes(b"\0" * 1000)
        raise error

    with pytest.raises(CheckpointError, match=r"disk full .* needs about 3\.0 MiB .* earlier checkpoints are intact"):
        ck.write_checkpoint(tmp_path, 2, full, estimate_bytes=3 * 2**20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    ck.write_checkpoint(tmp_path, 5, files("old"))
    ck.write_checkpoint(tmp_path, 5, files("new"))
    assert (tmp_path / "step_000005" / "weights.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000005"]


def test_latest_prefers_the_newest_complete_directory_over_a_stale_pointer(tmp_path):
    for step in (1, 2):
        ck.write_checkpoint(tmp_path, step, files(str(step)))
    (tmp_path / "step_000003").mkdir()  # a directory without COMPLETE is never a checkpoint
    ck.write_pointer(tmp_path, "latest", "step_000003")
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_000002"
    ck.write_pointer(tmp_path, "latest", "step_000001")  # crash between the rename and the pointer update
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_000002"
    assert ck.latest_checkpoint(tmp_path / "missing") is None


def test_rotation_keeps_the_newest_the_best_and_the_resumed_from(tmp_path):
    for step in range(1, 7):
        ck.write_checkpoint(tmp_path, step, files(str(step)))
    (tmp_path / ".tmp_step_000007").mkdir()  # leftovers of a killed save
    (tmp_path / ".old_step_000003").mkdir()
    (tmp_path / ".dcp_step_000007").mkdir()  # FSDP shards staged by a killed save
    assert ck.rotate(tmp_path, 0, set()) == []  # keep_last 0 keeps all
    deleted = ck.rotate(tmp_path, 2, {tmp_path / "step_000002", tmp_path / "step_000004"})
    assert [p.name for p in deleted] == ["step_000001", "step_000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_000002",
        "step_000004",
        "step_000005",
        "step_000006",
    ]


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: unreadable") as refused:
        ck.torch_load(tmp_path / "evil.pt")
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)
    with pytest.raises(CheckpointError, match="missing"):
        ck.torch_load(tmp_path / "absent.pt")


def test_a_training_checkpoint_round_trips_bit_exactly(tmp_path):
    overrides = [
        *TINY,
        "train.steps=2",
        "train.val_every=0",
        "logging.tensorboard=false",
        "loss.strategy=uncertainty",
        f"output_dir={tmp_path / 'run'}",
    ]
    run = setup(load_recipe(QUICKSTART, overrides))
    np.random.rand(3), random.random()  # a library drawing from the global RNGs during the run
    fit(run)
    path = tmp_path / "run" / "checkpoints" / "step_000002"
    saved_rngs = np.random.get_state(), random.getstate()  # as the final checkpoint saved them
    np.random.seed(12345), random.seed(12345)  # whatever the process did since
    expected = {
        "model.safetensors",
        "model_meta.json",  # inference and export rebuild the model from these two
        "language_model",
        "optimizer.pt",
        "loss_state.safetensors",
        "rng.pt",
        "trainer_state.json",
        "norm_stats.json",
        "config.yaml",
        "tokenizer",
        "COMPLETE",
    }
    assert expected <= {p.name for p in path.iterdir()}

    back = setup(load_recipe(QUICKSTART, [*overrides, "train.resume=true"]))
    assert back.resumed_from == path and back.state == run.state
    for a, b in ((run.model, back.model), (run.loss_fn, back.loss_fn)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = run.optimizer.state_dict(), back.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for i, state in oa["state"].items():
        assert all(torch.equal(v, ob["state"][i][k]) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), ck.torch_load(path / "rng.pt")["cpu"])
    (np_saved, py_saved), np_now = saved_rngs, np.random.get_state()
    assert np_now[0] == np_saved[0] and np.array_equal(np_now[1], np_saved[1]) and np_now[2:] == np_saved[2:]
    assert random.getstate() == py_saved
    assert json.loads((path / "norm_stats.json").read_text()) == back.data.normalizer.to_dict()

    # a harmless recipe change on resume takes effect: the saved group settings do not override it
    with pytest.warns(UserWarning, match="changed keys: optim.lr"):
        changed = setup(load_recipe(QUICKSTART, [*overrides, "train.resume=true", "optim.lr=5.0e-4"]))
    base = {g["name"]: g["base_lr"] for g in changed.optimizer.param_groups}
    assert (base["projector"], base["action_head"]) == (5e-4, 2e-3)  # quickstart's own action-head LR stays
    assert all(
        torch.equal(v, changed.optimizer.state_dict()["state"][i][k])
        for i, s in oa["state"].items()
        for k, v in s.items()
    )


def test_a_resave_cut_between_its_renames_keeps_the_checkpoint_and_other_names_are_ignored(tmp_path):
    for step in (5, 10):
        ck.write_checkpoint(tmp_path, step, files(str(step)))
    (tmp_path / "step_000010").rename(tmp_path / ".old_step_000010")  # step 10 re-saved, cut after the first rename
    (tmp_path / "step_000002.bak").mkdir()  # a user's backup copy is not a checkpoint
    (tmp_path / "step_000002.bak" / ck.COMPLETE).write_text("2")
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_000010"
    assert (tmp_path / "step_000010" / "weights.bin").read_text() == "10"
    ck.write_checkpoint(tmp_path, 11, files("11"))
    assert ck.rotate(tmp_path, 2, set()) == [tmp_path / "step_000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000002.bak", "step_000010", "step_000011"]


def test_a_damaged_checkpoint_file_is_one_error_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "train.steps=2", "train.val_every=0", "logging.tensorboard=false", f"output_dir={run_dir}"]
    fit(setup(load_recipe(QUICKSTART, overrides)))
    step = run_dir / "checkpoints" / "step_000002"
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a crash cut the last row short: resuming drops it
    for name in ("model.safetensors", "trainer_state.json", "config.yaml"):
        saved = (step / name).read_bytes()
        (step / name).write_bytes(b"model: [\n" if name == "config.yaml" else saved[: len(saved) // 2])
        with pytest.raises(CheckpointError, match=f"{name}: unreadable") as refused:
            fit(setup(load_recipe(QUICKSTART, [*overrides, "train.resume=true", "train.steps=3"])))
        assert "nothing was changed" in str(refused.value)
        (step / name).write_bytes(saved)
    run = setup(load_recipe(QUICKSTART, [*overrides, "train.resume=true", "train.steps=3"]))
    fit(run)
    run.logger.close()
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1] == 3


def test_every_file_and_directory_is_synced_before_the_rename(tmp_path, monkeypatch):
    """After a power loss a renamed directory holding COMPLETE must hold every file: their names
    live in their directories (tokenizer/, language_model/), which are synced as the files are."""
    synced, renamed = [], []
    real_fsync, real_replace = ck._fsync, ck._replace_dir
    monkeypatch.setattr(ck, "_fsync", lambda p: synced.append(Path(p)) or real_fsync(p))
    monkeypatch.setattr(ck, "_replace_dir", lambda a, b: renamed.append(len(synced)) or real_replace(a, b))

    def write(tmp: Path) -> None:
        (tmp / "tokenizer" / "sub").mkdir(parents=True)
        (tmp / "tokenizer" / "sub" / "vocab.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"x")

    ck.write_dir_atomically(tmp_path / "step_000001", write, ("COMPLETE", "1"))
    tmp = tmp_path / ".tmp_step_000001"
    before = {p.relative_to(tmp) for p in synced[: renamed[0]] if p.is_relative_to(tmp)}
    want = {"tokenizer", "tokenizer/sub", "tokenizer/sub/vocab.json", "model.safetensors", "COMPLETE", "."}
    assert before == {Path(w) for w in want}
    assert synced[-1] == tmp_path  # the rename itself


def test_a_file_rewritten_atomically_survives_a_failed_write(tmp_path, monkeypatch):
    """metrics.jsonl (cut back on resume), run_summary.json and the sweep tables are rewritten so:
    a full disk mid-write keeps the old file, never a truncated one."""
    from vla_ft.ablate_table import read_summary

    path = tmp_path / "metrics.jsonl"
    ck.write_atomically(path, '{"step": 1}\n')
    real = Path.write_text

    def full(self, text, *a, **k):
        real(self, text[:3], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        ck.write_atomically(path, '{"step": 1}\n{"step": 2}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    (tmp_path / "run_summary.json").write_text('{"status": "fini')  # a file cut short before this change
    assert read_summary(tmp_path) == {}  # the variant runs again instead of the sweep failing
