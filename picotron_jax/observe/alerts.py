"""Where anomalies go (observe/monitor.py): RUN_DIR/alerts.jsonl, the console, and an optional webhook.

Every anomaly is one JSON object in alerts.jsonl: `step`, `kind`, `detail` (what was seen), `where`
(layer, module or process; "" when the whole step is concerned), `threshold`, `action` (what was
done), `process`, `time` (Unix seconds). Action `log` prints one line; every other action prints a
banner and, with `monitor.webhook_url`, POSTs the row as JSON from a background thread (a time-out and
`monitor.webhook_retries` retries; a webhook that cannot be reached is reported once and never stops or
slows training).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import jax
from rich.panel import Panel


class Webhook:
    """POSTs JSON rows to `url` on a daemon thread, in order; `close()` waits up to `timeout_s` for the rest."""

    def __init__(self, url: str, timeout_s: float, retries: int, say: Callable[[str], None]):
        self.url, self.timeout_s, self.retries, self.say = url, timeout_s, retries, say
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="picotron-webhook", daemon=True)
        self._thread.start()

    def post(self, row: dict[str, Any]) -> None:
        self._queue.put(row)

    def _loop(self) -> None:
        while True:
            row = self._queue.get()
            if row is None:
                return
            self._send(row)

    def _send(self, row: dict[str, Any]) -> None:
        body = json.dumps(row).encode()
        error = ""
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                self.sent += 1
                return
            except Exception as exc:  # noqa: BLE001 - any failure is reported, never raised into training
                error = f"{type(exc).__name__}: {exc}"
                time.sleep(min(0.2 * 2 ** attempt, 2.0))
        self.failed += 1
        if self.failed == 1:
            self.say(f"monitor.webhook_url = {self.url!r} could not be reached ({error}); alerts continue in "
                     f"alerts.jsonl and training is not affected")

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=self.timeout_s * (self.retries + 1) + 1)


class Alerts:
    """The anomaly record of one trainer: alerts.jsonl (process 0), console, webhook."""

    def __init__(self, monitor_cfg, run_dir: Path | None, say: Callable[[str], None], console=None):
        self.path = run_dir / "alerts.jsonl" if run_dir is not None and jax.process_index() == 0 else None
        self.say, self.console = say, console
        self.rows: list[dict[str, Any]] = []
        url = monitor_cfg.webhook_url
        self.webhook = Webhook(url, monitor_cfg.webhook_timeout_s, monitor_cfg.webhook_retries, say) if url else None

    def record(self, step: int, kind: str, detail: str, where: str, threshold: str, action: str) -> dict:
        row = {"step": step, "kind": kind, "detail": detail, "where": where, "threshold": threshold,
               "action": action, "process": jax.process_index(), "time": time.time()}
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        text = (f"anomaly at step {step}: {kind}{f' in {where}' if where else ''}: {detail} "
                f"(threshold: {threshold}) -> {action}")
        if action == "log" or self.console is None:
            self.say(text)
        else:
            if jax.process_index() == 0:
                self.console.print(Panel(text, title="picotron-jax alert", style="bold red"))
            if self.webhook is not None:
                self.webhook.post(row)
        return row

    def close(self) -> None:
        if self.webhook is not None:
            self.webhook.close()
            self.webhook = None
