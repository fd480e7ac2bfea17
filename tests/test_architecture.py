"""The architecture is checked, not hoped for: import-linter's contracts (pyproject.toml), no import cycle among
sweepbp's modules counting imports inside functions, and one catalogue of metrics that the docs show."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
from conftest import REPO

from sweepbp import metrics


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` run from `root` (its pyproject.toml, its lint/ contract types, its sweepbp first on the path)."""
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
                           "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_are_kept():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def copy_of_the_tree(folder: Path) -> Path:
    """sweepbp, lint/ and pyproject.toml copied into `folder`, where lint-imports finds them first."""
    shutil.copytree(REPO / "src" / "sweepbp", folder / "sweepbp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "lint", folder / "lint", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", folder / "pyproject.toml")
    return folder


def test_the_contracts_catch_what_they_are_for(tmp_path):
    """The same tree with `import torch` added to a sweepbp.cli module, `import lightning` to a module predict
    imports, and allocator calls written three ways outside sweepbp.measure: each breaks a contract, and
    lint-imports names the line."""
    tree = copy_of_the_tree(tmp_path)
    usage = tree / "sweepbp" / "cli" / "usage.py"
    usage.write_text(usage.read_text() + "\nimport torch  # noqa: E402,F401\n")
    model = tree / "sweepbp" / "train" / "model.py"  # imported by predict: a prediction would import Lightning
    model.write_text(model.read_text() + "\nimport lightning  # noqa: E402,F401\n")
    job = tree / "sweepbp" / "job.py"
    job.write_text(job.read_text() + "\n\ndef _peeks():\n    from torch import cuda\n    import torch.cuda as tc\n"
                   "    return torch.cuda.max_memory_allocated(), cuda.memory_reserved(), tc.empty_cache()\n")
    done = lint_imports(tree)
    assert done.returncode != 0
    assert "sweepbp.cli is not allowed to import torch" in done.stdout
    assert "sweepbp.cli.usage -> torch" in done.stdout
    assert "sweepbp.predict is not allowed to import lightning" in done.stdout
    for call in ("torch.cuda.max_memory_allocated", "torch.cuda.memory_reserved", "torch.cuda.empty_cache"):
        assert f"uses {call}" in done.stdout, done.stdout[-3000:]


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other in a circle (Tarjan), the singletons left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in edges[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle_among_modules_counting_imports_inside_functions():
    graph = grimp.build_graph("sweepbp", cache_dir=None)  # grimp reads every import statement, in functions too
    modules = {m for m in graph.modules if m.startswith("sweepbp")}
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i in modules} for m in modules}
    assert len(modules) > 40
    assert strongly_connected(edges) == []
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check works


def test_docs_show_the_catalogue_as_the_command_prints_it():
    page = (REPO / "docs" / "metrics.md").read_text()
    shown = re.search(r"<!-- python -m sweepbp\.metrics -->\n(.*?)<!-- end -->", page, flags=re.S)
    assert shown, "docs/metrics.md lacks the catalogue between its markers"
    printed = subprocess.run([sys.executable, "-m", "sweepbp.metrics"], capture_output=True, text=True, check=True)
    assert shown.group(1) == printed.stdout


def test_every_metric_a_real_job_and_a_prediction_record_is_in_the_catalogue(tmp_path):
    from conftest import FAST, compose

    from sweepbp.job import run_job

    measured = run_job(compose([*FAST, "tracking=none", "memory=offload"]))
    predicted = run_job(compose([*FAST, "tracking=none", "mode=predict", "memory=ckpt"]))
    assert measured.status == predicted.status == "ok", (measured.error, predicted.error)
    unknown = sorted(name for name in {*measured.metrics, *predicted.metrics} if not metrics.known(name))
    assert unknown == []
    assert "predicted_peak_memory_bytes" in measured.metrics and "host_offload_bytes" in measured.metrics


def test_every_metric_name_written_in_the_code_is_in_the_catalogue():
    """Names the code writes as `...metrics["name"]` or returns in a figures dict (the GPU-only ones too,
    which a CPU run never records)."""
    written = set()
    for path in (REPO / "src" / "sweepbp").rglob("*.py"):
        text = path.read_text()
        written |= set(re.findall(r"metrics\[\"([a-z_]+)\"\]\s*=", text))
        written |= set(re.findall(r"\"([a-z_]+_(?:bytes|pct))\": float\(", text))
    assert {"mfu", "tracker_vs_allocated_pct", "peak_allocated_bytes", "inference_peak_allocated_bytes"} <= written
    assert sorted(n for n in written if not metrics.known(n)) == []


def test_readme_metrics_are_catalogue_names():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Metrics"):readme.index("\n## ", readme.index("## Metrics") + 5)]
    names = re.findall(r"^\| `([a-z_]+)`", section, flags=re.M)
    names += [n for row in re.findall(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)+)", section, flags=re.M)
              for n in re.findall(r"`([a-z_]+)`", row)]
    assert len(names) > 15
    assert [n for n in names if not metrics.known(n)] == []
