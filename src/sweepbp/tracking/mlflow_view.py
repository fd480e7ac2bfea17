"""What the MLflow UI (3.17) shows on first open, as far as a store can preset it: plain data, no mlflow import.

Read from the UI's own code (mlflow/server/js/build): it opens an experiment in the view of a global
"GenAI / Model training" toggle kept in the browser (default GenAI) unless the URL says `workflowType=`; the
`mlflow.experimentKind` experiment tag is what older and hosted UIs read instead. The runs table's columns,
grouping and charts live in the browser too, except for a *shared view*: an experiment tag
`mlflow.sharedViewState.<key>` holding that state as JSON, applied when the URL carries
`viewStateShareKey=<key>`. So the store writes the experiment's description and kind, and a shared view
(`VIEW_KEY`): the runs grouped by sweep (every job visible under its sweep, no row to unfold), the swept
params and the key metrics as columns, a scatter of peak memory against throughput; and the terminal prints
the URL that opens it. What only the browser can choose (unfolding a parent run, the assistant panel) stays
the browser's.
"""

from __future__ import annotations

import json
from pathlib import Path

from sweepbp.config import redact_uri
from sweepbp.tracking.uris import sqlite_path

VIEW_KEY = "sweepbp"
VIEW_TAG = "mlflow.sharedViewState." + VIEW_KEY
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # "Machine learning", not GenAI
DESCRIPTION_TAG = "mlflow.note.content"
DESCRIPTION = """\
sweepbp: fine-tuning jobs measured (or predicted) for their memory and speed. Each sweep is a parent run named
after what it swept (`lora.r=8,16 x memory=ckpt,none (4 jobs)`); its jobs are named after their values of the
swept keys (`memory=ckpt r=8`). The key metrics: `peak_memory_bytes` (exact peak of live tensors in one
training step), `activation_bytes` (what the backward keeps), `tokens_per_s` (throughput of the timed
steps in real tokens); `mode=predict` jobs record `predicted_peak_memory_bytes` instead. A sweep's parent run holds its
answer: `best_tokens_per_s`, `lowest_peak_memory_bytes`, `jobs_ok`, `jobs_oom`, and summary.md, summary.csv,
tradeoff.png. Open the view sweepbp prints at the end of a sweep (`...&viewStateShareKey=sweepbp`) for these
columns and charts; docs/report.md in the sweepbp repository says more."""
# The columns every sweep shows, after its swept params: the jobs' key metrics, then the sweep's answer.
METRIC_COLUMNS = ("tokens_per_s", "peak_memory_bytes", "predicted_peak_memory_bytes", "activation_bytes",
                  "predicted_activation_bytes", "auto_batch_size", "jobs_ok", "jobs_oom", "best_tokens_per_s",
                  "lowest_peak_memory_bytes", "lowest_predicted_peak_memory_bytes")
SECTION = "sweepbp-section"
NAME_COLUMN, NAME_WIDTH = "attributes.`Run Name`", 380  # pixels: the UI's default cuts names at ~20 characters


def column(kind: str, key: str) -> str:
    """A runs-table column as the UI names it: `metrics.`tokens_per_s``, `params.`lora.r``."""
    return f"{kind}.`{key}`"


def view_state(params: list[str], group_tag: str, status_tag: str) -> dict:
    """The shared view: runs grouped by sweep (`group_tag`), the params `params` and the key metrics as
    columns, newest first, and three charts (scatter, parallel coordinates, predicted peaks)."""
    columns = [column("tags", status_tag), *(column("params", p) for p in params),
               *(column("metrics", m) for m in METRIC_COLUMNS)]
    # The table's own columns first (its ids, read off the page), then ours in this order, not its alphabetical one.
    order = [NAME_COLUMN, "runDateAndNestInfo", "duration", *columns]
    return {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False,
            "selectedColumns": columns, "columnOrder": order, "columnWidths": {NAME_COLUMN: NAME_WIDTH},
            "groupBy": {"aggregateFunction": "max", "groupByKeys": [{"mode": "tag", "groupByData": group_tag}]},
            "groupsExpanded": {}, "useGroupedValuesInCharts": False, "hideEmptyCharts": True,
            "compareRunSections": [{"uuid": SECTION, "name": "sweepbp", "display": True, "isReordered": False,
                                    "deleted": False, "isGenerated": False, "columns": 2, "cardHeight": 480}],
            "compareRunCharts": _charts(params)}


def _charts(params: list[str]) -> list[dict]:
    common = {"runsCountToCompare": 100, "metricSectionId": SECTION, "deleted": False, "isGenerated": False}
    return [
        {**common, "uuid": "sweepbp-scatter", "type": "SCATTER", "displayName": "tokens_per_s vs peak_memory_bytes",
         "xaxis": {"key": "peak_memory_bytes", "type": "METRIC"}, "yaxis": {"key": "tokens_per_s", "type": "METRIC"}},
        {**common, "uuid": "sweepbp-parallel", "type": "PARALLEL", "displayName": "swept params -> memory, speed",
         "selectedParams": params, "selectedMetrics": ["peak_memory_bytes", "activation_bytes", "tokens_per_s"],
         "showAllRuns": True},
        {**common, "uuid": "sweepbp-predicted", "type": "BAR", "displayName": "predicted_peak_memory_bytes",
         "metricKey": "predicted_peak_memory_bytes"},
    ]


def merged_params(previous: str | None, params: list[str]) -> list[str]:
    """The params of the view already written (other sweeps of the experiment), then this sweep's new ones."""
    try:
        known = [c[len("params.`"):-1] for c in json.loads(previous or "{}").get("selectedColumns", [])
                 if c.startswith("params.`")]
    except (ValueError, AttributeError):
        known = []
    return [*known, *(p for p in params if p not in known)]


def view_url(base: str, experiment_id: str) -> str:
    """The URL of the experiment's runs in the Model training view, with sweepbp's shared view applied."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")


def ui_lines(uri: str, experiment_id: str, parent_id: str | None, here: Path) -> list[str]:
    """Where to look, for the terminal: the parent run, and how to open the view on this store."""
    if uri.startswith(("http://", "https://")):
        serve, base = None, redact_uri(uri)
    else:
        db = sqlite_path(uri)
        local = db is not None and db.resolve() == (here / "mlflow.db").resolve()
        serve = "mlflow ui" if local else f"mlflow ui --backend-store-uri {redact_uri(uri)}"
        base = "http://127.0.0.1:5000"
    lines = [f"[sweepbp] MLflow: the sweep's run is {parent_id} (experiment {experiment_id})" if parent_id else
             "[sweepbp] MLflow: every job was already recorded (resume=true), so this sweep opened no run of its own"]
    lines.append(f"[sweepbp] browse it: {serve + ', then open ' if serve else ''}{view_url(base, experiment_id)}")
    return lines
