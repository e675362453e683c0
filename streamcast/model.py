"""The LSTM: build from a config, train, save as ``.keras`` plus a JSON sidecar, load safely.

TensorFlow/Keras is imported inside the functions that need it, so that importing this module (and
reading a sidecar) stays instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamcast.data import SEQ_LEN
from streamcast.scoring import skill
from streamcast.version import __version__
from streamcast.wire import loads

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
SIDECAR_FILE = "model.json"
DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"


class ModelError(ValueError):
    """A model config, file or sidecar that cannot be used; the text says which and why."""


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "lstm" | "dropout" | "dense"
    units: int = 0
    rate: float = 0.0
    return_sequences: bool = False
    activation: str = "linear"


@dataclass(frozen=True)
class ModelConfig:
    """Layers, loss and optimiser. Input is (seq_len, 1); the last layer must be Dense(1)."""

    layers: tuple[LayerSpec, ...]
    loss: str = "mse"
    optimizer: str = "rmsprop"
    seq_len: int = SEQ_LEN

    @classmethod
    def from_sizes(
        cls, sizes: list[int] | tuple[int, ...] = (1, 50, 100, 1), dropout: float = 0.2
    ) -> ModelConfig:
        """The tutorial's ``[1, 50, 100, 1]`` form: input dim, LSTM sizes..., output size."""
        if len(sizes) < 3 or sizes[0] != 1 or sizes[-1] != 1:
            raise ModelError(
                f"layer sizes must look like [1, lstm..., 1] (one input, one output), got {sizes}"
            )
        lstm_sizes = list(sizes[1:-1])
        layers: list[LayerSpec] = []
        for i, units in enumerate(lstm_sizes):
            last = i == len(lstm_sizes) - 1
            layers.append(LayerSpec("lstm", units=units, return_sequences=not last))
            if dropout > 0:
                layers.append(LayerSpec("dropout", rate=dropout))
        layers.append(LayerSpec("dense", units=1, activation="linear"))
        return cls(layers=tuple(layers))

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> ModelConfig:
        """A layer list like the tutorial's JSON config (``neurons``/``return_seq`` accepted)."""
        if not isinstance(spec, dict) or not isinstance(spec.get("layers"), list):
            raise ModelError("model config must be an object with a 'layers' list")
        layers = []
        for n, raw in enumerate(spec["layers"]):
            if not isinstance(raw, dict):
                raise ModelError(f"layer {n}: expected an object, got {raw!r}")
            kind = str(raw.get("type", raw.get("kind", ""))).lower()  # "kind": our sidecars
            units = int(raw.get("units", raw.get("neurons", 0)) or 0)
            if kind == "lstm":
                if units < 1:
                    raise ModelError(f"layer {n}: lstm needs units >= 1")
                ret = bool(raw.get("return_sequences", raw.get("return_seq", False)))
                layers.append(LayerSpec("lstm", units=units, return_sequences=ret))
            elif kind == "dropout":
                rate = float(raw.get("rate", 0.0))
                if not 0.0 <= rate < 1.0:
                    raise ModelError(f"layer {n}: dropout rate must be in [0, 1), got {rate}")
                layers.append(LayerSpec("dropout", rate=rate))
            elif kind == "dense":
                layers.append(
                    LayerSpec("dense", units=units or 1, activation=raw.get("activation", "linear"))
                )
            else:
                raise ModelError(
                    f"layer {n}: unknown type {raw.get('type')!r} (lstm, dropout, dense)"
                )
        config = cls(
            layers=tuple(layers),
            loss=str(spec.get("loss", "mse")),
            optimizer=str(spec.get("optimizer", "rmsprop")),
            seq_len=int(spec.get("seq_len", SEQ_LEN)),
        )
        config.validate()
        return config

    def validate(self) -> None:
        lstms = [layer for layer in self.layers if layer.kind == "lstm"]
        if not lstms:
            raise ModelError("the model needs at least one lstm layer")
        if not self.layers or self.layers[-1].kind != "dense" or self.layers[-1].units != 1:
            raise ModelError("the last layer must be dense with 1 unit (one value forecast)")
        if lstms[-1].return_sequences:
            raise ModelError("the last lstm layer must not return sequences")
        for layer in lstms[:-1]:
            if not layer.return_sequences:
                raise ModelError("every lstm layer but the last must return sequences")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(layer) for layer in self.layers],
            "loss": self.loss,
            "optimizer": self.optimizer,
            "seq_len": self.seq_len,
        }


def build_model(config: ModelConfig | None = None, seed: int | None = 0) -> keras.Model:
    """A compiled Keras model for (seq_len, 1) inputs and one output."""
    import keras

    config = config or ModelConfig.from_sizes()
    config.validate()
    if seed is not None:
        keras.utils.set_random_seed(seed)
    layers: list[keras.layers.Layer] = [keras.Input(shape=(config.seq_len, 1))]
    for spec in config.layers:
        if spec.kind == "lstm":
            layers.append(keras.layers.LSTM(spec.units, return_sequences=spec.return_sequences))
        elif spec.kind == "dropout":
            layers.append(keras.layers.Dropout(spec.rate))
        else:
            layers.append(keras.layers.Dense(spec.units, activation=spec.activation))
    model = keras.Sequential(layers)
    model.compile(loss=config.loss, optimizer=config.optimizer)
    return model


@dataclass
class TrainResult:
    epochs_run: int
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)


def train_model(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 1,
    batch_size: int = 512,
    validation_split: float = 0.0,
    early_stopping_patience: int | None = None,
    seed: int | None = 0,
    learning_rate: float | None = None,
    cosine_decay: bool = False,
    verbose: int = 2,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Fit ``model`` in place; ``verbose=1`` shows Keras's progress bar, 2 a line per epoch."""
    import time

    import keras

    if seed is not None:
        keras.utils.set_random_seed(seed)
    if learning_rate is not None or cosine_decay:
        # Decaying the rate to zero over the run lets the last epochs settle instead of
        # jittering at the noise floor of a fixed rate (measured on the sine: docs/BENCHMARKS.md).
        optimizer_class = type(model.optimizer)
        rate = learning_rate if learning_rate is not None else float(model.optimizer.learning_rate)
        schedule: Any = rate
        if cosine_decay:
            train_rows = int(len(x) * (1.0 - validation_split))
            total_steps = epochs * max(1, -(-train_rows // batch_size))
            schedule = keras.optimizers.schedules.CosineDecay(rate, total_steps)
        optimizer = optimizer_class(learning_rate=schedule)
        model.compile(loss=model.loss, optimizer=optimizer)
    callbacks = list(callbacks or [])
    if early_stopping_patience is not None:
        monitor = "val_loss" if validation_split > 0 else "loss"
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor, patience=early_stopping_patience, restore_best_weights=True
            )
        )
    started = time.perf_counter()
    hist = model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        validation_split=validation_split,
        callbacks=callbacks,
        shuffle=True,
        verbose=verbose,
    )
    seconds = time.perf_counter() - started
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    return TrainResult(epochs_run=len(history.get("loss", [])), seconds=seconds, history=history)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _printable_text(value: object) -> bool:
    # a lone surrogate (not UTF-8) is not printable either
    return isinstance(value, str) and value != "" and value.isprintable()


@dataclass
class ModelInfo:
    """The JSON sidecar written next to every saved model."""

    version: str
    created: str
    seq_len: int
    normalise: bool
    sha256: str
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    residual: bool = False  # the network predicts the change from the window's last value
    streamcast_version: str = __version__

    @classmethod
    def read(cls, path: Path) -> ModelInfo:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(
                f"{path}: sidecar missing (a saved model is model.keras + model.json)"
            ) from None
        except UnicodeDecodeError as exc:
            raise ModelError(f"{path}: sidecar is not valid JSON ({exc})") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str | bytes, where: str) -> ModelInfo:
        """A sidecar from its JSON text; errors name ``where`` it came from."""
        try:
            raw = loads(text)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, nested too deeply
            raise ModelError(f"{where}: sidecar is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ModelError(f"{where}: sidecar must be a JSON object")
        missing = [
            k for k in ("version", "created", "seq_len", "normalise", "sha256") if k not in raw
        ]
        if missing:
            raise ModelError(f"{where}: sidecar lacks {', '.join(missing)}")
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        info = cls(**known)
        if not _printable_text(info.version):
            # it names every forecast on the wire (a string there, and JSON in the publish
            # script's argument: a lone surrogate there failed every publish)
            raise ModelError(
                f"{where}: version must be a non-empty string of printable UTF-8 text, "
                f"got {info.version!r}"
            )
        if not isinstance(info.seq_len, int) or info.seq_len < 1:
            raise ModelError(f"{where}: seq_len must be a positive integer, got {info.seq_len!r}")
        if not isinstance(info.normalise, bool):
            raise ModelError(f"{where}: normalise must be true or false, got {info.normalise!r}")
        if not isinstance(info.residual, bool):
            raise ModelError(f"{where}: residual must be true or false, got {info.residual!r}")
        return info

    def test_skill(self) -> float | None:
        """The skill on the held-out test windows stored in ``metrics``; None when absent.

        From ``mse`` and ``naive_mse`` (``streamcast.training.sidecar_metrics``). A retrained
        model's sidecar written before the two trainers shared that schema holds its MSE as
        ``candidate_mse``: such models may still be in a registry, so it is read too.
        """
        model = self.metrics.get("mse", self.metrics.get("candidate_mse"))
        naive = self.metrics.get("naive_mse")
        if not (isinstance(model, int | float) and isinstance(naive, int | float)) or naive <= 0:
            return None  # none stored, or a naive forecast without error: no skill to show
        return skill(model, naive)


def save_model(
    model: keras.Model,
    directory: str | Path,
    *,
    normalise: bool,
    residual: bool = False,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    config: ModelConfig | None = None,
    training: dict[str, Any] | None = None,
) -> ModelInfo:
    """Write ``model.keras`` and its sidecar ``model.json`` into ``directory``; return the sidecar."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / MODEL_FILE
    tmp = directory / (MODEL_FILE + ".tmp.keras")
    model.save(tmp)
    os.replace(tmp, model_path)
    digest = sha256_file(model_path)
    created = datetime.now(UTC)
    info = ModelInfo(
        version=f"{created:%Y%m%dT%H%M%SZ}-{digest[:8]}",
        created=created.isoformat(timespec="seconds"),
        seq_len=int(model.input_shape[1]),
        normalise=normalise,
        sha256=digest,
        data=data or {},
        metrics=metrics or {},
        config=config.to_dict() if config else {},
        training=training or {},
        residual=residual,
    )
    write_sidecar(directory, info)
    return info


def write_sidecar(directory: Path, info: ModelInfo) -> None:
    tmp = directory / (SIDECAR_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, directory / SIDECAR_FILE)


def load_model(directory: str | Path = DEFAULT_MODEL_DIR) -> tuple[keras.Model, ModelInfo]:
    """Load a saved model after checking its sha256 against the sidecar; Keras safe mode on."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"{directory}: not a model directory (expected model.keras + model.json)")
    info = ModelInfo.read(directory / SIDECAR_FILE)
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise ModelError(f"{model_path}: model file missing")
    digest = sha256_file(model_path)
    if digest != info.sha256:
        raise ModelError(
            f"{model_path}: sha256 {digest[:12]}… does not match the sidecar's "
            f"{str(info.sha256)[:12]}…; refusing a model file that changed after it was saved"
        )
    import keras

    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a bad archive
        raise ModelError(f"{model_path}: cannot load ({type(exc).__name__}: {exc})") from None
    shape = model.input_shape
    if len(shape) != 3 or shape[1] != info.seq_len or shape[2] != 1:
        raise ModelError(
            f"{model_path}: input shape {shape} does not match the sidecar's seq_len "
            f"{info.seq_len} with one feature"
        )
    return model, info


def count_lstm_macs(model: keras.Model) -> int:
    """Multiply-adds of one forward pass over one window (LSTM and Dense layers)."""
    import keras

    macs = 0
    steps = int(model.input_shape[1])
    for layer in model.layers:
        if isinstance(layer, keras.layers.LSTM):
            kernel, recurrent = layer.get_weights()[:2]
            macs += steps * (kernel.size + recurrent.size)
        elif isinstance(layer, keras.layers.Dense):
            macs += int(np.prod(layer.get_weights()[0].shape))
    return macs
