"""The inference engine: batched 1-step forecasts and multi-step rollouts in compiled calls.

A rollout runs every step inside one XLA-compiled ``tf.while_loop``: per step the window is
normalised to its own first value (as in training), the LSTM runs, the forecast is de-normalised,
appended, and the oldest value dropped. No Python runs between steps.

Two measured choices (docs/BENCHMARKS.md):

* For a plain stack of LSTM layers + Dense (the tutorial's models) the network is evaluated from
  its weights with a fused cell: the sigmoid gates are computed as ``0.5 * tanh(x / 2) + 0.5``
  with the 1/2 folded into the weights, so one ``tanh`` over all four gates replaces three
  sigmoids and a tanh. Any other architecture runs through the Keras model itself, still compiled.
* XLA on the CPU runs one computation on one core. On the CPU the batch is therefore cut into
  chunks that run as separate compiled calls on a thread pool, one per core (``batching=
  "chunked"``); on a GPU the whole batch is one call (``"one_call"``: chunks of up to 4096 rows,
  one worker). ``"auto"`` picks one_call when TensorFlow lists a GPU; forcing ``"one_call"`` runs
  that branch on the CPU too, which is how the tests check it without a GPU. Chunk and
  small-batch shapes are rounded up to powers of two, so varying batch sizes reuse a handful of
  compiled programs instead of compiling for every size.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from streamcast.model import DEFAULT_MODEL_DIR, ModelInfo, load_model

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)

DEFAULT_CPU_CHUNK = 64
DEFAULT_GPU_CHUNK = 4096
# a batch this small is one call, not spread over the workers: on the 2-core machine 4 rows cost
# 0.73 ms of CPU in one call and 1.36 ms as two (no faster), 16 rows 1.8 ms and 2.3 ms (faster)
SPLIT_MIN_ROWS = 8

# how a batch runs: "chunked" (per-core chunks on a thread pool), "one_call" (one compiled call
# of up to DEFAULT_GPU_CHUNK rows), "auto" (one_call when TensorFlow lists a GPU, else chunked)
Batching = Literal["auto", "one_call", "chunked"]
BATCHINGS: tuple[str, ...] = get_args(Batching)


class _PerBucketTracing(logging.Filter):
    """Drop TensorFlow's retracing warning: one program per (bucket, steps) is the design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Forecaster:
    """Batched next-value forecasts and rollouts in price space from a Keras LSTM model.

    Args:
        model: a Keras model taking (batch, seq_len, 1) and returning (batch, 1).
        normalise: whether the model was trained on windows normalised to their first value.
        residual: whether the network predicts the change from the window's last value.
        version: the model version carried by every forecast.
        chunk_size: rows per compiled call (default 64 chunked, 4096 in one call).
        workers: compiled calls run at once (default: the CPU cores chunked; 1 in one call).
        batching: "chunked" (per-core chunks on a thread pool, the CPU's way), "one_call" (the
            whole batch in one compiled call, the GPU's way; on the CPU too when forced) or
            "auto" (one_call when TensorFlow lists a GPU, else chunked).
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        normalise: bool,
        residual: bool = False,
        version: str = "unversioned",
        info: ModelInfo | None = None,
        chunk_size: int | None = None,
        workers: int | None = None,
        batching: Batching = "auto",
    ) -> None:
        import tensorflow as tf

        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {', '.join(BATCHINGS)}, got {batching!r}")
        tf_log = logging.getLogger("tensorflow")
        if not any(isinstance(f, _PerBucketTracing) for f in tf_log.filters):
            tf_log.addFilter(_PerBucketTracing())
        shape = model.input_shape
        if len(shape) != 3 or shape[2] != 1 or shape[1] is None:
            raise ValueError(f"model input must be (batch, seq_len, 1), got {shape}")
        self.model = model
        self.seq_len = int(shape[1])
        self.normalise = normalise
        self.residual = residual
        self.version = version
        self.info = info
        gpus = tf.config.list_logical_devices("GPU")
        self.device = gpus[0].name if gpus else "/CPU:0"
        one_call = bool(gpus) if batching == "auto" else batching == "one_call"
        self.batching: Batching = "one_call" if one_call else "chunked"
        self.chunk_size = _next_pow2(
            chunk_size or (DEFAULT_GPU_CHUNK if one_call else DEFAULT_CPU_CHUNK)
        )
        self.workers = max(1, workers or (1 if one_call else _cpu_count()))
        self._net, self._weights, self._structure = _network(model)
        self.fast_path = self._structure is not None
        self._programs: dict[tuple[int, int], Any] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def load(cls, path: str | Path = DEFAULT_MODEL_DIR, **kwargs: Any) -> Forecaster:
        """Load a saved model directory (sha256-checked) and wrap it."""
        model, info = load_model(path)
        return cls(
            model,
            normalise=info.normalise,
            residual=info.residual,
            version=info.version,
            info=info,
            **kwargs,
        )

    def close(self) -> None:
        """Stop the worker threads; idempotent. A later forecast starts them again."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Forecaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ------------------------------------------------------------------------

    def predict_next(self, prices: np.ndarray) -> np.ndarray:
        """Next-value forecasts (B,) from raw price windows (B, seq_len), newest last."""
        return self.rollout(prices, steps=1)[:, 0]

    def rollout(self, prices: np.ndarray, steps: int = 50) -> np.ndarray:
        """Forecast paths (B, steps): each step appends its forecast and drops the oldest value."""
        windows = self._check(prices)
        if not isinstance(steps, int | np.integer) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        steps = int(steps)
        if len(windows) == 0:
            return np.empty((0, steps), dtype=np.float64)
        with self._lock:
            chunks = self._chunks(windows)
            if len(chunks) == 1 or self.workers == 1:
                parts = [self._run(chunk, steps) for chunk in chunks]
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="forecaster")
                parts = list(self._pool.map(lambda c: self._run(c, steps), chunks))
        return np.concatenate(parts)[: len(windows)]

    def stage(self, path: str | Path) -> StagedWeights | None:
        """Load a saved model (sha256-checked) for a weights-only swap into this engine.

        Possible when it is the same fused architecture with the same window, normalisation and
        residual flag: then the compiled programs are reused and the swap costs no compile.
        None when it is not (load a new engine instead).
        """
        model, info = load_model(path)
        if self._structure is None or (info.seq_len, info.normalise, info.residual) != (
            self.seq_len,
            self.normalise,
            self.residual,
        ):
            return None
        fused = _fused_arrays(model)
        if fused is None or fused[1] != self._structure:
            return None
        return StagedWeights(self, fused[0], model, info)

    def bucket_sizes(self, max_rows: int) -> tuple[int, ...]:
        """Batch sizes whose warm-up compiles every program a batch of up to ``max_rows`` uses."""
        top = self._chunk_rows(max(1, max_rows))
        # every power of two up to ``workers`` chunks of the largest: each chunk size a batch
        # of up to ``max_rows`` rows can be cut into is one of theirs
        return tuple(1 << k for k in range((top * self.workers).bit_length()))

    def warmup(self, batch_sizes: tuple[int, ...] = (1,), steps: tuple[int, ...] = (1, 50)) -> None:
        """Compile the programs these batch sizes and step counts use, so no caller waits later."""
        for b in batch_sizes:
            window = np.full((b, self.seq_len), 100.0)
            for s in steps:
                self.rollout(window, steps=s)

    @property
    def compiled_shapes(self) -> list[tuple[int, int]]:
        """(rows, steps) of every program compiled so far."""
        return sorted(self._programs)

    # -- internals -------------------------------------------------------------------------

    def _check(self, prices: np.ndarray) -> np.ndarray:
        windows = np.asarray(prices, dtype=np.float64)
        if windows.ndim != 2 or windows.shape[1] != self.seq_len:
            raise ValueError(f"prices must have shape (batch, {self.seq_len}), got {windows.shape}")
        if not np.all(np.isfinite(windows)):
            raise ValueError("prices contain NaN or infinity")
        if self.normalise and np.any(windows[:, 0] <= 0):
            raise ValueError("a normalised model needs each window's first price > 0")
        return windows

    def _chunks(self, windows: np.ndarray) -> list[np.ndarray]:
        """Cut into rows of bucketed sizes; padding repeats the last window (valid prices)."""
        size = self._chunk_rows(len(windows))
        n = len(windows)
        count = math.ceil(n / size)
        chunks = [windows[i * size : (i + 1) * size] for i in range(count)]
        last = chunks[-1]
        if len(last) < size:
            bucket = _next_pow2(len(last))
            pad = np.repeat(last[-1:], bucket - len(last), axis=0)
            chunks[-1] = np.concatenate([last, pad])
        return chunks

    def _chunk_rows(self, n: int) -> int:
        """Rows per call for a batch of ``n``: a batch of up to :data:`SPLIT_MIN_ROWS` is one
        call; a bigger one is spread over the workers (one XLA computation uses one core), in
        calls of at least :data:`SPLIT_MIN_ROWS` rows and at most ``chunk_size``."""
        if n <= SPLIT_MIN_ROWS:
            return min(self.chunk_size, _next_pow2(n))
        return min(self.chunk_size, max(SPLIT_MIN_ROWS, _next_pow2(math.ceil(n / self.workers))))

    def _run(self, chunk: np.ndarray, steps: int) -> np.ndarray:
        key = (len(chunk), steps)
        program = self._programs.get(key)
        if program is None:
            program = self._compile(*key)
            self._programs[key] = program
        import tensorflow as tf

        with tf.device(self.device):
            out = program(tf.constant(chunk))
        return np.asarray(out)

    def _compile(self, rows: int, steps: int) -> Callable[[tf.Tensor], tf.Tensor]:
        import tensorflow as tf

        log.debug("compiling rollout for %d rows x %d steps", rows, steps)
        net, normalise, residual = self._net, self.normalise, self.residual

        def rollout(prices: tf.Tensor) -> tf.Tensor:
            def step(k: tf.Tensor, window: tf.Tensor, out: tf.TensorArray) -> tuple[Any, ...]:
                first = window[:, :1]
                x = window / first - 1.0 if normalise else window
                y = tf.cast(net(tf.cast(x, tf.float32)), tf.float64)
                if residual:
                    y = y + x[:, -1]
                forecast = first[:, 0] * (y + 1.0) if normalise else y
                window = tf.concat([window[:, 1:], forecast[:, None]], axis=1)
                return k + 1, window, out.write(k, forecast)

            out = tf.TensorArray(tf.float64, size=steps)
            _, _, out = tf.while_loop(lambda k, *_: k < steps, step, (tf.constant(0), prices, out))
            return tf.transpose(out.stack())

        spec = tf.TensorSpec((rows, self.seq_len), tf.float64)
        # XLA only for the fused fast path; an arbitrary Keras model may hold ops XLA lacks.
        # The one concrete function, called directly: a tf.function call would match its input
        # against the signature on every call (~0.13 ms of a 1-row call's ~0.47)
        function = tf.function(rollout, input_signature=[spec], jit_compile=self.fast_path)
        return function.get_concrete_function()


class StagedWeights:
    """A new version's weights, ready to be written into a running engine's compiled programs
    (:class:`streamcast.engine.Staged`)."""

    def __init__(self, engine: Forecaster, arrays: list[np.ndarray], model: Any, info: ModelInfo):
        self.engine = engine
        self.arrays = arrays
        self.model = model
        self.info = info
        self.version = info.version

    def apply(self) -> None:
        """Overwrite the engine's weights (between two calls)."""
        engine = self.engine
        with engine._lock:
            for variable, array in zip(engine._weights, self.arrays, strict=True):
                variable.assign(array)
            engine.model, engine.info, engine.version = self.model, self.info, self.version


def _network(model: keras.Model) -> tuple[Callable[[Any], Any], list[Any], tuple[Any, ...] | None]:
    """(net, weights, structure): net maps (B, T) float32 windows to (B,) forecasts in a graph.

    For a plain LSTM stack the weights are variables read by the compiled programs and
    ``structure`` names their shapes; otherwise net calls the Keras model and there are none.
    """
    import tensorflow as tf

    fused = _fused_arrays(model)
    if fused is not None:
        arrays, structure = fused
        weights = [tf.Variable(a, trainable=False) for a in arrays]
        return _fused_net(weights, structure), weights, structure

    def keras_net(x: Any) -> Any:
        return model(x[:, :, None], training=False)[:, 0]

    return keras_net, [], None


def _fused_arrays(model: keras.Model) -> tuple[list[np.ndarray], tuple[Any, ...]] | None:
    """The weights of a plain stack of standard LSTM layers, dropouts and linear Dense layers,
    rearranged for the fused cell, and the stack's structure; None for any other model.

    Arrays: the first LSTM's kernel (1, 4u), recurrent kernel and bias; for each deeper LSTM
    [kernel; recurrent] stacked, and its bias; for each Dense its kernel and bias.
    """
    import keras

    lstms: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    denses: list[tuple[np.ndarray, np.ndarray]] = []
    prev_returns_sequences = False
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout):
            continue
        if isinstance(layer, keras.layers.LSTM) and not denses:
            standard = (
                layer.activation is keras.activations.tanh
                and layer.recurrent_activation is keras.activations.sigmoid
                and not layer.go_backwards
                and not layer.stateful
            )
            if not standard:
                return None
            if lstms and not prev_returns_sequences:
                return None
            prev_returns_sequences = bool(layer.return_sequences)
            weights = layer.get_weights()
            kernel, recurrent = weights[0], weights[1]
            units = recurrent.shape[0]
            bias = weights[2] if layer.use_bias else np.zeros(4 * units, np.float32)
            # gates i, f, c, o; sigmoid(z) = 0.5 * tanh(z / 2) + 0.5, so halve i, f, o
            scale = np.concatenate(
                [np.full(units, 0.5), np.full(units, 0.5), np.ones(units), np.full(units, 0.5)]
            ).astype(np.float32)
            lstms.append((kernel * scale, recurrent * scale, bias * scale))
        elif isinstance(layer, keras.layers.Dense) and lstms:
            if layer.activation is not keras.activations.linear:
                return None
            weights = layer.get_weights()
            bias = weights[1] if layer.use_bias else np.zeros(weights[0].shape[1], np.float32)
            denses.append((weights[0], bias))
        else:
            return None
    if not lstms or prev_returns_sequences or not denses or denses[-1][0].shape[1] != 1:
        return None
    if lstms[0][0].shape[0] != 1:
        return None
    first_kernel, first_recurrent, first_bias = lstms[0]
    arrays = [first_kernel, first_recurrent, first_bias]
    for kernel, recurrent, bias in lstms[1:]:
        arrays += [np.concatenate([kernel, recurrent], axis=0), bias]
    for kernel, bias in denses:
        arrays += [kernel, bias]
    arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
    structure = (len(lstms), len(denses), tuple(a.shape for a in arrays))
    return arrays, structure


def _fused_net(weights: list[Any], structure: tuple[Any, ...]) -> Callable[[Any], Any]:
    """The network from its fused weights (variables), every layer inside one timestep loop.

    Time-major: layer l at step t needs only layer l-1 at step t and itself at t-1, so no
    per-layer sequence is ever materialised. Layer 1 sees one feature, so its input projection for
    all steps is a cheap broadcast; deeper layers multiply [input, h] by the stacked
    [kernel; recurrent] in one matmul.
    """
    import tensorflow as tf

    n_lstm, n_dense, _ = structure
    first_kernel, first_recurrent, first_bias = weights[:3]
    deeper = [(weights[3 + 2 * k], weights[4 + 2 * k]) for k in range(n_lstm - 1)]
    start = 3 + 2 * (n_lstm - 1)
    denses = [(weights[start + 2 * k], weights[start + 2 * k + 1]) for k in range(n_dense)]
    sizes = [int(first_recurrent.shape[0])] + [int(b.shape[0]) // 4 for _, b in deeper]

    def cell(gates: Any, c: Any) -> tuple[Any, Any]:
        i, f, g, o = tf.split(tf.tanh(gates), 4, axis=1)
        c = (0.5 * f + 0.5) * c + (0.5 * i + 0.5) * g
        return (0.5 * o + 0.5) * tf.tanh(c), c

    def net(x: Any) -> Any:
        rows, steps = x.shape[0], x.shape[1]
        proj = tf.transpose(x)[:, :, None] * first_kernel[0] + first_bias  # (T, B, 4 units)

        def body(t: Any, hs: list[Any], cs: list[Any]) -> tuple[Any, ...]:
            h, c = cell(proj[t] + tf.matmul(hs[0], first_recurrent), cs[0])
            new_h, new_c = [h], [c]
            for (stacked, bias), h_prev, c_prev in zip(deeper, hs[1:], cs[1:], strict=True):
                h, c = cell(tf.matmul(tf.concat([h, h_prev], axis=1), stacked) + bias, c_prev)
                new_h.append(h)
                new_c.append(c)
            return t + 1, new_h, new_c

        zeros = [tf.zeros((rows, u), tf.float32) for u in sizes]
        _, hs, _ = tf.while_loop(lambda t, *_: t < steps, body, (0, zeros, list(zeros)))
        out = hs[-1]
        for kernel, bias in denses:
            out = tf.matmul(out, kernel) + bias
        return out[:, 0]

    return net
