"""Helpers several tabs share: run choices for dropdowns and the default run to show."""

from __future__ import annotations

from ..format import run_label
from ..store import Run


def run_choices(ctx, runs: list[Run] | None = None) -> list[tuple[str, str]]:
    return [(run_label(r), r.id) for r in (runs if runs is not None else ctx.store.list())]


def finished_with_adapter(ctx) -> list[Run]:
    return [r for r in ctx.store.list() if not r.active and r.has_adapter]


def default_run(ctx) -> str | None:
    """The run a fresh page shows: the running one, else the first queued, else the newest."""
    runs = ctx.store.list()
    for status in ("running", "queued"):
        for r in runs:
            if r.status == status:
                return r.id
    return runs[0].id if runs else None


def safe_get(ctx, run_id) -> Run | None:
    """The run with this id, or None for an empty, unknown or malformed id (typed by hand, say)."""
    if not run_id or not isinstance(run_id, str):
        return None
    try:
        return ctx.store.get(run_id)
    except ValueError:
        return None
