"""progressbot's engine: durable jobs, the worker, progress monitoring and events.

It imports no chat library and no HTTP library; adapters and the bot build on it. This package exports
what a handler author and an application embedding the engine use, with the types its methods return::

    from core import JobContext, handler

    @handler("site-build", payload=SiteBuild)
    async def build(ctx: JobContext, data: SiteBuild) -> dict[str, int]: ...

Everything else lives in the submodules and may change.
"""

from .context import JobContext, SyncJobContext
from .errors import IllegalTransition, JobNotFound, PayloadError, ProgressbotError, UnknownJobType
from .events import JobProgressEvent
from .lifecycle import Action
from .models import Activity, Batch, Control, Job, JobKind, JobStatus, Progress
from .monitor import JobView
from .refs import JobRef
from .registry import HandlerRegistry, handler
from .service import JobRequest, ProgressService, ServiceConfig
from .store import ActionResult, BatchSummary, JobFilters

__all__ = [
    "Action",
    "ActionResult",
    "Activity",
    "Batch",
    "BatchSummary",
    "Control",
    "HandlerRegistry",
    "IllegalTransition",
    "Job",
    "JobContext",
    "JobFilters",
    "JobKind",
    "JobNotFound",
    "JobProgressEvent",
    "JobRef",
    "JobRequest",
    "JobStatus",
    "JobView",
    "PayloadError",
    "Progress",
    "ProgressService",
    "ProgressbotError",
    "ServiceConfig",
    "SyncJobContext",
    "UnknownJobType",
    "handler",
]
