"""`tspo_core.omp.choose_wait_policy`: the OpenMP wait policy a server or benchmark applies before torch loads."""

from __future__ import annotations

import os

import pytest

from tspo_core.omp import VAR, choose_wait_policy


@pytest.mark.parametrize("given, default, applied, left", [
    (None, "PASSIVE", "PASSIVE", "PASSIVE"),  # unset: the caller's default, exported for child processes
    (None, "default", "default", None),  # OpenMP's own policy: nothing in the environment
    ("ACTIVE", "PASSIVE", "ACTIVE", "ACTIVE"),  # the user's value wins
    ("passive", "default", "passive", "passive"),
    ("Default", "PASSIVE", "default", None),  # `default` (any case) is removed: OpenMP would reject it
])
def test_the_policy_applied_and_what_is_left_in_the_environment(monkeypatch, given, default, applied, left):
    if given is None:
        monkeypatch.delenv(VAR, raising=False)
    else:
        monkeypatch.setenv(VAR, given)
    assert choose_wait_policy(default) == applied
    assert os.environ.get(VAR) == left
