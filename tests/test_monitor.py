"""The monitor (observe/monitor.py): each detector is shown a fault injected through the fault injector
(config `faults`) and catches it at its step; actions, alerts, webhook, TensorBoard and Prometheus; the
goodput ledger, the plots and the live dashboard's server on the same run (its page in a real headless
browser: test_dashboard_browser.py)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.callbacks import build_callbacks
from picotron_jax.errors import UserError
from picotron_jax.observe.dashboard import serve
from picotron_jax.observe.monitor import Monitor, RobustWindow
from picotron_jax.observe.step_time import ROW_CLASSES
from helpers import MESHES
from picotron_jax.cli import main
from helpers import free_port
from test_api import TINY, params_of, tiny


def alerts_of(run_dir):
    path = run_dir / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Hook:
    """A local HTTP server on 127.0.0.1 that records the JSON bodies POSTed to it."""

    def __init__(self):
        self.bodies: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                hook.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_robust_window_flags_a_late_spike_that_megatrons_rule_misses():
    window = RobustWindow(size=50, mads=8.0, min_rel=0.25)
    rng = np.random.default_rng(0)
    first_100 = 5.0 - np.linspace(0, 3, 100)  # loss falls from 5 to 2
    for x in (first_100[-50:] * 0 + 2.0 + 0.02 * rng.standard_normal(50)):
        window.values.append(float(x))
    assert 2.0 < window.limit() < 3.0 and 8.0 > window.limit()  # 8 after a plateau at 2: a spike
    assert not 8.0 > 10 * first_100.max()  # Megatron's rule (10 x the largest of the first 100 losses) misses it
    assert RobustWindow(50, 8.0, 0.25).limit() == float("inf")  # too few values: nothing is judged


def test_monitor_config_errors_name_the_field():
    with pytest.raises(UserError, match="config field 'monitor.on_nan' = 'reboot': valid actions are"):
        tiny("single", "monitor.on_nan=reboot").validate(1)
    with pytest.raises(UserError, match="config field 'monitor.on_throughput' = 'skip'"):  # spikes and NaN only
        tiny("single", "monitor.on_throughput=skip").validate(1)
    with pytest.raises(UserError, match="config field 'monitor.window' = 0: must be >= 1"):
        tiny("single", "monitor.window=0").validate(1)
    with pytest.raises(UserError, match="config field 'monitor.webhook_url' = 'localhost:9': must be an http"):
        tiny("single", "monitor.webhook_url=localhost:9").validate(1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"config field 'monitor.prometheus_port' = {port}: that port is in use"):
            build_callbacks(tiny("single", f"monitor.prometheus_port={port}"), None)


@pytest.fixture(scope="module")
def rewound(tmp_path_factory):
    """A NaN injected into decoder layer 1's gradient at step 5 (a one-off machine fault), checkpoints every
    2 steps, on_nan=rewind; a webhook, Prometheus, TensorBoard, the plots at the end and the dashboard are on."""
    run_dir = tmp_path_factory.mktemp("rewind")
    hook, port, dash_port = Hook(), free_port(), free_port()
    cfg = tiny("single", "model.num_layers=3", "train.steps=8", "logging.every=1", "checkpoint.every=2",
               "checkpoint.async_save=false", "faults.nan_step=5", "faults.nan_layer=1",
               "faults.nan_site=gradient", "faults.transient=true", "monitor.layer_every=100",
               "monitor.throughput_drop=0",  # tiny steps on a loaded machine: timing noise (its own test below)
               f"monitor.webhook_url={hook.url}", f"monitor.prometheus_port={port}", "monitor.plots=true",
               f"monitor.dashboard_port={dash_port}")
    trainer = pj.Trainer(cfg, run_dir)
    summary = trainer.run()
    prometheus = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    served = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{dash_port}/api/metrics", timeout=10).read())
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, Monitor))
    trainer.close()  # the webhook thread finishes its queue
    hook.close()
    yield run_dir, trainer, summary, hook.bodies, prometheus, monitor, served


def test_nan_in_one_layers_gradient_is_caught_at_its_step_named_and_rewound(rewound):
    run_dir, trainer, summary, _, _, monitor, _ = rewound
    (row,) = alerts_of(run_dir)
    assert (row["step"], row["kind"], row["where"], row["action"]) == (5, "nan", "layer 1", "rewind")
    assert "gradient became nan" in row["detail"] and row["threshold"] == "finite"
    steps = [r["step"] for r in trainer.history if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # back to the checkpoint of step 4, then on to the end
    assert summary.steps == 8 and not summary.error
    after = [r for r in trainer.history if r["kind"] == "train"][5:]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in after)
    assert all(np.isfinite(x).all() for x in params_of(trainer))
    assert monitor._offset == 1  # the batch of the bad step (index 4) is skipped: step 5 reads batch 5
    metrics_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics_rows if r["kind"] == "train"] == steps
    assert all(len(r["layer_grad_norm"]) == 3 for r in metrics_rows if "layer_grad_norm" in r)


def test_a_rewind_right_after_an_asynchronous_save_restores_that_save(tmp_path):
    """The NaN one step after an asynchronous save: the rewind waits for that save instead of finding no
    checkpoint (it did: 'no checkpoint in RUN_DIR/checkpoints')."""
    cfg = tiny("single", "train.steps=4", "logging.every=1", "checkpoint.every=2", "faults.nan_step=3",
               "faults.nan_layer=1", "faults.transient=true", "monitor.throughput_drop=0")
    with pj.Trainer(cfg, tmp_path) as trainer:
        summary = trainer.run()
    assert not summary.error and summary.steps == 4
    assert [r["step"] for r in trainer.history if r["kind"] == "train"] == [1, 2, 3, 3, 4]
    assert [(r["step"], r["action"]) for r in alerts_of(tmp_path)] == [(3, "rewind")]


def test_the_alert_reaches_the_webhook_as_the_documented_json(rewound):
    run_dir, _, _, bodies, _, _, _ = rewound
    assert bodies == alerts_of(run_dir)
    assert set(bodies[0]) >= {"step", "kind", "detail", "where", "threshold", "action", "process", "time"}


def test_prometheus_serves_the_latest_row_and_the_anomaly_count(rewound):
    _, trainer, _, _, text, _, _ = rewound
    last = [r for r in trainer.history if r["kind"] == "train"][-1]
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["picotron_step"] == 8 and values["picotron_anomalies"] == 1
    assert values["picotron_loss"] == pytest.approx(last["loss"], rel=1e-6)
    assert "picotron_param_norm" in values and "picotron_update_ratio" in values


def test_tensorboard_events_hold_the_loss_and_the_config(rewound):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, trainer, _, _, _, _, _ = rewound
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "train/loss" in tags["scalars"] and "train/grad_norm" in tags["scalars"]
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    rows = [(r["step"], r["loss"]) for r in trainer.history if r["kind"] == "train"]
    assert [s for s, _ in losses] == [s for s, _ in rows]
    np.testing.assert_allclose([v for _, v in losses], [v for _, v in rows], rtol=1e-6)
    assert any("config" in t for t in tags["tensors"])


def test_the_rewind_run_charges_its_redone_step_to_wasted_and_the_classes_sum_to_wall_time(rewound):
    run_dir, trainer, summary, _, _, _, _ = rewound
    clock = trainer.callbacks.callbacks[0].c  # observe/step_time.py's StepClock
    ledger = clock.ledger
    wall = clock.mark - trainer._t_start  # the ledger ends at the last callback of on_run_end
    assert sum(ledger.values()) == pytest.approx(wall, rel=1e-9)
    assert ledger["compile"] > 0 and ledger["checkpoint"] > 0 and ledger["init"] > 0 and ledger["device"] > 0
    assert ledger["wasted"] > 0  # step 5 ran twice: its first run was thrown away by the rewind
    rows = [r for r in trainer.history if r["kind"] == "train"]
    assert all(all(r[f"time_{k}_s"] >= 0 for k in ROW_CLASSES) for r in rows)
    assert rows[0]["time_compile_s"] > 0 and all(r["time_compile_s"] == 0 for r in rows[1:])
    split = sum(r[f"time_{k}_s"] for r in rows for k in ROW_CLASSES)  # the rows cover the loop, not init
    assert split <= sum(ledger.values()) - ledger["init"] + 1e-6
    saved = json.loads((run_dir / "goodput.json").read_text())
    assert saved["ledger"] == pytest.approx(ledger)
    assert saved["goodput"] == pytest.approx(ledger["device"] / sum(ledger.values()))
    assert all(0 <= r["goodput"] < 1 for r in rows)


def test_plot_writes_the_pngs_with_the_anomaly_marked(rewound, tmp_path, capsys):
    import matplotlib.image

    run_dir = rewound[0]
    at_end = sorted(p.name for p in (run_dir / "plots").iterdir())  # monitor.plots=true: written by the run
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "plots")]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == at_end
    # layers.png: the NaN step computed its per-layer norms (monitor.layer_every=100 is not reached otherwise)
    assert names == ["grad_norm.png", "layers.png", "loss.png", "memory.png", "throughput.png", "time.png"]
    assert sorted(capsys.readouterr().out.split()) == [str(tmp_path / "plots" / n) for n in names]
    rgb = matplotlib.image.imread(tmp_path / "plots" / "loss.png")[..., :3]
    assert rgb.shape[:2] == (405, 720)  # 8 x 4.5 inches at 90 dpi
    red = (rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.75) & (rgb[..., 2] < 0.75)
    assert red.sum() > 100  # the NaN of step 5 as a red vertical line
    assert main(["plot", str(tmp_path / "plots")]) == 2  # not a run directory: one clear message
    assert "plot: no training rows in" in capsys.readouterr().err


def test_skip_leaves_the_parameters_of_a_non_finite_step_untouched(tmp_path):
    trainer = pj.Trainer(tiny("single", "model.num_layers=3", "train.steps=4", "logging.every=1",
                              "faults.nan_step=3", "faults.nan_layer=2", "faults.nan_site=gradient",
                              "monitor.on_nan=skip"), tmp_path)
    trainer.step(), trainer.step()
    before = params_of(trainer)
    row = trainer.step()
    assert row["update_skipped"] and not np.isfinite(row["grad_norm"])
    for a, b in zip(before, params_of(trainer), strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(trainer.step()["loss"])
    assert trainer.callbacks.callbacks[0].c.ledger["wasted"] > 0  # the skipped step's time (observe/step_time.py)
    (alert,) = alerts_of(tmp_path)
    assert (alert["step"], alert["kind"], alert["where"], alert["action"]) == (3, "nan", "layer 2", "skip")


@pytest.mark.slow
def test_a_loss_spike_from_a_corrupted_batch_late_in_the_run_is_caught_at_its_step(tmp_path):
    # the noise batch costs about ln(256) = 5.55 nats; the window (steps 5-12) sits near 4.8
    trainer = pj.Trainer(tiny("single", "train.steps=14", "logging.every=1", "faults.spike_step=13",
                              "monitor.window=8", "monitor.warmup=4", "monitor.spike_mads=4",
                              "monitor.spike_min_rel=0.1", "monitor.throughput_drop=0"), tmp_path)
    summary = trainer.run()
    (row,) = alerts_of(tmp_path)
    assert (row["step"], row["kind"], row["action"]) == (13, "loss_spike", "alert")
    assert row["detail"].startswith("loss 5.") and "over the last 8 steps" in row["threshold"]
    assert summary.steps == 14  # alert: the run goes on


@pytest.mark.slow
def test_a_throughput_drop_host_memory_pressure_and_a_full_disk_are_each_detected(tmp_path):
    # thresholds set so that this machine is "out" of RAM and disk; the sleep fault slows steps 9-11
    trainer = pj.Trainer(tiny("single", "train.steps=12", "logging.every=1", "faults.sleep_step=9",
                              "faults.sleep_steps=3", "faults.sleep_s=0.5", "monitor.throughput_drop=0.1",
                              "monitor.warmup=2", "monitor.host_memory_fraction=0.01", "checkpoint.every=5",
                              "monitor.disk_min_free_gb=100000000"), tmp_path)
    trainer.run()
    rows = alerts_of(tmp_path)
    assert [(r["step"], r["kind"], r["where"]) for r in rows] == [(1, "memory", "host"), (5, "disk", str(tmp_path)),
                                                                  (10, "throughput", "")]
    assert "host RAM" in rows[0]["detail"] and rows[0]["threshold"] == "1%"
    assert "GiB free before the checkpoint of step 5" in rows[1]["detail"]
    assert "tokens/s for two logged rows" in rows[2]["detail"]  # rows after a save (6, 11) are not judged


@pytest.mark.slow
def test_rewinds_are_bounded_then_the_run_stops_with_exit_code_4(tmp_path, capsys):
    # the NaN fires whenever step 3 runs (a reproducible fault): one rewind, then the run gives up
    code = main(["train", "--config", str(MESHES / "single.yaml"), "--run-dir", str(tmp_path), *TINY,
                 "train.steps=6", "logging.every=1", "checkpoint.every=2", "checkpoint.async_save=false",
                 "faults.nan_step=3", "monitor.max_rewinds=1", "monitor.throughput_drop=0"])
    assert code == 4
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("stopped: loss became nan at step 3") and "monitor.max_rewinds = 1" in last
    assert [(r["step"], r["kind"], r["action"]) for r in alerts_of(tmp_path)] == [(3, "nan", "rewind"),
                                                                                  (3, "nan", "stop")]


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
        return json.loads(body) if response.headers["Content-Type"] == "application/json" else body


@pytest.fixture()
def copied(rewound, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(rewound[0], run_dir, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "plots"))
    server = serve(run_dir, free_port())
    yield run_dir, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_the_dashboard_serves_the_rows_the_alerts_and_prometheus_text_and_follows_appended_rows(copied):
    run_dir, url = copied
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert get(url + "/api/metrics") == json.loads(json.dumps(rows).replace("NaN", "null"))  # NaN: null for JS
    info = get(url + "/api/run")
    assert info["alerts"] == alerts_of(run_dir) and info["goodput"]["ledger"]["compile"] > 0
    assert "monitor:" in info["config"]
    text = get(url + "/metrics")
    assert "picotron_step 8.0" in text and "picotron_anomalies 1.0" in text and "# TYPE picotron_loss gauge" in text
    assert "<title>picotron-jax dashboard</title>" in get(url + "/")
    with pytest.raises(urllib.error.HTTPError, match="404"):
        get(url + "/nothing")
    with open(run_dir / "metrics.jsonl", "a") as f:  # the run goes on: the next poll shows the new row
        f.write(json.dumps({**rows[-1], "step": 9, "loss": 4.5}) + "\n")
    assert get(url + "/api/metrics")[-1]["step"] == 9 and "picotron_step 9.0" in get(url + "/metrics")


def test_the_trainer_serves_its_own_dashboard_and_a_busy_port_is_refused(rewound, capsys):
    run_dir, trainer, *_, served = rewound
    assert [r["step"] for r in served] == [r["step"] for r in trainer.history]  # fetched before the trainer closed
    server = serve(run_dir, free_port())
    try:
        with pytest.raises(UserError, match=f"dashboard: --port {server.server_port}: that port is in use"):
            serve(run_dir, server.server_port)
        assert main(["dashboard", str(run_dir / "missing"), "--port", "0"]) == 2
        assert "is not a directory" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()
