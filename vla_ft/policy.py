"""Inference: a trained VLA as a robot policy, loaded from a checkpoint or export directory alone.

::

    from vla_ft import VLAPolicy

    policy = VLAPolicy.from_pretrained("runs/quickstart")      # newest checkpoint of a run
    # or "runs/quickstart/checkpoints/best" (best validation metric), ".../step_000200", an export
    actions = policy.predict_action({"observation.images.top": frame}, "pick up the red block", state)
    # actions: (chunk, action_dim) float32 numpy, in the dataset's units
    # a run with data.normalize_per_source: VLAPolicy.from_pretrained(path, source="franka")
    policy.fps  # the control rate it trained at (Hz): one action every 1 / fps s; None if unrecorded

Inputs are prepared exactly as in training: frames are resized with :mod:`robot_data.images`,
the state is normalised and the prompt tokenised with the checkpoint's own statistics,
template and tokenizer; outputs are de-normalised with :func:`vla_ft.metrics.real_actions`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robot_data import Normalizer, PromptTokenizer, load_normalizer
from robot_data.images import resize, to_chw
from vla_ft import checkpoint as ck
from vla_ft.execution import PolicyShape
from vla_ft.master_weights import cast_parameters
from vla_ft.metrics import real_actions
from vla_ft.model import VLA, pad_token_id
from vla_ft.model_files import (
    META_FILE,
    NORM_STATS,
    load_model,
    load_saved_tokenizer,
    read_model_meta,
    read_norm_stats,
    recorded_prompt_prefix,
)

Frames = np.ndarray | torch.Tensor
ImagesLike = Mapping[str, Frames] | Sequence[Frames] | Frames
POINTERS = ("latest", "best")  # files in <run>/checkpoints naming a checkpoint (see vla_ft.checkpoint)
# The weight dtypes a policy runs in: fp32, or half precision under autocast (fp64 has no autocast).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_directory(path: str | Path) -> Path:
    """The checkpoint or export directory that ``path`` names.

    ``path`` is a checkpoint (``<run>/checkpoints/step_N``; only a complete one), an export, a
    pointer file ``<run>/checkpoints/best`` or ``latest`` (the checkpoint it names), or a run
    directory or its ``checkpoints/`` (the newest complete checkpoint).
    """
    path = Path(path).expanduser()
    if path.name in POINTERS and path.is_file():
        return _follow_pointer(path)
    if (path / META_FILE).is_file():
        check_complete(path)
        return path
    latest = ck.latest_checkpoint(path / "checkpoints") or ck.latest_checkpoint(path)  # a run or its checkpoints/
    if latest is not None:
        return latest
    if not path.exists():
        raise FileNotFoundError(f"VLAPolicy: no such directory: {path}")
    raise ck.CheckpointError(f"VLAPolicy: {path} holds no {META_FILE} and no complete checkpoint under checkpoints/")


def _follow_pointer(pointer: Path) -> Path:
    """The complete checkpoint ``<run>/checkpoints/<pointer>`` names; ``latest`` as a run directory resolves it."""
    root = pointer.parent
    target = ck.latest_checkpoint(root) if pointer.name == "latest" else ck.read_pointer(root, pointer.name)
    if target is None:
        raise ck.CheckpointError(
            f"{pointer} names '{pointer.read_text().strip()}', which is not a complete checkpoint in {root}"
        )
    return target


def check_complete(directory: Path) -> None:
    """Refuse a checkpoint whose save did not finish.

    A checkpoint is written under ``.tmp_step_N`` and vouched for by its ``COMPLETE`` file,
    written last (:func:`vla_ft.checkpoint.write_checkpoint`). An export has no such file: it is
    written under ``.tmp_<name>`` and renamed when whole (:func:`vla_ft.export.export_policy`),
    and its ``model_meta.json`` says ``"merged": true``. So a ``.tmp_`` name is an unfinished
    write of either, and a checkpoint without ``COMPLETE`` one that was interrupted or is running.
    """
    run = directory.parent.parent if directory.parent.name == "checkpoints" else None
    advice = f"load the run directory {run} (its newest complete checkpoint)" if run else "load a complete one"
    if directory.name.startswith(".tmp_"):
        raise ck.CheckpointError(f"{directory} is an unfinished save or export (a temporary directory); {advice}")
    if not ck.is_complete(directory) and not read_model_meta(directory)["merged"]:
        raise ck.CheckpointError(
            f"{directory} is an incomplete checkpoint: it lacks the {ck.COMPLETE} file a save writes last "
            f"(the save was interrupted, or is still running); {advice}"
        )


def check_device(device: str | torch.device) -> torch.device:
    """``device`` parsed, refused where no policy can run: a name torch does not know (``cpuu``),
    ``meta`` (shapes without values: the load passed and every prediction failed), or a GPU this
    machine lacks. Messages start with the argument's name, ``device:``, as the CLI's flag."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type == "meta":
        raise ValueError("device: meta holds no values, so nothing can be predicted on it; use cpu or cuda")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} asked, but this torch sees no GPU (torch.cuda.is_available() is False)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device} asked, but this machine has {torch.cuda.device_count()} GPU(s)")
    backend = getattr(torch, parsed.type, None)  # torch.cuda, torch.mps, torch.xpu: each says if it is there
    if parsed.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise ValueError(f"device: {device} asked, but this torch has no {parsed.type} device; use cpu or cuda")
    return parsed


def _as_array(frames: Any) -> np.ndarray:
    """Numpy from numpy, lists or torch tensors (on any device: camera pipelines often keep frames on the GPU)."""
    return frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)


def _real_numbers(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as float32; strings (numpy's "could not convert string to float" named no input)
    and complex numbers (their imaginary part silently dropped) are a ValueError naming ``name``."""
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected real numbers, got {values.dtype} {tuple(values.shape)}")
    return values.astype(np.float32, copy=False)


def camera_frames(cameras: Sequence[str], images: ImagesLike) -> list[np.ndarray]:
    """``images`` as :meth:`VLAPolicy.predict_action` takes them -> one numpy array per camera, in
    the order of ``cameras``."""
    if isinstance(images, Mapping):
        if set(images) != set(cameras):
            raise ValueError(f"images: expected cameras {list(cameras)}, got {sorted(images)}")
        return [_as_array(images[c]) for c in cameras]
    if isinstance(images, np.ndarray | torch.Tensor):
        if len(cameras) != 1:
            raise ValueError(f"images: this policy needs {len(cameras)} cameras {list(cameras)}; pass a dict or a list")
        return [_as_array(images)]
    if len(images) != len(cameras):
        raise ValueError(f"images: this policy needs {len(cameras)} camera(s) {list(cameras)}, got {len(images)}")
    return [_as_array(x) for x in images]


class VLAPolicy(PolicyShape):
    """Camera frames + instruction + robot state -> a chunk of actions in the dataset's units, one
    action per ``1 /`` :attr:`fps` seconds (the training data's control rate, None when unrecorded)."""

    def __init__(
        self,
        model: VLA,
        meta: dict[str, Any],
        normalizer: Normalizer,
        tokenizer: Any,
        device: torch.device,
        directory: Path | None = None,
        source: str | None = None,
    ):
        self.model, self.meta, self.normalizer, self.device = model, meta, normalizer, device
        self.directory = directory  # where the weights came from, for errors
        self.source = source  # the mixture source whose statistics it uses (per-source statistics)
        self.dtype = next(model.parameters()).dtype
        prefix = recorded_prompt_prefix(meta)  # the prompt's leading ids (a BOS) as trained
        self.prompts = PromptTokenizer(tokenizer, meta["prompt_template"], "none", prefix=prefix)
        self.pad_id = pad_token_id(tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        ema: bool = True,
        source: str | None = None,
    ) -> VLAPolicy:
        """Load from a checkpoint (``<run>/checkpoints/step_N``), ``<run>/checkpoints/best``, a run
        directory (its newest checkpoint) or an export; see :func:`resolve_directory`.

        ``dtype``: of the weights; ``torch.bfloat16`` halves the memory and runs the matmuls in
        bf16 on a GPU (under autocast, as mixed-precision training does), at bf16's precision.
        ``ema``: a run with ``train.ema_decay`` saved the average of its weights too; the policy
        acts with it (what validation measured) unless ``ema`` is False.
        ``source``: a run trained with ``data.normalize_per_source`` holds statistics per mixture
        source; the policy drives one robot and takes its statistics (:attr:`sources` lists them).
        """
        if dtype not in DTYPES:  # a float64 model loaded, then failed inside autocast at the first prediction
            names = ", ".join(map(str, DTYPES))
            raise ValueError(f"dtype: the weights run in one of {names}, got {dtype!r}")
        device = check_device(device)
        directory = resolve_directory(path)
        normalizer = load_normalizer(read_norm_stats(directory)).for_source(source)  # before the weights load
        model, meta = load_model(directory, device, ema)
        cast_parameters(model, dtype)  # as training with train.param_dtype=bf16 does
        tokenizer = load_saved_tokenizer(directory)
        return cls(model, meta, normalizer, tokenizer, device, directory, source)

    def gripper_range(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        """The gripper action dims and the dataset's min and max there (its open and closed values)."""
        dims, stats = list(self.meta["gripper"]["dims"]), self.normalizer.stats["action"]
        return dims, stats["min"][dims], stats["max"][dims]

    @torch.no_grad()
    def predict_action(
        self, images: ImagesLike, instruction: str | Sequence[str], state: np.ndarray | torch.Tensor
    ) -> np.ndarray:
        """Actions for one observation, or a batch of them.

        images: one uint8 RGB frame per camera, ``(H, W, 3)``, or ``(B, H, W, 3)`` for a batch,
            as numpy arrays or torch tensors (any device); a dict ``{camera: frame}`` with the cameras
            of :attr:`cameras`, a list in that order, or a bare array or tensor when the policy has
            one camera. Any H, W: frames are resized as in training.
        instruction: the task in words; for a batch, one string for all or one per row.
        state: raw robot state in dataset units, ``(S,)`` or ``(history, S)`` (oldest first);
            with a batch ``(B, S)`` or ``(B, history, S)``.
        Returns float32 ``(chunk, action_dim)``, or ``(B, chunk, action_dim)`` for a batch, in the
        dataset's units, gripper dims as the dataset's open/closed values; absolute also where
        the model was trained on delta actions (``data.delta_action_dims``: the state of the
        current frame, the last history row, is added back). Non-finite outputs
        (damaged weights or statistics) are a :class:`~vla_ft.checkpoint.CheckpointError`, never
        actions: a NaN gripper logit would otherwise read as "open".
        """
        per_camera = camera_frames(self.cameras, images)
        batched = per_camera[0].ndim == 4
        if batched and per_camera[0].shape[0] == 0:
            raise ValueError("images: a batch of 0 frames; send at least one observation")
        pixels = self._pixels(per_camera, batched)
        b = pixels.shape[0]
        raw_state = self._raw_state(_real_numbers(_as_array(state), "state"), b, batched)
        batch = {"images": pixels, "state": self._state(raw_state), **self._prompt(instruction, b)}
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            outputs = self.model.heads(self.model.trunk(batch)["readout"])
        bad = [k for k, v in outputs.items() if not torch.isfinite(v).all()]
        self._check_finite(bad, "its weights are damaged (e.g. saved from a diverged run)")
        actions = real_actions(
            outputs,
            self.normalizer,
            self.meta["gripper"]["dims"],
            self.meta["gripper"]["closed_is_high"],
        )
        actions = self.normalizer.absolute_actions(actions, torch.tensor(raw_state[:, -1])).numpy()
        bad = [] if np.isfinite(actions).all() else ["actions in dataset units"]
        self._check_finite(bad, f"its {NORM_STATS} holds non-finite statistics")
        return actions if batched else actions[0]

    def _check_finite(self, bad: list[str], cause: str) -> None:
        """Inputs are finite by construction (uint8 frames, a state with NaN zeroed as in training),
        so non-finite ``bad`` outputs come from the checkpoint: ``cause`` says which part."""
        if bad:
            where = self.directory if self.directory is not None else "this policy"
            raise ck.CheckpointError(
                f"VLAPolicy: the model of {where} predicted non-finite {', '.join(bad)} (NaN or inf) from finite "
                f"inputs: {cause}; load another checkpoint"
            )

    # ------------------------------------------------------------------ input preparation
    def _pixels(self, per_camera: list[np.ndarray], batched: bool) -> torch.Tensor:
        """Per-camera frames -> (B, n_cam, 3, S, S) uint8, resized like the training data.

        Cameras may differ in resolution; every camera must hold B frames.
        """
        b, size = (per_camera[0].shape[0] if batched else 1), self.meta["image_size"]
        out = []
        for name, given in zip(self.cameras, per_camera, strict=True):
            frames = given if batched else given[None]
            shape = frames.shape
            if frames.dtype != np.uint8 or frames.ndim != 4 or shape[-1] != 3 or shape[0] != b or 0 in shape[1:3]:
                raise ValueError(
                    f"images[{name!r}]: expected uint8 ({'B, ' if batched else ''}H, W, 3) with H, W > 0 "
                    f"and B={b} for every camera, got {frames.dtype} {tuple(given.shape)}"
                )
            out.append(np.stack([to_chw(resize(np.ascontiguousarray(f), size)) for f in frames]))
        return torch.from_numpy(np.stack(out, axis=1))

    def _raw_state(self, state: np.ndarray, b: int, batched: bool) -> np.ndarray:
        """The state as given -> (B, history, S) in dataset units, checked."""
        hist, dim = self.meta["history"], self.meta["state_dim"]
        rows = state if batched else state[None]
        if rows.ndim == 2 and hist == 1:
            rows = rows[:, None]
        if rows.shape != (b, hist, dim):
            want = f"({'B, ' if batched else ''}{'' if hist == 1 else f'{hist}, '}{dim})"
            raise ValueError(f"state: expected shape {want} with B={b}, got {tuple(state.shape)}")
        delta = self.normalizer.delta
        if delta is not None and not np.isfinite(rows[:, -1][:, list(delta.state_dims)]).all():
            raise ValueError(
                f"state: NaN or inf in state dim(s) {list(delta.state_dims)} of the current frame; this policy "
                f"predicts action dim(s) {list(delta.action_dims)} as offsets from them"
            )
        return rows

    def _state(self, rows: np.ndarray) -> torch.Tensor:
        """Raw (B, history, S) -> normalised, NaN zeroed, as robot_data.RobotDataset builds it."""
        norm = self.normalizer.normalize("state", rows)
        return torch.from_numpy(np.nan_to_num(norm, nan=0.0, posinf=0.0, neginf=0.0))

    def _prompt(self, instruction: str | Sequence[str], b: int) -> dict[str, torch.Tensor]:
        """Left-padded prompt ids and mask (B, Lp), as robot_data.collate pads them."""
        many = isinstance(instruction, (Sequence, np.ndarray)) and not isinstance(instruction, str)
        texts = list(instruction) if many else [instruction] * b
        if not all(isinstance(t, str) for t in texts):  # numpy's str_ is a str
            raise ValueError(f"instruction: a str or a list of str, got {type(instruction).__name__}")
        if len(texts) != b:
            raise ValueError(f"instruction: {len(texts)} instructions for a batch of {b}")
        empty = np.zeros((0, self.action_dim), np.float32)
        ids = [self.prompts(t, None, empty, np.zeros(0, bool))[0] for t in texts]
        width = max(1, *(len(q) for q in ids))
        out = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.bool)
        for row, q in enumerate(ids):
            if len(q):
                out[row, width - len(q) :] = torch.from_numpy(q)
                mask[row, width - len(q) :] = True
        return {"prompt_ids": out, "prompt_mask": mask}
