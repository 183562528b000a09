"""JSON shapes of jobs and activity entries, shared by the CLI's ``--json`` and the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .models import Activity, Job, Progress, stage_json


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat()


def job_progress(job: Job) -> dict[str, Any]:
    """``{current, total, percentage, message, stage}`` of a job."""
    p = Progress.of(job)
    pct = p.percentage()
    if pct is not None:
        pct = round(pct, 2)
    if job.status == "completed":
        pct = 100.0
    weighted = p.weighted_percent if p.weighted_percent is not None else pct
    if job.status == "completed":
        weighted = 100.0
    return {
        "current": p.current,
        "total": p.total,
        "percentage": pct,
        "weightedPercent": None if weighted is None else round(weighted, 2),
        "message": p.message,
        "stage": stage_json(p.stage_name, p.stage_index, p.stage_count),
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
