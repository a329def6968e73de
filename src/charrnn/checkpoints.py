"""The resumable training state in the checkpoint folder, and the protocol that keeps it consistent.

The folder holds ``state.json`` and the one model file it names (``epoch-NNNN.keras``: weights and
optimizer after epoch N). An epoch is committed in three steps: write the new model file under its
own name (atomically), replace ``state.json`` (atomically) to name it, delete the older file. A kill
at any instant leaves a ``state.json`` whose model file is complete and belongs to the same epoch,
so a resume always restarts from a consistent (weights, optimizer, epoch) triple; leftovers of an
interrupted commit are removed on the next one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import keras
import mlflow

from charrnn import files, model as model_lib, optimizer, seams  # noqa: F401 (optimizer: registers what a checkpoint reloads)
from charrnn.config import TrainConfig
from charrnn.errors import UserError
from charrnn.faults import crash_point

STATE_FILE = "state.json"

# Params that only say how a run is executed or recorded, not what it computes: a checkpoint is
# resumed whatever their value, and the MLflow run records their latest value.
RESUMABLE = ("epochs", "strategy", "log_every_steps")


def resume_key(config: TrainConfig, manifest: dict) -> str:
    """What a checkpoint must match to be resumed: every train param but those in ``RESUMABLE``
    (``epochs`` only while the learning rate is constant: a decay is laid out over all epochs),
    and the data. The strategy only says where the same global batch is computed, so a run
    started on two workers can finish on one machine.
    """
    params = dataclasses.asdict(config)
    for name in RESUMABLE:
        if name != "epochs" or config.lr_decay_fraction == 0:
            params.pop(name)
    blob = json.dumps({"train": params, "data": manifest}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


IDLE_STATE = {"epoch": 0, "note": "no training in progress: the next run starts from scratch"}


def model_file(epoch: int) -> str:
    return f"epoch-{epoch:04d}.keras"


def seed_states(model: keras.Model) -> dict:
    """Where each layer that draws random numbers in training (dropout) stands in its stream.
    Keras does not save that state in the model file, so a resumed run would drop other units than
    the uninterrupted one; the checkpoint keeps it in ``state.json``."""
    return {name: seams.seed_state(layer) for name, layer in seams.random_layers(model).items()}


def restore_seed_states(model: keras.Model, states: dict) -> None:
    layers = seams.random_layers(model)
    for name, values in states.items():
        if name in layers:
            seams.set_seed_state(layers[name], values)


class Checkpoints:
    """The checkpoint folder (a DVC output with ``persist: true``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load(self, key: str, max_epoch: int) -> tuple[dict, keras.Model] | None:
        """The state and the model to resume, or None when there is nothing consistent to resume."""
        path = self.folder / STATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or state.get("key") != key or not state.get("model_file"):
            return None
        if not 0 < state.get("epoch", 0) <= max_epoch or len(state.get("history", ())) != state["epoch"]:
            return None
        model_path = self.folder / state["model_file"]
        if not model_path.is_file():
            return None
        # A file cut short or replaced would fail every resume the same way: say which, and the fix.
        fix = f"remove {self.folder} to train from scratch (or restore the file) and rerun"
        if not zipfile.is_zipfile(model_path):
            raise UserError(f"checkpoint {model_path} is not a Keras model: not a zip archive (cut short or "
                            f"replaced); {fix}")
        try:
            model = model_lib.load_keras(model_path, compile=True)
        except UserError:
            raise UserError(f"checkpoint {model_path} cannot be loaded by Keras (damaged); {fix}") from None
        restore_seed_states(model, state.get("seed_states", {}))
        return state, model

    def interrupted_run_id(self) -> str | None:
        """The MLflow run of an interrupted training left in the folder (one ``load`` refused)."""
        try:
            state = json.loads((self.folder / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return state.get("run_id") if isinstance(state, dict) and state.get("model_file") else None

    def save(self, model: keras.Model, state: dict) -> None:
        """Commit epoch ``state["epoch"]``: the new model file, then the state naming it, then cleanup."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = model_file(state["epoch"])
        model_lib.save_keras(model, self.folder / name)
        crash_point("checkpoint-model-written")
        files.write_json(self.folder / STATE_FILE, {**state, "model_file": name, "seed_states": seed_states(model)})
        crash_point("checkpoint-state-written")
        self._remove_all_but({STATE_FILE, name})

    def clear(self) -> None:
        """Leave only an idle ``state.json`` (nothing to resume; DVC warns about an empty output).
        The state first: a kill before the model files are gone leaves no state naming a missing file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        files.write_json(self.folder / STATE_FILE, IDLE_STATE)
        self._remove_all_but({STATE_FILE})

    def _remove_all_but(self, keep: set[str]) -> None:
        for entry in self.folder.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


class EpochCheckpoint(keras.callbacks.Callback):
    """Commit the training state after every epoch (see the module docstring).

    Keras' BackupAndRestore writes weights and metadata as two non-atomic files and forgets the
    history; a kill between the two would resume from the wrong epoch.
    """

    def __init__(self, checkpoints: Checkpoints, state: dict, chars_per_step: int):
        super().__init__()
        self.checkpoints = checkpoints
        self.state = state
        self.chars_per_step = chars_per_step

    def on_epoch_end(self, epoch, logs=None):
        # The epoch's curves go to MLflow asynchronously: make them durable before the checkpoint
        # says the epoch is done, or a kill in between loses points that a resume never re-logs.
        mlflow.flush_async_logging()
        logs = logs or {}
        self.state["history"].append({
            "epoch": epoch + 1, "chars": int(self.model.optimizer.iterations.numpy()) * self.chars_per_step,
            "loss": float(logs["loss"]), "val_loss": float(logs["val_loss"]),
        })
        self.state["epoch"] = epoch + 1
        self.checkpoints.save(self.model, self.state)
