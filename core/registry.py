"""The handler registry: job types, their payload models, and validation at submit time."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, overload

from pydantic import BaseModel, ValidationError

from .context import JobContext, SyncJobContext
from .errors import PayloadError, UnknownJobType
from .text import MAX_DEPTH, clean_json, json_depth_exceeds

#: Who may start a job type from chat: anyone in a configured room; ``auth.runners`` (anyone, while that
#: list is empty), moderators and admins; or ``auth.admins`` only. The HTTP API's token holder and the CLI
#: operator run everything.
RunPermission = Literal["anyone", "runners", "admins"]
RUN_PERMISSIONS: tuple[str, ...] = get_args(RunPermission)

#: Payloads larger than this (as JSON) are refused, so a chat command or API call cannot bloat the DB.
MAX_PAYLOAD_BYTES = 64 * 1024

#: A handler as stored: ``async def h(ctx: JobContext, data)``, or ``def h(ctx: SyncJobContext, data)`` (run
#: in a thread). ``data`` is an instance of the payload model, or the payload dict when there is none.
HandlerFn = Callable[..., Any]

M = TypeVar("M", bound=BaseModel)
Ctx = TypeVar("Ctx", JobContext, SyncJobContext)
R = TypeVar("R")
#: What the decorators return for a payload model ``M``: the function unchanged, its type checked against
#: the model (a handler declaring another payload type is a type error).
Decorator = Callable[[Callable[[Ctx, M], R]], Callable[[Ctx, M], R]]
F = TypeVar("F", bound=HandlerFn)


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered handler: its job type, function, payload model and defaults."""

    name: str
    fn: HandlerFn
    payload_model: type[BaseModel] | None
    is_async: bool
    description: str
    max_attempts: int | None = None
    timeout: float | None = None
    #: Who may start it from chat (see :data:`RunPermission`); ``auth.run_permissions`` overrides it.
    run_by: RunPermission = "runners"


def format_validation_error(exc: ValidationError) -> list[str]:
    """Turn a pydantic error into short ``field: problem`` lines for a chat user."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "payload"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        out.append(f"{loc}: {msg}")
    return out


class HandlerRegistry:
    """Maps job types to handlers. Validates payloads against each handler's pydantic model."""

    def __init__(self) -> None:
        self._handlers: dict[str, HandlerSpec] = {}

    def register(
        self,
        name: str,
        fn: HandlerFn,
        *,
        payload: type[BaseModel] | None = None,
        description: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        run_by: RunPermission = "runners",
    ) -> HandlerSpec:
        """Register ``fn`` as the handler of job type ``name`` (replacing an earlier one).

        ``run_by`` says who may start it from chat (see :data:`RunPermission`).
        """
        if run_by not in RUN_PERMISSIONS:
            raise ValueError(f"run_by: must be one of {', '.join(RUN_PERMISSIONS)}")
        doc = description or (inspect.getdoc(fn) or "").split("\n", 1)[0]
        spec = HandlerSpec(
            name=name,
            fn=fn,
            payload_model=payload,
            is_async=inspect.iscoroutinefunction(fn),
            description=doc,
            max_attempts=max_attempts,
            timeout=timeout,
            run_by=run_by,
        )
        self._handlers[name] = spec
        return spec

    @overload
    def handler(
        self,
        name: str,
        *,
        payload: type[M],
        description: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        run_by: RunPermission = "runners",
    ) -> Decorator[Ctx, M, R]: ...

    @overload
    def handler(
        self,
        name: str,
        *,
        payload: None = None,
        description: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        run_by: RunPermission = "runners",
    ) -> Callable[[F], F]: ...

    def handler(
        self,
        name: str,
        *,
        payload: type[BaseModel] | None = None,
        description: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        run_by: RunPermission = "runners",
    ) -> Callable[[HandlerFn], HandlerFn]:
        """Decorator form of :meth:`register`; returns the function unchanged (its type too)."""

        def deco(fn: HandlerFn) -> HandlerFn:
            self.register(
                name,
                fn,
                payload=payload,
                description=description,
                max_attempts=max_attempts,
                timeout=timeout,
                run_by=run_by,
            )
            return fn

        return deco

    def get(self, name: str) -> HandlerSpec:
        """The handler of ``name``; raises :class:`UnknownJobType`."""
        try:
            return self._handlers[name]
        except KeyError:
            raise UnknownJobType(name, list(self._handlers)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def types(self) -> list[str]:
        """The registered job types, sorted."""
        return sorted(self._handlers)

    def specs(self) -> list[HandlerSpec]:
        """All registered handlers, sorted by type."""
        return [self._handlers[k] for k in self.types()]

    def validate(self, name: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        """Validate a payload for job type ``name`` and return its JSON-ready, normalised form.

        Raises :class:`UnknownJobType` or :class:`PayloadError`; nothing is stored in either case.
        """
        spec = self.get(name)
        data = payload or {}
        if not isinstance(data, dict):
            raise PayloadError(name, ["payload: must be a JSON object"])
        if json_depth_exceeds(data, MAX_DEPTH):
            raise PayloadError(name, [f"payload: nested deeper than {MAX_DEPTH} levels"])
        # Lone surrogates (a "\udcff" escape in JSON, a non-UTF-8 argument) become U+FFFD here, once.
        data = clean_json(data)
        try:
            size = len(json.dumps(data, default=str))
        except (TypeError, ValueError) as exc:
            raise PayloadError(name, [f"payload: not JSON-serialisable ({exc})"]) from None
        if size > MAX_PAYLOAD_BYTES:
            raise PayloadError(name, [f"payload: too large ({size} bytes, limit {MAX_PAYLOAD_BYTES})"])
        if spec.payload_model is None:
            return data
        try:
            model = spec.payload_model.model_validate(data)
        except ValidationError as exc:
            raise PayloadError(name, format_validation_error(exc)) from None
        return model.model_dump(mode="json")

    def parse(self, spec: HandlerSpec, payload: dict[str, Any]) -> Any:
        """The object a handler receives: its payload model instance, or the dict when it has none."""
        if spec.payload_model is None:
            return payload
        return spec.payload_model.model_validate(payload)


#: The process-wide registry that ``@handler`` registers into.
default_registry = HandlerRegistry()


@overload
def handler(
    name: str,
    *,
    payload: type[M],
    description: str | None = None,
    max_attempts: int | None = None,
    timeout: float | None = None,
    run_by: RunPermission = "runners",
) -> Decorator[Ctx, M, R]: ...


@overload
def handler(
    name: str,
    *,
    payload: None = None,
    description: str | None = None,
    max_attempts: int | None = None,
    timeout: float | None = None,
    run_by: RunPermission = "runners",
) -> Callable[[F], F]: ...


def handler(
    name: str,
    *,
    payload: type[BaseModel] | None = None,
    description: str | None = None,
    max_attempts: int | None = None,
    timeout: float | None = None,
    run_by: RunPermission = "runners",
) -> Callable[[HandlerFn], HandlerFn]:
    """Register a handler in the default registry: ``@handler("site-build", payload=SiteBuild)``."""
    return default_registry.handler(  # type: ignore[call-overload,misc]  # the overloads above type callers
        name,
        payload=payload,
        description=description,
        max_attempts=max_attempts,
        timeout=timeout,
        run_by=run_by,
    )
