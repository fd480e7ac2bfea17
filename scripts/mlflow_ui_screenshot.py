"""What a new user sees of sweepbp's runs in the MLflow UI, checked and photographed in headless Chromium.

Not part of the test suite. Needs Debian's `chromium` and `chromium-driver` and the `selenium` package
(`pip install -e ".[docs]"`). Run it in the folder sweeps were launched from, or let it run them first:

    python scripts/mlflow_ui_screenshot.py --sweep "lora.r=8,16 memory=ckpt,none" \\
        --sweep "memory=ckpt memory.every=1,2,4"

It starts `mlflow server` on the store (or uses `--url` of a running one) and opens, in a browser profile
that has never seen MLflow, the URL a sweep prints at its end (sweepbp.tracking.mlflow_view.view_url). Two
pictures:
  1. `--first` (docs/img/mlflow_ui_first_view.png): that page as it opens, nothing clicked.
  2. `--out` (docs/img/mlflow_ui.png): the same page's chart view (its URL with compareRunsMode=CHART, what
     the chart-view button does), after a click on the assistant panel's close button.
It checks that the parent run and every job of the latest `--sweeps` sweeps are named whole (not cut off)
in a cell of the first view's table, and exits non-zero if one is not.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from sweepbp.tracking.mlflow_view import view_url

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")
# The chart view is drawn: the scatter's points and the parallel-coordinates lines exist as SVG.
CHARTS_DRAWN = ("return (document.querySelectorAll('.scatterlayer .point').length > 0"
                " && document.querySelectorAll('.parcoords-line, .parcoords .axis').length > 0) || null")
# The names (arguments[0]) that no table cell shows whole: absent, or cut off by the cell (an ellipsis).
UNREADABLE = """
const shown = new Set();
for (const cell of document.querySelectorAll('.ag-cell')) {
  for (const el of cell.querySelectorAll('*')) {
    if (el.children.length || !arguments[0].includes(el.innerText)) continue;
    let cut = false;
    for (let up = el; up && up !== cell.parentElement; up = up.parentElement) {
      if (up.scrollWidth > up.clientWidth + 1) cut = true;
    }
    if (!cut) shown.add(el.innerText);
  }
}
return arguments[0].filter(name => !shown.has(name));
"""
CLOSE_ASSISTANT = "[data-component-id='mlflow.assistant.chat_panel.close']"


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


def expected_names(tracking_uri: str, experiment: str, sweeps: int) -> tuple[str, list[str]]:
    """The experiment's id, and the names the first view must show: the latest sweeps' parent runs and jobs."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment {experiment!r} in {tracking_uri}")
    parents = client.search_runs([found.experiment_id], "tags.`sweepbp.role` = 'sweep'", max_results=sweeps,
                                 order_by=["attributes.start_time DESC"])
    names = []
    for parent in parents:
        jobs = client.search_runs([found.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        names += [parent.info.run_name, *(job.info.run_name for job in jobs)]
    return found.experiment_id, names


def browse(url: str, names: list[str], first: Path, out: Path, width: int, height: int) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(300)
    try:
        driver.get(url)
        _wait_for(driver, lambda: not driver.execute_script(UNREADABLE, names))
        time.sleep(3)  # the grid's last layout pass
        first.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(first))
        unreadable = driver.execute_script(UNREADABLE, names)
        if unreadable:
            raise SystemExit(f"{first}: not readable in the first view (absent or cut off): {unreadable}")
        print(f"{first}: the first view shows all {len(names)} names whole: {names}")
        driver.get(url + "&compareRunsMode=CHART")  # what the chart-view button does
        _wait_for(driver, lambda: driver.find_elements(By.CSS_SELECTOR, CLOSE_ASSISTANT))
        driver.find_element(By.CSS_SELECTOR, CLOSE_ASSISTANT).click()
        if not _wait_for(driver, lambda: driver.execute_script(CHARTS_DRAWN)):
            raise SystemExit(f"the MLflow UI did not draw the scatter and parallel-coordinates charts of {url}")
        time.sleep(5)  # plotly's transitions
        driver.save_screenshot(str(out))
        print(f"{out}: the chart view of the same page, assistant panel closed")
    finally:
        driver.quit()


def _wait_for(driver, ready, timeout: float = 120.0) -> bool:
    """Whether `ready()` came true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(1)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="append", default=[],
                        help="run `python -m sweepbp -m SWEEP` here first (repeatable)")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path('mlflow.db').resolve()}")
    parser.add_argument("--url", help="a running MLflow server or `mlflow ui` on that store (default: start one)")
    parser.add_argument("--experiment", default="sweepbp")
    parser.add_argument("--sweeps", type=int, default=2, help="how many of the latest sweeps must be readable")
    parser.add_argument("--first", type=Path, default=Path("docs/img/mlflow_ui_first_view.png"))
    parser.add_argument("--out", type=Path, default=Path("docs/img/mlflow_ui.png"))
    parser.add_argument("--size", default="1920x1080", help="browser window, WIDTHxHEIGHT")
    args = parser.parse_args()
    for sweep in args.sweep:
        subprocess.run([sys.executable, "-m", "sweepbp", "-m", *shlex.split(sweep)], check=True)
    experiment_id, names = expected_names(args.tracking_uri, args.experiment, args.sweeps)
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args.tracking_uri)
    try:
        width, height = (int(v) for v in args.size.split("x"))
        browse(view_url(url, experiment_id), names, args.first.resolve(), args.out.resolve(), width, height)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server this script started, and its worker
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
