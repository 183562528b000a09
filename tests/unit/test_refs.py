"""Job and batch references as users type them in chat, on the command line and in URLs."""

from __future__ import annotations

import pytest

from core.refs import JobRef, RefKind, parse_batch_id, parse_job_id


@pytest.mark.parametrize(
    ("raw", "kind", "number", "shown"),
    [
        ("12", RefKind.JOB, 12, "#12"),
        ("#12", RefKind.JOB, 12, "#12"),
        (" 7 ", RefKind.JOB, 7, "#7"),
        ("d3", RefKind.DIRECT, 3, "#d3"),
        ("#D3", RefKind.DIRECT, 3, "#d3"),
        ("b5", RefKind.BATCH, 5, "#b5"),
        ("#B5", RefKind.BATCH, 5, "#b5"),
    ],
)
def test_references_parse_to_kind_and_number(raw: str, kind: RefKind, number: int, shown: str) -> None:
    ref = JobRef.parse(raw)
    assert ref == JobRef(kind, number) and str(ref) == shown


@pytest.mark.parametrize("raw", ["", "abc", "-1", "1.5", "x3", "#", "b", "d", "12a", "1234567890123", "bd3"])
def test_anything_else_is_not_a_reference(raw: str) -> None:
    assert JobRef.parse(raw) is None
    assert parse_job_id(raw) is None and parse_batch_id(raw) is None


def test_job_and_batch_ids_for_the_service() -> None:
    assert parse_job_id("12") == 12 and parse_job_id("d3") == "d3"
    assert parse_job_id("b3") is None  # a batch is not a job
    assert parse_batch_id("b3") == 3 and parse_batch_id("3") is None
