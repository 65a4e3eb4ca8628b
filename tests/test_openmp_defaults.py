"""The CLI's OpenMP spin default: set when the user set nothing, never over the user's choice."""

from __future__ import annotations

import os

import pytest

from llmaas.openmp_defaults import SPIN_COUNT, apply_openmp_defaults


def test_sets_the_spin_count_when_nothing_is_set(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    apply_openmp_defaults()

    assert os.environ["GOMP_SPINCOUNT"] == SPIN_COUNT


@pytest.mark.parametrize("name, value", [("GOMP_SPINCOUNT", "300000"), ("OMP_WAIT_POLICY", "PASSIVE")])
def test_the_users_setting_wins(monkeypatch, name, value):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv(name, value)
    apply_openmp_defaults()

    assert os.environ[name] == value
    assert name == "GOMP_SPINCOUNT" or "GOMP_SPINCOUNT" not in os.environ
