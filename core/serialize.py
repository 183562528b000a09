"""JSON shapes of jobs and activity entries, shared by the CLI's ``--json`` and the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .models import Activity, Job


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat()


def job_progress(job: Job) -> dict[str, Any]:
    """``{current, total, percentage, message, stage}`` of a job."""
    pct: float | None = None
    if job.progress_total and job.progress_current is not None and job.progress_total > 0:
        pct = round(max(0.0, min(100.0, 100.0 * job.progress_current / job.progress_total)), 2)
    if job.status == "completed":
        pct = 100.0
    weighted = job.weighted_percent if job.weighted_percent is not None else pct
    if job.status == "completed":
        weighted = 100.0
    return {
        "current": job.progress_current,
        "total": job.progress_total,
        "percentage": pct,
        "weightedPercent": None if weighted is None else round(weighted, 2),
        "message": job.progress_message,
        "stage": None
        if job.stage_name is None and job.stage_index is None
        else {"name": job.stage_name, "index": job.stage_index, "count": job.stage_count},
    }


def activity_to_dict(a: Activity) -> dict[str, Any]:
    """One activity entry."""
    return {"at": _iso(a.at), "level": a.level, "message": a.message, "context": a.context}


def job_to_dict(job: Job, activity: list[Activity] | None = None) -> dict[str, Any]:
    """A job as JSON: identity, status, progress, result/error, attempts, timestamps (+ activity)."""
    d: dict[str, Any] = {
        "id": job.id,
        "type": job.type,
        "kind": job.kind,
        "name": job.name,
        "status": job.status,
        "control": job.control,
        "interrupted": bool(job.interrupted),
        "progress": job_progress(job),
        "payload": job.payload,
        "result": job.result,
        "error": job.error,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "priority": job.priority,
        "timeout": job.timeout,
        "owner": job.owner,
        "room": job.room,
        "batch_id": job.batch_id,
        "checkpoint": job.checkpoint,
        "run_at": _iso(job.run_at),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "updated_at": _iso(job.updated_at),
    }
    if activity is not None:
        d["activity"] = [activity_to_dict(a) for a in activity]
    return d
