"""The NOTIFY channels of one schema: what the result backend and the broker announce on."""

from __future__ import annotations


def results_channel(schema: str) -> str:
    """The channel on which stored results of ``schema`` are announced (payload: task id)."""
    return f"kojin_results_{schema}"


def messages_channel(schema: str) -> str:
    """The channel announcing new messages of ``schema`` (payload: the queue name)."""
    return f"kojin_msgs_{schema}"
