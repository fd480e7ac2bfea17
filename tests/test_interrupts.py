"""Interruption: Ctrl-C, SIGTERM and kill -9 of a real sweep subprocess lose nothing that had finished, and
`resume=true` then runs only what is missing; SIGTERM ends a sweep within seconds even while a store call hangs.

The job with trainer.seed=1 is made to wait in its second training step (tests/faulty_sweepbp.py) and
writes its process id to a file when it gets there, so every signal lands mid-job, on a fast machine or
a slow one. The rerun with resume=true runs without that fault, so the same config then finishes.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sweeps import SMALL, alive, artifact_json, group_members, run_sweep, runs_of, start_sweep, sweep_dirs

pytestmark = pytest.mark.slow
START_S = 300  # the sweep's imports, job 0 and job 1's setup, on a loaded 2-core machine
STOP_S = 60  # from the signal to the sweep's exit


def hang_seed_1(folder: Path) -> dict[str, str]:
    return {"SWEEPBP_FAULT_HANG_SEED": "1", "SWEEPBP_FAULT_MARK": str(folder / "job.pid")}


def outcomes(jobs) -> list[tuple[str, str, str]]:
    """(trainer.seed, sweepbp.status, MLflow status) of each job run, oldest first."""
    return [(r.data.params["trainer.seed"], r.data.tags["sweepbp.status"], r.info.status) for r in jobs]


def test_ctrl_c_records_the_job_as_killed_and_resume_records_each_config_once(tmp_path: Path):
    args = ["trainer.seed=0,1,2", "batch.size=1", *SMALL]
    sweep = start_sweep(args, tmp_path, hang_seed_1(tmp_path))
    job_pid = int(sweep.wait_for_file(tmp_path / "job.pid", START_S))
    sweep.signal_group(signal.SIGINT)  # Ctrl-C in a terminal: the sweep and its job both get SIGINT
    time.sleep(0.2)
    sweep.signal_group(signal.SIGINT)  # an impatient second Ctrl-C changes nothing

    assert sweep.finish(STOP_S) == 130
    assert "Traceback" not in sweep.stderr and "resume=true" in sweep.stderr
    assert "database tables" not in sweep.stderr  # MLflow's chatter on creating the store: not sweepbp's to say
    assert not alive(job_pid)
    jobs, parents = runs_of(tmp_path)
    assert outcomes(jobs) == [("0", "ok", "FINISHED"), ("1", "killed", "KILLED")]  # job 2 never started
    assert parents[0].info.status == "KILLED"
    killed = json.loads((sweep_dirs(tmp_path)[0] / "1" / "results.json").read_text())
    assert killed["status"] == "killed" and artifact_json(tmp_path, jobs[1])["status"] == "killed"
    assert killed["metrics"]["setup_time_s"] > 0 and len(killed["losses"]) == 1  # what ran before the stop
    finished = artifact_json(tmp_path, jobs[0])
    assert finished["status"] == "ok" and finished["metrics"]["peak_memory_bytes"] > 0

    code, stderr = run_sweep([*args, "resume=true"], tmp_path)

    assert code == 0, stderr
    assert "1 job(s) not run again" in stderr
    jobs, parents = runs_of(tmp_path)
    # Recorded once: per config, exactly one run that ended ok or oom. The killed attempt stays as a
    # KILLED run (history, not a result); a skipped job creates no run, its folder gets the recorded result.
    assert outcomes(jobs) == [("0", "ok", "FINISHED"), ("1", "killed", "KILLED"), ("1", "ok", "FINISHED"),
                              ("2", "ok", "FINISHED")]
    by_hash: dict[str, list[str]] = {}
    for run in jobs:
        by_hash.setdefault(run.data.tags["sweepbp.config_hash"], []).append(run.data.tags["sweepbp.status"])
    assert len(by_hash) == 3 and all(statuses.count("ok") == 1 for statuses in by_hash.values())
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    reused = json.loads((sweep_dirs(tmp_path)[1] / "0" / "results.json").read_text())
    assert reused["status"] == "ok" and reused["environment"]["resumed_from_run_id"] == jobs[0].info.run_id

    idle = start_sweep([*args, "resume=true"], tmp_path, faulty=False)  # nothing left to run
    code, stderr = idle.finish(STOP_S), idle.stderr
    deadline = time.monotonic() + 2
    while group_members(idle.process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(idle.process.pid) == []  # its fork server, still importing, was stopped at the exit

    assert code == 0 and "3 job(s) not run again" in stderr, stderr
    assert "Downloading artifacts" not in stderr  # reading the three recorded results back draws no progress bars
    assert len(runs_of(tmp_path)[1]) == 2  # no parent run of its own: it would hold no job
    assert "this sweep opened no run of its own" in (tmp_path / "stdout.txt").read_text()


def test_sigterm_to_the_sweep_reaches_the_job_and_records_it_as_killed(tmp_path: Path):
    sweep = start_sweep(["trainer.seed=0,1", "batch.size=1", *SMALL], tmp_path, hang_seed_1(tmp_path))
    job_pid = int(sweep.wait_for_file(tmp_path / "job.pid", START_S))
    os.kill(sweep.process.pid, signal.SIGTERM)  # `kill PID`, a scheduler's stop: the sweep process only

    assert sweep.finish(STOP_S) == 143
    assert "Traceback" not in sweep.stderr
    assert not alive(job_pid)
    jobs, _ = runs_of(tmp_path)
    assert outcomes(jobs) == [("0", "ok", "FINISHED"), ("1", "killed", "KILLED")]
    assert json.loads((sweep_dirs(tmp_path)[0] / "1" / "results.json").read_text())["status"] == "killed"


def test_kill_9_of_the_sweep_loses_nothing_that_had_finished(tmp_path: Path):
    sweep = start_sweep(["trainer.seed=0,1", "batch.size=1", *SMALL], tmp_path, hang_seed_1(tmp_path))
    job_pid = int(sweep.wait_for_file(tmp_path / "job.pid", START_S))
    os.kill(sweep.process.pid, signal.SIGKILL)  # no handler runs; the job must not outlive its sweep
    sweep.process.wait(timeout=STOP_S)
    deadline = time.monotonic() + 10
    while alive(job_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphan = alive(job_pid)
    sweep.kill()  # clean up whatever is left before asserting

    assert not orphan
    jobs, _ = runs_of(tmp_path)
    assert outcomes(jobs) == [("0", "ok", "FINISHED"), ("1", "running", "RUNNING")]
    logged = artifact_json(tmp_path, jobs[0])
    on_disk = json.loads((sweep_dirs(tmp_path)[0] / "0" / "results.json").read_text())
    assert logged == on_disk and logged["status"] == "ok"
    assert jobs[0].data.metrics["peak_memory_bytes"] == logged["metrics"]["peak_memory_bytes"] > 0


def test_ctrl_c_of_a_rerun_is_one_line_and_records_the_rerun_as_killed(tmp_path: Path):
    code, stderr = run_sweep(["trainer.seed=1", "batch.size=1", *SMALL], tmp_path)
    assert code == 0, stderr
    original = runs_of(tmp_path)[0][0].info.run_id
    rerun = start_sweep(["--rerun", original], tmp_path, hang_seed_1(tmp_path), multirun=False)
    rerun.wait_for_file(tmp_path / "job.pid", START_S)
    rerun.signal_group(signal.SIGINT)

    assert rerun.finish(STOP_S) == 130
    assert "Traceback" not in rerun.stderr and "sweepbp.rerun: stopped (SIGINT)" in rerun.stderr
    reruns = [r for r in runs_of(tmp_path)[0] if r.data.tags.get("sweepbp.rerun_of") == original]
    assert [(r.data.tags["sweepbp.status"], r.info.status) for r in reruns] == [("killed", "KILLED")]


@contextmanager
def hanging_server() -> Iterator[tuple[str, queue.Queue]]:
    """A tracking server that answers /health (so pre-flight lets the sweep start) and then never answers an
    API call: a hung or overloaded server, the outage in which a client waits longest. Each API request's
    path and Authorization header go into the queue."""
    requests: queue.Queue = queue.Queue()
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/health"):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
                return
            requests.put((self.path, self.headers.get("Authorization")))
            release.wait(120)

        do_POST = do_GET

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", requests
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_sigterm_while_a_store_call_hangs_ends_the_sweep_within_seconds(tmp_path: Path):
    with hanging_server() as (host, requests):
        sweep = start_sweep(["trainer.seed=0,1", "batch.size=1", *SMALL, f"tracking.uri=http://alice:t0k3n@{host}"],
                            tmp_path, faulty=False)
        try:
            path, authorization = requests.get(timeout=START_S)  # job 0's first store call, waiting on the server
        except queue.Empty:
            sweep.kill()
            raise AssertionError(f"no store call within {START_S} s:\n{sweep.stderr[-3000:]}") from None
        os.kill(sweep.process.pid, signal.SIGTERM)  # what SLURM sends at the time limit
        stopped = time.monotonic()
        code = sweep.finish(STOP_S)
        took = time.monotonic() - stopped

    print(f"exit {code}, {took:.1f} s after SIGTERM")
    assert code == 143 and took < 15, (code, took)
    assert "Traceback" not in sweep.stderr and "t0k3n" not in sweep.stderr
    assert path.startswith("/api/2.0/mlflow/")
    assert authorization == "Basic " + base64.b64encode(b"alice:t0k3n").decode()  # the credentials, the MLflow way
    job = sweep_dirs(tmp_path)[0] / "0"
    assert json.loads((job / "results.json").read_text())["status"] == "killed"
    assert (job / "not_in_store.txt").exists() and "--sync" in sweep.stderr
