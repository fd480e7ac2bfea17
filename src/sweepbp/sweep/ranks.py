"""Several devices in one job (strategy=ddp or fsdp, trainer.devices=N): one process per rank, results merged.

sweepbp starts the ranks itself, each forked like a single-device job (see sweep/worker.py), with the
environment torchrun would give them (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK). Lightning
sees LOCAL_RANK, treats the processes as created externally, and only joins them into a process group.
Lightning's own `ddp` launcher would re-execute sys.argv, i.e. the whole `python -m sweepbp -m ...` sweep,
and `ddp_spawn`/`ddp_fork` would run the ranks as children of the job process, which then could not
have touched CUDA and would have to ship the results back through Lightning's checkpoint of the weights.

Every rank measures itself (its own exact memory tracker, its own step timers) and sends its JobResult
to the sweep process, which merges them into one result, so one MLflow run holds every rank's figures
and no rank writes to MLflow at all. The job side of the ranks is sweepbp.train.distributed.
"""

from __future__ import annotations

import socket

from sweepbp import metrics
from sweepbp.metrics import Merge
from sweepbp.result import JobResult, Status


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the ranks' rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_environment(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun would set for one rank on one node."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "NODE_RANK": "0"}


def merge_ranks(results: list[JobResult]) -> JobResult:
    """One result for the job: rank 0's record, throughput summed, memory as the maximum over ranks,
    and per-rank copies (`peak_memory_bytes_rank1`, ...) of the figures that differ between ranks."""
    merged = JobResult(**{**results[0].__dict__, "metrics": dict(results[0].metrics),
                          "environment": dict(results[0].environment)})
    merged.status = min((r.status for r in results), key=lambda status: status.severity)
    if merged.status != Status.OK:
        merged.error = next((f"rank {i}: {r.error}" for i, r in enumerate(results) if r.status == merged.status), None)
    for key in metrics.merged_by(Merge.SUM):  # work per second: every rank's, when every rank has it
        values = [r.metrics[key] for r in results if key in r.metrics]
        if len(values) == len(results):
            merged.metrics[key] = sum(values)
    for key in metrics.merged_by(Merge.MAX):  # what the largest rank holds, the slowest rank takes
        values = [r.metrics[key] for r in results if key in r.metrics]
        if values:
            merged.metrics[key] = max(values)
    for rank, result in enumerate(results):
        for key in metrics.per_rank():
            if key in result.metrics:
                merged.metrics[f"{key}_rank{rank}"] = result.metrics[key]
    merged.metrics["world_size"] = float(len(results))
    merged.environment["world_size"] = str(len(results))
    return merged
