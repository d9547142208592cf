"""Rollout-controller details the mutation run found untested; the behaviour is tested in
tests/trainer/test_controller.py and test_staleness.py."""

from __future__ import annotations
