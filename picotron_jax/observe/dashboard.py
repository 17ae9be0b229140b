"""The live dashboard: `picotron-jax dashboard RUN_DIR [--port P]`, a local web page of a run that updates
while it trains (and works after the run, or on a copied run directory: it reads only the run's files).

The standard library's HTTP server on 127.0.0.1 only (loopback: nothing is exposed to the network):

* `/`: the page (plain HTML, SVG charts drawn by the page's own script, no external library or network):
  the latest step, loss and eval loss, tokens/s and MFU, memory, gradient norm, the per-layer gradient
  norm heat map, the goodput ledger, the anomaly list, the run config; it polls the JSON every 2 s;
* `/api/metrics`: the rows of RUN_DIR/metrics.jsonl as a JSON list (training and evaluation rows);
* `/api/run`: {"alerts": alerts.jsonl rows, "goodput": goodput.json or null, "config": config.yaml text};
* `/metrics`: the newest training row as Prometheus text (`picotron_FIELD` gauges, as observe/sinks.py,
  and `picotron_anomalies`).

With `monitor.dashboard_port` the trainer serves the same page for its run directory while it trains.
"""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from picotron_jax.callback import Callback
from picotron_jax.errors import UserError
from picotron_jax.observe.dashboard_page import PAGE
from picotron_jax.observe.plots import read_rows
from picotron_jax.observe.sinks import check_port_free



def _clean(value):
    """JSON for a browser: NaN and infinities (kept by metrics.jsonl, also inside per-layer lists) become null."""
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run_info(run_dir: Path) -> dict:
    goodput = run_dir / "goodput.json"
    try:
        ledger = json.loads(goodput.read_text(encoding="utf-8")) if goodput.is_file() else None
    except ValueError:  # being rewritten: the next poll reads it
        ledger = None
    if ledger is not None:
        ledger.pop("owned", None)
    config = run_dir / "config.yaml"
    return {"alerts": read_rows(run_dir / "alerts.jsonl"), "goodput": ledger,
            "config": config.read_text(encoding="utf-8") if config.is_file() else ""}


def prometheus_text(run_dir: Path) -> str:
    """The newest training row as Prometheus exposition text (one gauge per numeric field)."""
    train = [r for r in read_rows(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    lines = []
    fields = dict(train[-1]) if train else {}
    fields["anomalies"] = len(read_rows(run_dir / "alerts.jsonl"))
    for key, value in fields.items():
        if isinstance(value, bool) or key == "kind" or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        name = "picotron_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
        lines += [f"# HELP {name} picotron-jax row field {key}", f"# TYPE {name} gauge", f"{name} {float(value)!r}"]
    return "\n".join(lines) + "\n"


def handler_for(run_dir: Path):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            path = self.path.split("?")[0]
            if path == "/":
                self._send(PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/api/metrics":
                rows = [{k: _clean(v) for k, v in r.items()} for r in read_rows(run_dir / "metrics.jsonl")]
                self._send(json.dumps(rows).encode(), "application/json")
            elif path == "/api/run":
                self._send(json.dumps(run_info(run_dir)).encode(), "application/json")
            elif path == "/metrics":
                self._send(prometheus_text(run_dir).encode(), "text/plain; version=0.0.4")
            else:
                self.send_error(404, "the dashboard serves /, /api/metrics, /api/run and /metrics")

        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


def serve(run_dir: str | Path, port: int, field: str = "--port") -> ThreadingHTTPServer:
    """The dashboard of `run_dir` on http://127.0.0.1:port/, served from a daemon thread; `.shutdown()` ends it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"dashboard: {run_dir} is not a directory; give a run directory (picotron-jax train --run-dir)")
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler_for(run_dir))
    except OSError as exc:
        raise UserError(f"dashboard: {field} {port}: that port is in use on 127.0.0.1 ({exc.strerror}); "
                        f"choose a free port") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="picotron-dashboard", daemon=True).start()
    return server


class DashboardDuringRun(Callback):
    """`monitor.dashboard_port`: the trainer serves its own run directory's dashboard (main process); a port
    in use is a UserError when the run is built."""

    def __init__(self, run_dir: Path, port: int):
        check_port_free(port, "monitor.dashboard_port")
        self.run_dir, self.port, self.server = run_dir, port, None

    def on_run_start(self, trainer):
        if self.server is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.server = serve(self.run_dir, self.port, "monitor.dashboard_port =")
            trainer.say(f"dashboard at http://127.0.0.1:{self.port}/")

    def on_close(self, trainer):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def add_parser(sub) -> None:
    p = sub.add_parser("dashboard", help="serve a live web page of a run directory on 127.0.0.1")
    p.add_argument("run_dir", help="the run directory (metrics.jsonl, alerts.jsonl, goodput.json, config.yaml)")
    p.add_argument("--port", type=int, default=8050, help="the TCP port on 127.0.0.1 (default 8050)")


def cmd_dashboard(args) -> int:
    server = serve(args.run_dir, args.port)
    print(f"dashboard of {args.run_dir} at http://127.0.0.1:{server.server_port}/ (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return 0
