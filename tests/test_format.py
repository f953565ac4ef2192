"""Chat column labels: a run's method and knobs, LLRD included for every method (no method is special-cased)."""

import pytest

from studio.format import knobs_text
from studio.store import Run


def run(method: str, knobs: dict, decay: float) -> Run:
    return Run(id="r1", name="n", model="m", method=method, status="completed", reason="", pid=None, device="cpu",
               created=0.0, started=None, finished=None, trainable=None, total_params=None, final_loss=None,
               final_eval_loss=None, steps=None, total_steps=None, resume=0, queued_at=None,
               config={"method_config": knobs, "train": {"llrd_decay": decay}})


@pytest.mark.parametrize("method, knobs", [("full", {}), ("lora", {"r": 8})])
def test_llrd_shows_for_any_method(method, knobs):
    assert knobs_text(run(method, knobs, 0.9)).endswith("llrd_decay=0.9")
    assert "llrd" not in knobs_text(run(method, knobs, 1.0))


def test_lists_join_and_floats_are_short():
    assert knobs_text(run("lora", {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}, 1.0)) == (
        "lora r=8 alpha=16 targets=q_proj,v_proj")
