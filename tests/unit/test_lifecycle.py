"""The lifecycle table: every legal transition, and every illegal one with its error text."""

from __future__ import annotations

import itertools

import pytest

from core.errors import IllegalTransition
from core.lifecycle import ACTION_FROM, TRANSITIONS, check_action, is_legal
from core.models import JobStatus as S

LEGAL = {
    (S.PENDING, S.RUNNING),
    (S.PENDING, S.PAUSED),
    (S.PENDING, S.CANCELLED),
    (S.RUNNING, S.COMPLETED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.PAUSED),
    (S.RUNNING, S.PENDING),
    (S.PAUSED, S.PENDING),
    (S.PAUSED, S.CANCELLED),
    (S.FAILED, S.PENDING),
    (S.CANCELLED, S.PENDING),
}


@pytest.mark.parametrize("pair", list(itertools.product(list(S), list(S))))
def test_transition_table(pair: tuple[S, S]) -> None:
    assert is_legal(*pair) == (pair in LEGAL)


def test_table_matches_spec() -> None:
    assert set(TRANSITIONS) == LEGAL


EXPECTED_ACTIONS = {
    "pause": {S.PENDING, S.RUNNING},
    "resume": {S.PAUSED},
    "cancel": {S.PENDING, S.RUNNING, S.PAUSED},
    "retry": {S.FAILED, S.CANCELLED},
}
WORD = {"pause": "paused", "resume": "resumed", "cancel": "cancelled", "retry": "retried"}


@pytest.mark.parametrize(("action", "status"), list(itertools.product(EXPECTED_ACTIONS, list(S))))
def test_actions(action: str, status: S) -> None:
    assert set(ACTION_FROM[action]) == EXPECTED_ACTIONS[action]
    if status in EXPECTED_ACTIONS[action]:
        check_action(12, status, action)
    else:
        with pytest.raises(IllegalTransition) as exc:
            check_action(12, status, action)
        assert str(exc.value) == f"Job #12 is {status}; it can't be {WORD[action]}"
