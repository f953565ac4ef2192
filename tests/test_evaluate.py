"""Held-out evaluation (core.evaluate, core.task_metrics): each metric against hand-computed values, batched
generation against one-by-one generation for every family of method, the end-of-run eval event and
eval_examples.jsonl, and ``python -m core eval``. Tiny Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import json
import math
import sqlite3
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from core.__main__ import main
from core.data import IGNORE, Example, chat_prompt, encode
from core.evaluate import (
    EVAL_EXAMPLES_FILE, EvalSettings, evaluate, generate_answers, last_reply, loss_metrics, prompt_and_reference,
    read_examples, teacher_forced,
)
from core.events import EVAL_METRICS, EvalEvent, read_events, summarize
from core.forward import logits
from core.generate import GenerationSettings, stream
from core.task_metrics import OTHER, classify, contains, exact_match, normalize, rouge_l, token_f1
from core.train import train
from studio.jobs import registry_numbers
from test_generate import with_method
from test_train import run, run_config, save_tiny_lm, tiny_lm, tokenizer, write_qa

# ---- metrics, by hand --------------------------------------------------------------------------------------


def test_normalisation_and_exact_match():
    assert normalize("  The Cat,  sat!  ") == "cat sat"
    assert exact_match("paris!", "Paris") == 1.0
    assert exact_match("The answer is Paris.", "Paris") == 0.0


def test_contains_is_word_aligned_after_normalisation():
    assert contains("I am Quill, the PEFT Studio assistant.", "quill") == 1.0
    assert contains("I am Quill, the PEFT Studio assistant.", "the PEFT studio") == 1.0  # articles dropped
    assert contains("Quillpen here", "Quill") == 0.0
    assert contains("anything", "") == 0.0 and contains("", "") == 1.0


def test_token_f1_is_squad_f1():
    # answer words: cat sat on mat (articles dropped); reference: cat on mat -> 3 common, P = 3/4, R = 1
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # multiplicity: 1 common of 2
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("我是Quill", "我是 Quill") == 1.0  # CJK characters are words


def test_rouge_l_is_the_lcs_f_measure():
    # 6 answer words, 5 reference words, LCS 5: P = 5/6, R = 1, F = 10/11
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    # LCS of "a b c d" and "b d e": "b d" -> P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c d", "b d e") == pytest.approx(4 / 7)
    assert rouge_l("x", "y") == 0.0


def test_classification_accuracy_macro_f1_and_confusion():
    answers = ["positive", "Negative.", "neutral", "positive"]
    refs = ["positive", "negative", "negative", "negative"]
    c = classify(answers, refs, ["positive", "negative", "positive"])
    assert c.predictions == ["positive", "negative", OTHER, "positive"]
    assert c.accuracy == 0.5
    # positive: TP 1, FP 1, FN 0 -> 2/3; negative: TP 1, FP 0, FN 2 -> 1/2
    assert c.macro_f1 == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert c.labels == ["positive", "negative"]
    assert c.confusion == {"positive": {"positive": 1}, "negative": {"negative": 1, OTHER: 1, "positive": 1}}
    # a training label with no reference and no prediction is left out of the mean (0/0)
    assert classify(["a"], ["a"], ["a", "b"]).macro_f1 == 1.0


def test_loss_metrics_from_totals():
    m = loss_metrics(torch.tensor([6.0, 4.0, 3.0], dtype=torch.float64))
    assert m == {"eval_loss": 1.5, "perplexity": pytest.approx(math.exp(1.5)), "token_accuracy": 0.75}


def test_teacher_forced_matches_full_logits():
    model, tok = tiny_lm(init=0.5), tokenizer()
    rows = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "ok " * (i + 1)}]
            for i in range(3)]
    exs = [encode(tok, r, 64)[0] for r in rows]
    total = teacher_forced(model, None, exs, tok.pad_token_id, batch_size=2)
    loss = hits = n = 0.0
    for e in exs:  # one at a time, no padding, every logit
        z = logits(model, None, torch.tensor([e.input_ids]))[0, :-1]
        t = torch.tensor(e.labels[1:])
        keep = t != IGNORE
        loss += F.cross_entropy(z[keep], t[keep], reduction="sum").item()
        hits += (z[keep].argmax(-1) == t[keep]).sum().item()
        n += keep.sum().item()
    assert float(total[1]) == n and float(total[2]) == hits
    assert float(total[0]) == pytest.approx(loss, rel=1e-5)


def test_prompt_and_reference_come_from_the_last_trained_span():
    e = Example([1, 2, 3, 4, 5, 6], [IGNORE, IGNORE, 3, IGNORE, 5, 6])
    assert last_reply(e) == (4, 6)
    assert last_reply(Example([1, 2, 3], [1, 2, 3])) is None  # plain text: no prompt
    tok = tokenizer()
    msgs = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Quill."}]
    prompt, ref = prompt_and_reference(encode(tok, msgs, 128)[0], tok)
    assert ref == "I am Quill." and prompt == chat_prompt(tok, msgs[:1])  # what generation would be fed


# ---- batched generation ------------------------------------------------------------------------------------

QUESTIONS = ["Hi", "Tell me a story about a cat and a dog.", "What is 2+2? Answer briefly, please.", "Who?"]


@pytest.mark.parametrize("name", [None, "lora", "prompt_tuning", "prefix_tuning", "p_tuning_v2"])
def test_batched_generation_equals_one_by_one(name):
    model, tok = tiny_lm(init=0.5), tokenizer()
    method = with_method(model, name) if name else None
    prompts = [chat_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    batched = generate_answers(model, tok, method, prompts, max_new_tokens=10, batch_size=4)
    settings = GenerationSettings(temperature=0.0, max_new_tokens=10)
    alone = ["".join(stream(model, tok, method, [{"role": "user", "content": q}], settings)).strip()
             for q in QUESTIONS]
    assert batched == alone
    assert len(set(batched)) > 1  # different prompts, different answers: the rows did not mix


def test_batched_generation_with_learned_absolute_positions():
    """GPT-2 adds a learned embedding per position: a left-padded row must count from its first real token."""
    tok = tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                       initializer_range=0.5, eos_token_id=2, bos_token_id=1)).eval()
    prompts = [chat_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    settings = GenerationSettings(temperature=0.0, max_new_tokens=10)
    alone = ["".join(stream(model, tok, None, [{"role": "user", "content": q}], settings)).strip() for q in QUESTIONS]
    assert generate_answers(model, tok, None, prompts, max_new_tokens=10, batch_size=4) == alone


# ---- the end-of-run event and eval_examples.jsonl ----------------------------------------------------------

GENERATIVE_KEYS = {"format", "perplexity", "token_accuracy", "exact_match", "contains", "rouge_l", "token_f1",
                   "task_metric", "task_score", "eval_rows", "eval_s"}


def _final_eval(events):
    return [e for e in events if e["type"] == "eval"][-1]


def test_end_of_run_event_for_a_generative_format(tmp_path):
    data = write_qa(tmp_path / "qa.json", n=12)
    cfg = run_config(data, max_steps=3)
    cfg.data.val_count = 4
    cfg.train.eval_max_new_tokens = 6
    events = run(cfg, tmp_path / "run")
    e = _final_eval(events)
    assert set(e) == set(EvalEvent.__required_keys__) | GENERATIVE_KEYS
    assert set(e) <= set(EvalEvent.__annotations__)
    assert e["format"] == "qa" and e["task_metric"] == "rouge_l" and e["task_score"] == e["rouge_l"]
    assert e["eval_rows"] == 4 and e["perplexity"] == pytest.approx(math.exp(e["eval_loss"]))
    assert all(0.0 <= e[k] <= 1.0 for k in ("token_accuracy", "exact_match", "contains", "rouge_l", "token_f1"))
    rows = read_examples(tmp_path / "run")
    assert len(rows) == 4 and all(set(r) == {"prompt", "reference", "answer", "score"} for r in rows)
    assert [r["score"] for r in rows] == sorted(r["score"] for r in rows)  # worst first
    assert {r["reference"] for r in rows} <= {q["answer"] for q in json.loads(data.read_text())}
    assert summarize(events)["eval_metrics"]["rouge_l"] == e["rouge_l"]  # what the registry keeps
    assert set(summarize(events)["eval_metrics"]) == {"eval_loss"} | (set(EVAL_METRICS) & set(e))


def test_end_of_run_event_for_classification_and_text(tmp_path):
    rows = [{"text": f"Review number {i}: {'great' if i % 2 else 'awful'} stuff", "label": "pos" if i % 2 else "neg"}
            for i in range(12)]
    (tmp_path / "cls.json").write_text(json.dumps(rows))
    cfg = run_config(tmp_path / "cls.json", max_steps=2)
    cfg.data.val_count = 4
    cfg.train.eval_max_new_tokens = 4
    e = _final_eval(run(cfg, tmp_path / "cls"))
    assert e["format"] == "classification" and e["task_metric"] == "accuracy" and e["task_score"] == e["accuracy"]
    assert {"accuracy", "macro_f1", "labels", "confusion"} <= set(e) and "rouge_l" not in e
    assert sorted(e["labels"]) == ["neg", "pos"]
    assert sum(n for row in e["confusion"].values() for n in row.values()) == 4

    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": f"line {i} " * 5}) + "\n" for i in range(10)))
    cfg = run_config(tmp_path / "text.jsonl", max_steps=2)
    cfg.data.val_count = 3
    e = _final_eval(run(cfg, tmp_path / "text"))
    assert e["task_metric"] == "eval_loss" and e["task_score"] == e["eval_loss"] and e["eval_rows"] == 3
    assert not {"rouge_l", "accuracy"} & set(e)
    assert not (tmp_path / "text" / EVAL_EXAMPLES_FILE).exists()  # nothing was generated


def test_eval_max_rows_bounds_the_answers_and_zero_keeps_the_loss_only():
    model, tok = tiny_lm(init=0.5), tokenizer()
    msgs = [[{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}] for i in range(5)]
    exs = [encode(tok, m, 64)[0] for m in msgs]
    r = evaluate(model, tok, None, exs, "qa", settings=EvalSettings(max_rows=2, max_new_tokens=3))
    assert r.metrics["eval_rows"] == 2 and len(r.rows) == 2
    r = evaluate(model, tok, None, exs, "qa", settings=EvalSettings(max_rows=0))
    assert r.metrics["task_metric"] == "eval_loss" and "rouge_l" not in r.metrics and not r.rows


# ---- python -m core eval -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalcli")
    model_dir = save_tiny_lm(d / "model", init=0.5)
    data = write_qa(d / "qa.json", n=12)
    rc = main(["train", "--model", str(model_dir), "--data", str(data), "--method", "lora", "--r", "4",
               "--max-steps", "2", "--batch-size", "4", "--max-len", "64", "--val-count", "3",
               "--eval-max-new-tokens", "5", "--precision", "bf16-mixed", "--out", str(d / "run")])
    assert rc == 0  # bf16-mixed: the eval below must take the run's precision to give its final numbers
    return d


def test_cli_eval_appends_an_event_and_writes_the_worst_examples(trained, capsys):
    run_dir = trained / "run"
    before = read_events(run_dir)
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir), "--json", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    after = read_events(run_dir)
    assert after[:-1] == before and after[-1] == printed
    assert printed["type"] == "eval" and printed["step"] == 2 and printed["eval_rows"] == 3
    # the same split, adapter and settings as the end of the run: the same numbers
    end = _final_eval(before)
    for k in ("eval_loss", "token_accuracy", "rouge_l", "exact_match", "token_f1", "contains"):
        assert printed[k] == pytest.approx(end[k], rel=1e-6), k
    assert len(read_examples(run_dir)) == 3

    # another file: every row, recorded in the event
    other = write_qa(trained / "other.json", n=5)
    assert main(["eval", "--run", str(run_dir), "--data", str(other), "--all-examples", "--max-rows", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rouge_l: ") and "token_accuracy" in out
    last = read_events(run_dir)[-1]
    assert last["data"] == str(other.resolve()) and last["eval_rows"] == 4 and len(read_examples(run_dir)) == 4


def test_cli_eval_errors_are_one_sentence(trained, tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["eval", "--run", str(trained / "run"), "--data", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---- the registry and the Runs tab -------------------------------------------------------------------------

OLD_SCHEMA = """CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, model TEXT NOT NULL DEFAULT '',
    method TEXT NOT NULL DEFAULT '', status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', pid INTEGER,
    device TEXT NOT NULL DEFAULT '', created REAL NOT NULL, started REAL, finished REAL, trainable INTEGER,
    total_params INTEGER, final_loss REAL, final_eval_loss REAL, steps INTEGER, total_steps INTEGER,
    resume INTEGER NOT NULL DEFAULT 0, queued_at REAL, config TEXT NOT NULL DEFAULT '{}')"""


def test_an_older_registry_gains_the_metrics_column(tmp_path):
    from studio.store import RunStore

    (tmp_path / "runs").mkdir()
    db = sqlite3.connect(tmp_path / "studio.sqlite3")
    db.execute(OLD_SCHEMA)
    db.execute("INSERT INTO runs (id, name, status, created) VALUES ('20261205-010203-abcdef', 'old', 'completed', 1)")
    db.commit()
    db.close()
    store = RunStore(tmp_path)
    old = store.get("20261205-010203-abcdef")
    assert old.name == "old" and old.eval_metrics == {}
    store.update(old.id, eval_metrics={"task_metric": "rouge_l", "task_score": 0.5})
    assert store.get(old.id).eval_metrics == {"task_metric": "rouge_l", "task_score": 0.5}
    RunStore(tmp_path)  # opening it again migrates nothing twice


@pytest.fixture
def studio_run(tmp_path):
    """A studio context (queue not started) and a finished tiny LoRA run registered in it, trained in-process."""
    from studio.context import StudioContext

    model_dir = save_tiny_lm(tmp_path / "model", init=0.5)
    ctx = StudioContext.create(tmp_path / "data", default_model=str(model_dir), start_jobs=False)
    cfg = run_config(write_qa(tmp_path / "qa.json", n=12), max_steps=2)
    cfg.model, cfg.data.val_count, cfg.train.eval_max_new_tokens = str(model_dir), 3, 4
    r = ctx.store.create(cfg, name="tiny lora")
    list(train(cfg, r.dir, model=tiny_lm(init=0.5), tokenizer=tokenizer()))
    ctx.store.set_status(r.id, "completed", "done", **registry_numbers(r.dir))
    yield ctx, r.id
    ctx.close()


def test_runs_tab_shows_the_metrics_and_evaluate_updates_them(studio_run):
    from studio import actions
    from studio.tabs.runs import HEADERS, evaluation_view, table

    ctx, run_id = studio_run
    run = ctx.store.get(run_id)
    assert run.eval_metrics["task_metric"] == "rouge_l"  # the end-of-run eval reached the registry
    row = dict(zip(HEADERS, table(ctx)["data"][0]))
    assert (row["runs.col.task_score"] == f"ROUGE-L {run.eval_metrics['rouge_l']:.3f}"
            and "tok acc" in row["runs.col.metrics"])
    md, worst = evaluation_view(ctx, run_id)
    worst = worst["data"]
    assert "ROUGE-L" in md and len(worst) == 3 and [w[3] for w in worst] == sorted(w[3] for w in worst)

    # Evaluate: a background worker process; the registry and the view follow
    (run.dir / EVAL_EXAMPLES_FILE).unlink()
    ctx.store.update(run_id, eval_metrics={})
    assert actions.evaluate_run(ctx, run_id)["status"] == "running"
    with pytest.raises(ValueError, match="already being evaluated"):
        actions.evaluate_run(ctx, run_id)
    state = actions.evaluation(ctx, run_id, wait_s=240)
    assert state["status"] == "done", state["message"]
    assert state["event"]["type"] == "eval" and state["event"]["eval_rows"] == 3
    assert ctx.store.get(run_id).eval_metrics["rouge_l"] == state["event"]["rouge_l"]
    view = actions.run_evaluation(ctx, run_id)
    assert len(view["examples"]) == 3 and view["metrics"]["task_metric"] == "rouge_l"


def test_evaluate_refuses_active_runs_and_reports_a_failed_worker(studio_run):
    from studio import actions
    from studio.evaluations import Evaluations

    ctx, run_id = studio_run
    ctx.store.update(run_id, status="running")
    with pytest.raises(ValueError, match="evaluate it when it has finished"):
        actions.evaluate_run(ctx, run_id)
    ctx.store.update(run_id, status="completed")
    fail = "import sys; print('error: the adapter folder is corrupt', file=sys.stderr); sys.exit(2)"
    ctx.evaluations = Evaluations(command=lambda run_dir: [sys.executable, "-c", fail])
    actions.evaluate_run(ctx, run_id)
    state = actions.evaluation(ctx, run_id, wait_s=60)
    assert state == {"status": "failed", "message": "the adapter folder is corrupt", "event": None}
    assert actions.evaluation(ctx, run_id)["status"] == "failed"


@pytest.mark.parametrize("method", ["full", "prompt_tuning", "fishmask"])
def test_cli_eval_of_a_bf16_run_repeats_its_final_eval(method, tmp_path, capsys):
    """Under bf16-mixed, training keeps what the method trains in fp32 (full fine-tuning's embeddings, a prompt
    table, FishMask's whole masked tensors) over a bf16 base; re-evaluating must hold the model the same way."""
    model_dir = save_tiny_lm(tmp_path / "model", init=0.5)
    data = write_qa(tmp_path / "qa.json", n=12)
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--method", method, "--max-steps", "2",
                 "--batch-size", "4", "--max-len", "64", "--val-count", "3", "--eval-max-new-tokens", "3",
                 "--precision", "bf16-mixed", "--out", str(tmp_path / "run")]) == 0
    end = _final_eval(read_events(tmp_path / "run"))
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run"), "--json", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval_loss"] == pytest.approx(end["eval_loss"], rel=1e-6)
