"""import-linter contract types of sweepbp's own: rules about what modules call, which imports cannot show.

`forbidden_calls`: no module of `source_modules`, except those in `allowed_modules`, calls an attribute
chain listed in `forbidden_calls` (e.g. `torch.cuda.max_memory_allocated`). sweepbp uses it so that only
sweepbp.measure touches the CUDA allocator: an import rule cannot say it, since every module that imports
torch can reach `torch.cuda`. Registered in pyproject.toml (`contract_types`); `lint-imports` runs it with
the other contracts, from the project's root (import-linter puts the working folder on sys.path).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import grimp
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


class ForbiddenCallsContract(Contract):
    """No module of `source_modules` outside `allowed_modules` uses one of `forbidden_calls`."""

    type_name = "forbidden_calls"

    source_modules = fields.ListField(subfield=fields.StringField())
    allowed_modules = fields.ListField(subfield=fields.StringField(), required=False)
    forbidden_calls = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        allowed = list(self.allowed_modules or [])  # type: ignore[arg-type]
        wanted = set(self.forbidden_calls)  # type: ignore[arg-type]
        found: list[tuple[str, int, str]] = []
        for module in sorted(graph.modules):
            if not _within(module, self.source_modules) or _within(module, allowed):  # type: ignore[arg-type]
                continue
            path = _source_of(module)
            if path is None:
                continue
            for line, chain in _attribute_chains(path.read_text()):
                if chain in wanted:
                    found.append((module, line, chain))
        return ContractCheck(kept=not found, metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for module, line, chain in check.metadata["found"]:
            output.print_error(f"{module}:{line} uses {chain}", bold=False)
            output.new_line()


def _within(module: str, packages: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _source_of(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _attribute_chains(source: str) -> list[tuple[int, str]]:
    """Every dotted name in the source (`torch.cuda.max_memory_allocated`), with its line, spelt out through
    the module's imports: `from torch import cuda` then `cuda.max_memory_allocated`, `import torch.cuda as tc`
    then `tc.max_memory_allocated`, and `from torch.cuda import max_memory_allocated` all count as the full path."""
    tree = ast.parse(source)
    imported: dict[str, str] = {}  # a name the module binds -> the dotted path it stands for
    chains = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                chains.append((node.lineno, f"{node.module}.{alias.name}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    imported[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = []
            current: ast.AST = node
            while isinstance(current, ast.Attribute):
                parts.append(current.attr)
                current = current.value
            if isinstance(current, ast.Name):
                root = imported.get(current.id, current.id)
                chains.append((node.lineno, ".".join([root, *reversed(parts)])))
    return chains
