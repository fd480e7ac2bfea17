"""Screenshot of the MLflow UI's chart view for the latest sweepbp sweep, with headless Chromium.

Not part of the test suite. Needs Debian's `chromium` and `chromium-driver` and the `selenium` package
(`pip install -e ".[docs]"`). Run it in the folder a sweep was launched from:

    python -m sweepbp -m lora.r=8,16 memory=ckpt,none
    python scripts/mlflow_ui_screenshot.py --out docs/img/mlflow_ui.png

It starts `mlflow server` on the store (or uses `--url` of a running one), expands the latest sweep's
parent run so its jobs show, and replaces the chart view's auto-generated bar charts with a scatter of
memory against throughput and a parallel-coordinates chart of the swept params, by writing the UI's
own saved view state (localStorage) and reloading: the UI has no URL for a chart layout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")


# Both charts are drawn: the scatter's points and the parallel-coordinates lines exist as SVG.
CHARTS_DRAWN = ("return (document.querySelectorAll('.scatterlayer .point').length > 0"
                " && document.querySelectorAll('.parcoords-line, .parcoords .axis').length > 0) || null")


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def start_server(tracking_uri: str) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free local port, serving the store's artifacts too."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", tracking_uri],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.read().strip() == b"OK":
                    return proc, url
        except OSError:
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"mlflow server on {tracking_uri} did not answer within 300 s")


def latest_sweep(url: str, experiment: str) -> tuple[str, dict, list[dict]]:
    """The experiment id, the latest sweep's parent run and its job runs."""
    experiment_id = api(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=" + experiment)[
        "experiment"]["experiment_id"]
    parents = api(url, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment_id], "filter": "tags.`sweepbp.role` = 'sweep'", "max_results": 1,
        "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    if not parents:
        raise SystemExit(f"no sweep in experiment {experiment!r}")
    parent = parents[0]
    sweep_id = _tags(parent)["sweepbp.sweep_id"]
    runs = api(url, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment_id], "filter": f"tags.`sweepbp.sweep_id` = '{sweep_id}'",
        "max_results": 1000}).get("runs", [])
    return experiment_id, parent, [r for r in runs if _tags(r).get("sweepbp.role") != "sweep"]


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def swept_params(runs: list[dict]) -> list[str]:
    """Params whose value differs between the sweep's jobs (group options first, then dotted leaves)."""
    values: dict[str, set[str]] = {}
    for run in runs:
        for param in run["data"].get("params", []):
            values.setdefault(param["key"], set()).add(param["value"])
    varied = [k for k, v in values.items() if len(v) > 1 and not k.startswith(("tracking.", "memory.name"))]
    return sorted(varied, key=lambda k: ("." in k, k))


def chart_state(state: dict, parent_id: str, params: list[str], x: str, y: str) -> dict:
    """The UI's saved view with our two charts first and the parent run expanded."""
    section = state["compareRunSections"][0]["uuid"]
    scatter = {"uuid": "sweepbp-scatter", "type": "SCATTER", "runsCountToCompare": 100, "metricSectionId": section,
               "deleted": False, "isGenerated": False, "displayName": f"{y} vs {x}",
               "xaxis": {"key": x, "type": "METRIC"}, "yaxis": {"key": y, "type": "METRIC"}}
    parallel = {"uuid": "sweepbp-parallel", "type": "PARALLEL", "runsCountToCompare": 100, "metricSectionId": section,
                "deleted": False, "isGenerated": False, "displayName": "swept params -> memory and throughput",
                "selectedParams": params, "selectedMetrics": [x, "activation_bytes", y], "showAllRuns": True}
    generated = [dict(c, deleted=True) for c in state.get("compareRunCharts", []) if c.get("isGenerated")]
    # Two wide, tall cards in the first section; the other sections (system metrics: none logged) folded.
    sections = [dict(s, columns=2, cardHeight=560) if s["uuid"] == section else dict(s, display=False)
                for s in state["compareRunSections"]]
    return {**state, "compareRunCharts": [scatter, parallel, *generated], "compareRunSections": sections,
            "runsExpanded": {parent_id: True}, "runListHidden": False, "hideEmptyCharts": True}


def screenshot(url: str, experiment_id: str, parent_id: str, params: list[str], x: str, y: str, out: Path,
               width: int, height: int) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(300)
    key = f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState'
    try:
        driver.get(f"{url}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART")
        # The UI saves its view once it has generated the chart sections from the runs' metrics.
        state = _wait_for(driver, f"var s = window.localStorage.getItem({json.dumps(key)});"
                                  "return s && (JSON.parse(s).compareRunSections || []).length ? s : null",
                          "the saved view")
        new_state = chart_state(json.loads(state), parent_id, params, x, y)
        driver.execute_script("window.localStorage.setItem(arguments[0], arguments[1]);"
                              "window.localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');",
                              key, json.dumps(new_state))
        driver.refresh()
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            _wait_for(driver, CHARTS_DRAWN, "the two charts")
        except SystemExit:
            driver.save_screenshot(str(out.with_suffix(".failed.png")))  # what the page showed instead
            raise
        time.sleep(5)  # plotly's transitions
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def _wait_for(driver, script: str, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(1)
    raise SystemExit(f"the MLflow UI did not show {what} within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path('mlflow.db').resolve()}")
    parser.add_argument("--url", help="a running MLflow server or `mlflow ui` (default: start one on the store)")
    parser.add_argument("--experiment", default="sweepbp")
    parser.add_argument("--x", default="peak_memory_bytes")
    parser.add_argument("--y", default="tokens_per_s")
    parser.add_argument("--out", type=Path, default=Path("docs/img/mlflow_ui.png"))
    parser.add_argument("--size", default="1600x1000", help="browser window, WIDTHxHEIGHT")
    args = parser.parse_args()
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args.tracking_uri)
    try:
        experiment_id, parent, runs = latest_sweep(url, args.experiment)
        params = swept_params(runs)
        width, height = (int(v) for v in args.size.split("x"))
        screenshot(url, experiment_id, parent["info"]["run_id"], params, args.x, args.y, args.out, width, height)
        print(f"{args.out}: sweep {_tags(parent)['sweepbp.sweep_id']}, {len(runs)} runs, params {params}")
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server this script started, and its worker
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
