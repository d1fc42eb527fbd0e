"""Where the shard tasks run: one thread (one device, no contention) or Dask."""

from __future__ import annotations

import torch
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from visaudit.tasks.audit.request import AuditRequest


def task_runner_for(request: AuditRequest) -> TaskRunner:
    """The task runner a request asks for: one thread (the default), or Dask: an existing
    scheduler, else a LocalCluster of worker processes, one per GPU when there are GPUs
    (dask-cuda's LocalCUDACluster where installed)."""
    compute = request.compute
    if compute.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=1)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ValueError("--runner dask needs prefect-dask: pip install 'visaudit[dask]'") from None

    if compute.dask_address:
        return DaskTaskRunner(address=compute.dask_address)
    gpus = torch.cuda.device_count() if request.model.device in ("auto", "cuda") else 0
    if gpus:
        try:
            import dask_cuda  # noqa: F401

            return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster")
        except ImportError:
            pass
    workers = gpus or compute.dask_workers
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
