"""References to jobs and batches as people write them: ``12`` or ``#12``, ``d3``, ``b3``.

Chat commands, the CLI and the HTTP API all accept the same forms, parsed here once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

# ASCII digits only: "１２" (full-width) or "١٢" (Arabic-Indic) are not ids, though int() would take them.
_REF_RE = re.compile(r"^#?([db]?)(\d{1,12})$", re.IGNORECASE | re.ASCII)

#: The largest id anything accepts: job and batch ids are 32-bit columns on PostgreSQL, so a larger
#: number names no job (and must not reach the database as an out-of-range parameter).
MAX_ID = 2**31 - 1


class RefKind(StrEnum):
    """What a reference names."""

    JOB = "job"  # a stored job, queued or tracked: 12
    DIRECT = "direct"  # a direct job, in this process's memory only: d3
    BATCH = "batch"  # a batch: b3


_PREFIX = {"": RefKind.JOB, "d": RefKind.DIRECT, "b": RefKind.BATCH}


@dataclass(frozen=True, slots=True)
class JobRef:
    """A parsed reference: its kind and number."""

    kind: RefKind
    number: int

    @classmethod
    def parse(cls, raw: str) -> JobRef | None:
        """``12``, ``#12``, ``d3``, ``b3`` (case-insensitive, ``#`` optional); None for anything else."""
        m = _REF_RE.match(raw.strip())
        if m is None or int(m.group(2)) > MAX_ID:
            return None
        return cls(_PREFIX[m.group(1).lower()], int(m.group(2)))

    @property
    def job_id(self) -> int | str:
        """The id the service takes for a job: the number, or ``"d3"`` for a direct job."""
        return f"d{self.number}" if self.kind == RefKind.DIRECT else self.number

    def __str__(self) -> str:
        prefix = {RefKind.JOB: "", RefKind.DIRECT: "d", RefKind.BATCH: "b"}[self.kind]
        return f"#{prefix}{self.number}"


def parse_job_id(raw: str) -> int | str | None:
    """``12``, ``#12`` -> 12; ``d3`` -> "d3" (a direct job); anything else (a batch too) -> None."""
    ref = JobRef.parse(raw)
    return None if ref is None or ref.kind == RefKind.BATCH else ref.job_id


def parse_batch_id(raw: str) -> int | None:
    """``b3`` or ``#b3`` -> 3; anything else -> None."""
    ref = JobRef.parse(raw)
    return ref.number if ref is not None and ref.kind == RefKind.BATCH else None


__all__ = ["MAX_ID", "JobRef", "RefKind", "parse_batch_id", "parse_job_id"]
