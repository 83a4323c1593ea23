"""JobService and ClusterService: thin translations between protobuf and the control plane.

The control plane (shardwright.scheduler.service) owns every decision and all state; this module
only converts messages, resolves the caller's tenant and maps errors to status codes:
ValueError -> INVALID_ARGUMENT, LookupError -> NOT_FOUND, PermissionError -> PERMISSION_DENIED,
JobLimitError (the tenant's max_jobs) -> RESOURCE_EXHAUSTED, other RuntimeErrors -> UNAVAILABLE.
"""

from __future__ import annotations

import time

import grpc
from pydantic import ValidationError

from shardwright.api.auth import Authenticator, tenant_of
from shardwright.api.gen.shardwright.v1 import cluster_pb2, cluster_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from shardwright.api.errors import one_line as _one_line
from shardwright.api.limits import FLAGS, RESUME_KEY
from shardwright.config import ParallelLayout
from shardwright.scheduler.jobs import JobLimitError

MAX_PAGE = 500


def _abort_for(context: grpc.ServicerContext, err: Exception) -> None:
    if isinstance(err, (ValueError, ValidationError)):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, _one_line(err))
    if isinstance(err, PermissionError):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, _one_line(err))
    if isinstance(err, LookupError):
        context.abort(grpc.StatusCode.NOT_FOUND, _one_line(err))
    if isinstance(err, JobLimitError):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _one_line(err))
    context.abort(grpc.StatusCode.UNAVAILABLE, _one_line(err))


def _layout(layout: dict) -> dict[str, int]:
    """A layout record as the wire's ParallelLayout fields (every axis; an absent one is 1)."""
    return {axis: int(layout.get(axis, 1)) for axis in ParallelLayout.model_fields}


def job_message(job: dict) -> jobs_pb2.Job:
    """A control-plane job record (plain dict) as a protobuf Job."""
    layout = job.get("layout") or {}
    return jobs_pb2.Job(
        job_id=job["job_id"], name=job.get("name", ""), kind=job.get("kind", ""), tenant=job.get("tenant", ""),
        state=job.get("state", ""), priority=job.get("priority", ""),
        layout=_layout(layout),
        submitted_at_s=float(job.get("submitted_at_s", 0)), updated_at_s=float(job.get("updated_at_s", 0)),
        message=job.get("message", ""), step=int(job.get("step", 0)), checkpoint=job.get("checkpoint") or "",
        num_events=int(job.get("num_events", 0)))


def event_message(event: dict) -> jobs_pb2.JobEvent:
    return jobs_pb2.JobEvent(sequence=int(event["sequence"]), job_id=event["job_id"], state=event.get("state", ""),
                             message=event.get("message", ""), time_s=float(event.get("time_s", 0)),
                             metrics={k: float(v) for k, v in (event.get("metrics") or {}).items()})


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, control, auth: Authenticator, stopping, max_age_s: float = 600.0) -> None:
        self.control, self.auth, self.stopping, self.max_age_s = control, auth, stopping, max_age_s

    def _call(self, context, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # mapped to a status code with a one-line message
            _abort_for(context, err)

    def SubmitJob(self, request, context):
        tenant = tenant_of(context, self.auth)
        job = self._call(context, self.control.submit_text, request.spec_yaml, tenant,
                         idempotency_key=request.idempotency_key or None)
        return job_message(job)

    def GetJob(self, request, context):
        return job_message(self._call(context, self.control.get, request.job_id, tenant_of(context, self.auth)))

    def ListJobs(self, request, context):
        if request.page_size < 0 or request.page_size > MAX_PAGE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"page_size must be 0..{MAX_PAGE}, got {request.page_size}")
        jobs, token = self._call(context, self.control.list, tenant_of(context, self.auth),
                                 page_size=request.page_size or 50, page_token=request.page_token or None,
                                 state=request.state or None, kind=request.kind or None)
        return jobs_pb2.ListJobsResponse(jobs=[job_message(j) for j in jobs], next_page_token=token or "")

    def CancelJob(self, request, context):
        return job_message(self._call(context, self.control.cancel, request.job_id, tenant_of(context, self.auth)))

    def WatchJob(self, request, context):
        tenant = tenant_of(context, self.auth)
        self._call(context, self.control.get, request.job_id, tenant)  # NOT_FOUND for others' jobs
        sequence, end = request.from_sequence, time.monotonic() + self.max_age_s
        while context.is_active() and not self.stopping.is_set():
            left = end - time.monotonic()
            if left <= 0:  # a stream holds a thread: none lives forever; the client comes back
                context.set_trailing_metadata(((RESUME_KEY, str(sequence)),))
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"this watch reached the server's maximum stream age ({self.max_age_s:g} s, "
                              f"{FLAGS['watch_max_age_s']}); watch {request.job_id} again from sequence {sequence}")
            events, finished = self._call(context, self.control.wait_events, request.job_id, sequence,
                                          timeout_s=min(1.0, left))
            for event in events:
                sequence = int(event["sequence"]) + 1
                yield event_message(event)
            if finished:
                return
        if self.stopping.is_set():  # not a finished job: tell the client to come back
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the server is shutting down; watch {request.job_id} "
                                                       f"again from sequence {sequence} once it is back")


class ClusterServicer(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(self, control, auth: Authenticator) -> None:
        self.control, self.auth = control, auth

    def GetCluster(self, request, context):
        tenant = tenant_of(context, self.auth)
        try:
            info = self.control.cluster_info(tenant)
        except Exception as err:  # mapped to a status code with a one-line message
            _abort_for(context, err)
        return cluster_pb2.ClusterInfo(
            nodes=[cluster_pb2.Node(**n) for n in info["nodes"]],
            gangs=[cluster_pb2.Gang(job_id=g["job_id"], kind=g["kind"], workers=g.get("workers", []),
                                    layout=_layout(g.get("layout", {})),
                                    memory_budget_bytes=int(g.get("memory_budget_bytes") or 0),
                                    memory_peers=int(g.get("memory_peers") or 0),
                                    memory_plan=g.get("memory_plan", []))
                   for g in info["gangs"]])
