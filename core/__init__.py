"""progressbot's engine: durable jobs, the worker, progress monitoring and events.

It imports no chat library and no HTTP library; adapters and the bot build on its public API.
"""

from .context import JobContext, ProgressState, SyncJobContext
from .errors import (
    IllegalTransition,
    JobCancelled,
    JobNotFound,
    JobPaused,
    PayloadError,
    ProgressbotError,
    UnknownJobType,
)
from .events import EventBus, JobProgressEvent, Subscription
from .models import Activity, Batch, Job, JobKind, JobStatus, MessageBinding
from .monitor import JobProgressMonitor
from .registry import HandlerRegistry, default_registry, handler
from .service import DirectRun, JobRequest, ProgressService, ServiceConfig

__all__ = [
    "Activity",
    "Batch",
    "DirectRun",
    "EventBus",
    "HandlerRegistry",
    "IllegalTransition",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobKind",
    "JobNotFound",
    "JobPaused",
    "JobProgressEvent",
    "JobProgressMonitor",
    "JobRequest",
    "JobStatus",
    "MessageBinding",
    "PayloadError",
    "ProgressService",
    "ProgressState",
    "ProgressbotError",
    "ServiceConfig",
    "Subscription",
    "SyncJobContext",
    "UnknownJobType",
    "default_registry",
    "handler",
]
