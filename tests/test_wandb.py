"""``logging.wandb``: the rows of ``metrics.jsonl`` in a Weights & Biases run (offline here: no network),
read back from the run's ``.wandb`` file, and a resume continuing the same run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import QUICKSTART, TINY
from train_helpers import metric_rows

from vla_ft.config import RecipeError, load_recipe
from vla_ft.train import main

pytest.importorskip("wandb")


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``run-<id>.wandb`` file: a 7-byte header (':W&B', magic, version),
    then LevelDB's log format (32 KiB blocks; records framed by crc32, uint16 length, type
    1 full / 2 first / 3 middle / 4 last)."""
    import wandb.proto.wandb_internal_pb2 as pb

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pb.Record.FromString(pending))
    return records


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records once the run's ``exit`` record is written: ``run.finish()`` may return before
    wandb's core process has flushed the file (seen on the 2-core CI box, not on a quiet machine)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = wandb_records(path)
        except Exception:  # noqa: BLE001 - a record still being written: read again
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def history(path: Path) -> dict[int, dict[str, float]]:
    rows = {}
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[row.pop("_step")] = row
    return rows


def run_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_run_logs_its_rows_and_recipe_to_wandb_and_a_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    common = [*TINY, "logging.every=1", "logging.tensorboard=false", "logging.wandb.enabled=true"]
    common += ["logging.wandb.tags=[ablation, tiny]", f"output_dir={run_dir}", "checkpoint.every=3"]
    main(load_recipe(QUICKSTART, [*common, "train.steps=3"]))
    (first,) = run_files(run_dir)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert first.name == f"run-{run_id}.wandb"
    rows = history(first)
    logged = {r["step"]: r for r in metric_rows(run_dir) if "loss" in r}
    assert sorted(rows) == [1, 2, 3]
    for step, row in logged.items():
        assert rows[step]["loss"] == pytest.approx(row["loss"], rel=1e-7)
    assert rows[3]["val/action_l1"] == pytest.approx(
        next(r for r in metric_rows(run_dir) if "val/action_l1" in r)["val/action_l1"]
    )
    run = next(r.run for r in finished_records(first) if r.WhichOneof("record_type") == "run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert (run.display_name, run.project, config["train"]["steps"]) == ("run", "vla-ft", 3)
    assert list(run.tags) == ["ablation", "tiny"]

    main(load_recipe(QUICKSTART, [*common, "train.steps=5", "train.resume=true"]))
    files = run_files(run_dir)
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # the same run, continued
    assert sorted(history(files[1])) == [4, 5]


def test_wandb_missing_is_named(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name))
    with pytest.raises(RecipeError, match=r"logging.wandb.enabled: needs wandb \(pip install 'vla-ft\[wandb\]'\)"):
        load_recipe(QUICKSTART, [*TINY, "logging.wandb.enabled=true", f"output_dir={tmp_path}"])


def test_an_ablations_variants_share_one_wandb_group(tmp_path):
    from vla_ft import ablate_variants

    overrides = [*TINY, f"output_dir={tmp_path / 'sweep'}"]
    _, planned = ablate_variants.plan(QUICKSTART, overrides, ["optim.lr=1e-3,3e-4"])
    assert [r.logging.wandb.group for _, r in planned] == ["sweep", "sweep"]
    _, planned = ablate_variants.plan(QUICKSTART, [*overrides, "logging.wandb.group=mine"], ["optim.lr=1e-3,3e-4"])
    assert [r.logging.wandb.group for _, r in planned] == ["mine", "mine"]
