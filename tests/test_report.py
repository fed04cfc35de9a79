"""The parameter report: ``vla-ft inspect`` and ``<run>/parameters.txt`` show what will train and how."""

from __future__ import annotations

from conftest import QUICKSTART, TINY

from vla_ft.cli import main as cli
from vla_ft.config import load_recipe

# Parameter counts of the TINY quickstart, worked out by hand from the layer shapes:
BLOCK = 64 + (32 * 96 + 96) + (32 * 32 + 32) + 64 + (32 * 128 + 128) + (128 * 32 + 32)  # norms, qkv, proj, mlp
VISION = (3 * 16 * 16 * 32 + 32) + 32 + 17 * 32 + BLOCK + 64  # patch conv, cls, pos (1 + 16), 1 block, norm
LM = 284 * 32 + (32 * 32 + 32) + 2 * (32 * 16 + 16) + 32 * 32 + 3 * 32 * 64 + 2 * 32 + 32  # embed, q/k/v/o, mlp, norms
LORA = 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32))  # r * (in + out) for q, k, v, o at rank 4
EXPECTED = {  # module: (params, trainable, lr, weight_decay, mode)
    "vision_encoder": (VISION, 0, "-", "-", "frozen"),
    "projector": (32 * 32 + 32, 0, "0.001", "0,0.01", "frozen->step 3"),
    "proprio_encoder": ((3 * 32 + 32) + (32 * 32 + 32), 1184, "0.001", "0,0.01", "full"),
    "language_model": (LM + LORA, LORA, "0.001", "0.01", "lora"),
    "action_queries": (3 * 32, 96, "0.001", "0", "full"),
    "action_head": ((32 * 32 + 32) + (32 * 3 + 3), 1155, "0.002", "0,0.01", "full"),
    "gripper_head": ((32 * 32 + 32) + (32 * 1 + 1), 1089, "0.001", "0,0.01", "full"),
}
OVERRIDES = [
    "freeze.vision_encoder=true",
    "freeze.projector=true",
    "unfreeze.projector.at_step=3",
    "model.lora.enabled=true",
    "model.lora.r=4",
]


def _rows(table: str) -> dict[str, tuple]:
    rows = {}
    for line in table.splitlines()[2:]:
        cells = line.split()
        if cells and cells[0] in EXPECTED:
            name, params, trainable, lr, wd, _dtype, *mode = cells
            rows[name] = (int(params.replace(",", "")), int(trainable.replace(",", "")), lr, wd, " ".join(mode))
    return rows


def test_inspect_prints_what_trains_and_how(tmp_path, capsys):
    assert cli(["inspect", str(QUICKSTART), *TINY, f"output_dir={tmp_path}", *OVERRIDES]) == 0
    table = capsys.readouterr().out
    assert _rows(table) == EXPECTED
    total = sum(v[0] for v in EXPECTED.values())
    train = sum(v[1] for v in EXPECTED.values())
    assert f"total {total:,} {train:,} {100 * train / total:.1f}% trainable" in " ".join(table.split())
    assert all(line.split()[5] == "float32" for line in table.splitlines()[2:-1])


def test_training_writes_the_same_table_before_the_first_step(tmp_path, capsys):
    from vla_ft.run_setup import setup, teardown

    assert cli(["inspect", str(QUICKSTART), *TINY, *OVERRIDES]) == 0
    printed = capsys.readouterr().out
    run = setup(load_recipe(QUICKSTART, [*TINY, f"output_dir={tmp_path / 'run'}", *OVERRIDES]))
    try:
        assert run.state.step == 0
        assert (tmp_path / "run" / "parameters.txt").read_text() == printed
    finally:
        teardown(run)
