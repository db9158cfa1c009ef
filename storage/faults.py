"""Fault points: a testing hook to prove that a run dying anywhere is harmless.

``SEQCARRY_FAULT=<stage>`` (or ``<stage>:kill``) sends SIGKILL to the process that
reaches ``stage``; ``<stage>:raise`` raises :class:`InjectedFault` there.
"""
from __future__ import annotations

import os
import signal

FAULT_ENV = "SEQCARRY_FAULT"
FAULT_STAGES = ("mid_compute", "after_state_file", "after_manifest", "before_commit",
                "after_commit")


class InjectedFault(RuntimeError):
    """Raised at a fault point when ``SEQCARRY_FAULT=<stage>:raise``."""


def fault_point(stage: str) -> None:
    """Die here if ``SEQCARRY_FAULT`` names this stage: ``<stage>`` or ``<stage>:kill``
    sends SIGKILL to this process, ``<stage>:raise`` raises :class:`InjectedFault`."""
    name, _, action = os.environ.get(FAULT_ENV, "").partition(":")
    if name != stage:
        return
    if action == "raise":
        raise InjectedFault(f"injected fault at {stage}")
    os.kill(os.getpid(), signal.SIGKILL)

