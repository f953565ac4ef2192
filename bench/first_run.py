"""A new user's first run on this machine (`python -m bench.first_run`), through the studio's own actions.

The bundled identity sample on the default model, the Train form as a fresh page fills it on this hardware
(studio.first_run: on a CPU, LoRA r16 on every linear layer, lr 2e-3, batches of 4 and a step budget), Start,
then the Chat tab's question "What is your name?" to the finished adapter. Reports the wall time from Start to
the answer, the steps, the estimated training time against the measured one, and whether the answer names
Quill (the sample's assistant). One JSON line, "RESULT {...}".
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from core.events import read_events
from core.models import resolve_device, resolve_precision
from studio import actions, first_run
from studio.estimate import EFFICIENCY
from studio.context import StudioContext

SAMPLE = "identity_sample.json"
QUESTION = "What is your name?"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.first_run")
    ap.add_argument("--precision", default="auto", help="the Advanced box's precision (auto, fp32, bf16-mixed)")
    args = ap.parse_args()
    ctx = StudioContext.create(tempfile.mkdtemp(prefix="bench-first-run-"))
    try:
        dataset = actions.use_sample(ctx, SAMPLE)
        form = {**actions.form_defaults(), "data.path": dataset["path"], "name": "first run",
                "train.precision": args.precision}
        tip = first_run.suggest(ctx, form, dataset, actions.detect_hardware())
        if tip is not None:  # on a GPU the page keeps core's defaults
            form.update(tip["values"])
        estimate = actions.check(ctx, form, dataset)
        precision = resolve_precision(args.precision, resolve_device("auto"))
        started = time.perf_counter()
        run = actions.start_run(ctx, form, dataset)
        while (state := actions.run_status(ctx, run["id"]))["status"] in ("queued", "running"):
            time.sleep(0.5)
        trained = time.perf_counter()
        if state["status"] != "completed":
            raise RuntimeError(f"the first run ended {state['status']}: {state.get('reason')}")
        answer = actions.chat(ctx, QUESTION, [run["id"]], False, max_new_tokens=32)[run["id"]]["text"]
        answered = time.perf_counter()
        steps = [e for e in read_events(ctx.store.get(run["id"]).dir) if e.get("type") == "step"]
        train_s = steps[-1]["elapsed_s"] if steps else None  # the training loop's own clock
        result = {
            "hardware": actions.detect_hardware(), "form": tip["values"] if tip else None,
            "steps": len(steps), "estimated_train_s": estimate["train_seconds"], "measured_train_s": train_s,
            "start_to_trained_s": trained - started, "start_to_answer_s": answered - started,
            "answer": answer, "says_quill": "Quill" in answer, "precision": precision,
            # the share of the plain matmul rate the run reached: studio.estimate.EFFICIENCY's evidence
            "efficiency": estimate["train_seconds"] * EFFICIENCY[precision] / train_s if train_s else None,
        }
    finally:
        for r in ctx.store.list(status=("running", "queued")):
            ctx.jobs.stop(r.id)
        ctx.close()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
