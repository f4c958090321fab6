"""Live experiment tracking: a run's figures as TensorBoard event files in ``<run dir>/tensorboard/``.

Fed by the run's recorder from what summary.json already holds, so no other module knows about tracking and
nothing but the server's own figures is written. Watch a run with ``tensorboard --logdir results/<run>/tensorboard``
(or ``--logdir results`` to compare runs).
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

from alignfl_app.config import ConfigError
from alignfl_app.files import real_folder

log = logging.getLogger("flwr.alignfl")

TRACKING_FOLDER = "tensorboard"
TRACKING_CHOICES = ("tensorboard", "none")
SKIPPED_ROUND_KEYS = frozenset({"round", "silos", "global"})


def _scalar(v: Any) -> float | None:
    """``v`` as a finite float, else None (a flag, a name, a list, NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "item"):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def round_scalars(record: dict[str, Any], class_names: tuple[str, ...] = ()) -> dict[str, float]:
    """Every figure of one round's record (``RunRecorder.round``) as TensorBoard tag -> value.

    ``global/*``: the global model on the real test set, its per-class accuracy under ``global-per-class/*``;
    ``round/*``: the round's counts (a list of replies or silos counts its entries) and times; ``server/*``: the
    server's training; ``silos/<figure>/<silo>``: what each silo reported and was measured at, one chart per
    figure and silo, side by side."""
    out: dict[str, float] = {}

    def put(tag: str, v: Any) -> None:
        value = _scalar(v)
        if value is not None:
            out[tag] = value

    for key, value in record.get("global", {}).items():
        if key == "per-class-accuracy" and isinstance(value, list):
            for i, rate in enumerate(value):
                put(f"global-per-class/{class_names[i] if i < len(class_names) else i}", rate)
        else:
            put(f"global/{key}", value)
    for key, value in record.items():
        if key in SKIPPED_ROUND_KEYS:
            continue
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"{key}/{k}", v)
        elif isinstance(value, list):
            put(f"round/{key}", len(value))
        else:
            put(f"round/{key}", value)
    for silo, figures in record.get("silos", {}).items():
        for key, value in figures.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    put(f"silos/{key}/{silo}/{k}", v)
            else:
                put(f"silos/{key}/{silo}", value)
    return out


class Tracker:
    """tracking='none': tracks nothing. The recorder calls it the same way whatever the choice."""

    def rounds(self, records: list[dict[str, Any]]) -> None:
        """Log what is new in the run's round records since the last call."""

    def image(self, server_round: int, png: bytes) -> None:
        """Log the round's sample grid (a PNG)."""

    def resume(self, completed_round: int) -> None:
        """A resumed run: the rounds up to ``completed_round`` are in the folder already, if it was tracked."""

    def close(self) -> None:
        """Write out what is buffered; the run is over."""


class TensorBoardTracker(Tracker):
    """Writes with ``torch.utils.tensorboard.SummaryWriter``; the writer opens on the first figure, so a resumed run
    can first drop what the interrupted one logged past its checkpoint.

    A figure that cannot be written never stops the run: the first failure is logged and tracking stops."""

    def __init__(self, folder: Path, config: dict[str, Any], class_names: tuple[str, ...] = ()) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch says "TensorBoard logging requires TensorBoard version 1.15 or above"
            raise ConfigError(
                "tracking='tensorboard' needs the tensorboard package on the server: pip install tensorboard "
                "(or set tracking='none')"
            ) from None
        self._writer_class = SummaryWriter
        self.folder = Path(folder)
        self.config = dict(config)
        self.class_names = tuple(class_names)
        self._writer: Any = None
        self._purge_step: int | None = None
        self._first_step = 0
        self._logged: dict[tuple[str, int], float] = {}  # (tag, round) -> value: each point once, again if it moved
        self._images: set[int] = set()
        self._skip_through = 0  # rounds already in the folder from an interrupted run
        self._broken = False

    def resume(self, completed_round: int) -> None:
        self._first_step = completed_round + 1
        if any(self.folder.glob("events.out.tfevents.*")):  # the interrupted run was tracked: keep its points
            self._purge_step = completed_round + 1  # and drop what it logged past its checkpoint
            self._skip_through = completed_round

    def _open(self) -> Any:
        if self._writer is None:
            real_folder(self.folder)  # as every folder of the run: a link would have the events land where it points
            self._writer = self._writer_class(log_dir=str(self.folder), purge_step=self._purge_step)
            self._write_config()
        return self._writer

    def _write_config(self) -> None:
        """The run config once: a table in the Text tab and the run's hyper-parameters in the HParams tab, so runs
        under one ``--logdir`` can be compared by what they were run with."""
        from torch.utils.tensorboard.summary import hparams

        rows = "\n".join(f"| {k} | `{v}` |" for k, v in sorted(self.config.items()))
        self._writer.add_text("config", f"| key | value |\n|---|---|\n{rows}", self._first_step)
        params = {
            k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in self.config.items() if v is not None
        }
        metrics = {"global/accuracy": 0.0, "global/balanced-accuracy": 0.0, "round/silo-mean-eval": 0.0}
        for summary in hparams(params, metrics):
            self._writer.file_writer.add_summary(summary)

    def _guard(self, what: str, action: Any) -> None:
        if self._broken:
            return
        try:
            action()
        except Exception as exc:  # a figure never stops the run
            self._broken = True
            log.warning(
                "TensorBoard tracking stopped (%s): %s", what, str(exc).splitlines()[0][:300] if str(exc) else exc
            )

    def rounds(self, records: list[dict[str, Any]]) -> None:
        def log_new() -> None:
            for record in records:
                step = int(record["round"])
                if step <= self._skip_through:
                    continue
                for tag, value in round_scalars(record, self.class_names).items():
                    if self._logged.get((tag, step)) != value:
                        self._open().add_scalar(tag, value, step)
                        self._logged[tag, step] = value
            if self._writer is not None:
                self._writer.flush()  # live: what summary.json holds is on disk too

        self._guard("round figures", log_new)

    def image(self, server_round: int, png: bytes) -> None:
        if server_round in self._images:
            return

        def log_image() -> None:
            import matplotlib.image

            pixels = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
            writer = self._open()
            writer.add_image("samples", pixels, server_round, dataformats="HWC")
            writer.flush()
            self._images.add(server_round)

        self._guard("sample grid", log_image)

    def close(self) -> None:
        if self._writer is not None:
            self._guard("closing", self._writer.close)


def make_tracker(kind: str, run_dir: Path, config: dict[str, Any], class_names: tuple[str, ...] = ()) -> Tracker:
    """The run's tracker for ``tracking=kind``; ConfigError (one line) for a choice this server cannot track with."""
    if kind == "none":
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(Path(run_dir) / TRACKING_FOLDER, config, class_names)
    raise ConfigError(f"tracking='{kind}' is not one of {list(TRACKING_CHOICES)}")
