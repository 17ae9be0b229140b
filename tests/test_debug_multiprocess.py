"""The debugger across processes (2 processes x 4 CPU devices on 127.0.0.1, through the launcher):
a hung process is named in the hang report, processes with different configs are refused at start."""

from __future__ import annotations

import json

import pytest

from helpers import MESHES
from picotron_jax.cli import main
from picotron_jax.distributed import EXIT_PEER_LOST
from test_multiprocess import FAST, REPO, corpus, run_launcher, train_two_processes_by_hand  # noqa: F401 - corpus is a fixture


@pytest.mark.slow
def test_a_hung_process_is_named_in_the_hang_report_with_its_phase(tmp_path, corpus, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    code, text = run_launcher(["-n", "2", "--devices-per-process", "4", "--", "train", "--config",
                               str(MESHES / "dp8.yaml"), "--run-dir", str(run_dir), *FAST, *corpus,
                               "train.steps=1000", "faults.hang_step=3", "faults.process=1",
                               "distributed.step_timeout_s=8", "distributed.heartbeat_timeout_s=30"],
                              tmp_path / "launch.out", timeout_s=240)
    assert code == EXIT_PEER_LOST, text[-4000:]
    dumps = {p: json.loads((run_dir / "debug" / f"hang-p{p}.json").read_text()) for p in (0, 1)}
    assert all("no training step finished" in d["problem"] for d in dumps.values())
    assert [e["phase"] for e in dumps[1]["recorder"] if e["phase"] != "data"][-2:] == ["step done", "step"]
    assert dumps[0]["program"]["fingerprint"] == dumps[1]["program"]["fingerprint"]
    assert any(c.startswith("all-reduce replica_groups=") for c in dumps[0]["program"]["collectives"])
    report = (run_dir / "debug" / "hang-report.txt").read_text()
    assert "hang report: 2 of 2 process(es) left a dump" in report
    assert "process 1 is stuck in its own code at faults.py:" in report and "in on_step_start()" in report
    assert "during step 3 (started, before or inside the device step)" in report
    assert "waiting: process(es) [0] wait for process(es) [1]" in report
    assert "every process compiled the same train step" in report
    assert "hang report:" in text  # process 0 printed it
    capsys.readouterr()
    assert main(["debug", "hang", str(run_dir)]) == 0
    assert capsys.readouterr().out == report
    assert main(["debug", "hang", str(tmp_path)]) == 1  # no dumps there


def test_processes_with_different_configs_are_refused_at_start_naming_the_field(tmp_path, corpus):  # noqa: F811
    procs = train_two_processes_by_hand(tmp_path, lambda i: [*corpus, f"model.num_layers={2 + i}"])
    texts = [(tmp_path / f"p{i}.out").read_text() for i in range(2)]
    codes = [p.returncode for p in procs]
    assert set(codes) <= {2, EXIT_PEER_LOST} and 2 in codes, (codes, texts[0][-3000:], texts[1][-3000:])
    message = "config field 'model.num_layers' is 2 on process 0 and 3 on process 1"
    assert any(message in t for t in texts), texts
    assert not any("step 1/" in t for t in texts)  # refused before the first step
