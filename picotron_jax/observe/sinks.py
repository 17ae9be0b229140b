"""Metric sinks besides metrics.jsonl (config `monitor`): TensorBoard event files and a Prometheus endpoint.

`TensorBoardSink` writes RUN_DIR/tensorboard/ with tensorboardX: every numeric field of a training row
as the scalar `train/FIELD` (the loss is `train/loss`), evaluation rows as `eval/FIELD`, the per-layer
lists (observe/step_fields.py) as histograms `layers/FIELD` and as scalars `layers/FIELD/L`, and the
run's config as the text `config` (main process only).

`PrometheusSink` serves the newest row at http://127.0.0.1:PORT/metrics (prometheus-client): every
numeric field as the gauge `picotron_FIELD` (`picotron_eval_FIELD` for evaluation rows) and the anomaly
count as `picotron_anomalies`. A port already in use is a UserError at start.
"""

from __future__ import annotations

import math
import re
import socket
import threading
import traceback
from pathlib import Path

import yaml

from picotron_jax.callback import Callback
from picotron_jax.errors import UserError
from picotron_jax.observe.step_fields import ACTIVATION_FIELDS, LAYER_FIELDS


def _numbers(row: dict):
    for key, value in row.items():
        if isinstance(value, bool) or key == "kind":
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            yield key, float(value)


class TensorBoardSink(Callback):
    """tensorboardX writes on a thread fed by a bounded queue: when a write fails (a full disk) the thread
    dies with a traceback and the next `add_*` blocks forever on the full queue, hanging the run. So the
    queue is unbounded, the thread's OSError is caught (threading.excepthook) and raised in the loop at the
    next row, naming this folder: a full disk ends the run in one line with exit code 5 (cli.py)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.writer = None
        self.failed: OSError | None = None

    def _open(self):
        if self.failed is not None:
            self._disarm(self.writer)
            raise OSError(self.failed.errno, self.failed.strerror or str(self.failed), str(self.directory))
        if self.writer is None:
            from tensorboardX import SummaryWriter

            self._catch_writer_errors()
            self.writer = SummaryWriter(str(self.directory), flush_secs=10, max_queue=1 << 30)
        return self.writer

    def _catch_writer_errors(self) -> None:
        previous = threading.excepthook

        def hook(args):
            frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback else []
            if isinstance(args.exc_value, OSError) and any("tensorboardX" in f.filename for f in frames):
                self.failed = args.exc_value
                return
            previous(args)

        threading.excepthook = hook

    def on_run_start(self, trainer):
        w = self._open()
        w.add_text("config", "```yaml\n" + yaml.safe_dump(trainer.cfg.to_dict(), sort_keys=False) + "```",
                   trainer.step_count)

    def on_log(self, trainer, row):
        w, step = self._open(), row["step"]
        for key, value in _numbers(row):
            if key != "step":
                w.add_scalar(f"train/{key}", value, step)
        for key in (*LAYER_FIELDS, *ACTIVATION_FIELDS):
            if key in row:
                values = [v for v in row[key] if math.isfinite(v)]
                if values:
                    w.add_histogram(f"layers/{key}", values, step)
                for layer, v in enumerate(row[key]):
                    if math.isfinite(v):
                        w.add_scalar(f"layers/{key}/{layer}", v, step)

    def on_eval(self, trainer, row):
        w = self._open()
        for key, value in _numbers(row):
            if key != "step":
                w.add_scalar(f"eval/{key}", value, row["step"])

    def on_run_end(self, trainer, summary):
        if self.writer is not None:
            writer = self._open()
            self._in_loop(writer.flush, writer)

    def on_close(self, trainer):
        writer, self.writer = self.writer, None
        if writer is None:
            return
        if self.failed is None:
            return self._in_loop(writer.close, writer)
        self._disarm(writer)

    @staticmethod
    def _disarm(writer) -> None:
        """A failed writer's close would raise again, and so would tensorboardX's own close at exit (an atexit
        callback flushing the full file, a traceback after the run's one line): mark its event writer closed
        (tensorboardX 2.6 EventFileWriter._closed)."""
        events = getattr(getattr(writer, "file_writer", None), "event_writer", None)
        if events is not None and hasattr(events, "_closed"):
            events._closed = True

    def _in_loop(self, write, writer) -> None:
        """A write in the loop's own thread (flush, close): a failure is remembered, so nothing writes again,
        and raised naming this folder, as the writer thread's are."""
        try:
            write()
        except OSError as e:
            self.failed = e
            self._disarm(writer)
            raise OSError(e.errno, e.strerror or str(e), str(self.directory)) from None


def check_port_free(port: int, field: str) -> None:
    """UserError naming `field` when 127.0.0.1:port cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise UserError(f"config field '{field}' = {port}: that port is in use on 127.0.0.1 ({exc.strerror}); "
                            f"choose a free port or 0 (off)") from None


class PrometheusSink(Callback):
    def __init__(self, port: int, monitor=None):
        from prometheus_client import CollectorRegistry

        check_port_free(port, "monitor.prometheus_port")
        self.port, self.monitor = port, monitor
        self.registry = CollectorRegistry()
        self.gauges: dict = {}
        self.server = None

    def on_run_start(self, trainer):
        if self.server is None:
            from prometheus_client import start_http_server

            self.server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    def _set(self, name: str, value: float) -> None:
        from prometheus_client import Gauge

        name = "picotron_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)
        if name not in self.gauges:
            self.gauges[name] = Gauge(name, f"picotron-jax row field {name[len('picotron_'):]}",
                                      registry=self.registry)
        self.gauges[name].set(value)

    def on_log(self, trainer, row):
        for key, value in _numbers(row):
            self._set(key, value)
        if self.monitor is not None and self.monitor.alerts is not None:
            self._set("anomalies", len(self.monitor.alerts.rows))

    def on_eval(self, trainer, row):
        for key, value in _numbers(row):
            self._set(key if key.startswith("eval_") else f"eval_{key}", value)

    def on_close(self, trainer):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
