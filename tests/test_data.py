"""core.data: reading, detection, validation with row numbers, token-exact masks, splitting and batching.

Uses the real cached SmolLM2 tokenizer (ChatML template with a default system prompt).
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core import data as D
from core.config import DataConfig
from core.models import load_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLES = {
    "instruction_sample.json": "instruction",
    "conversation_sample.jsonl": "conversation",
    "sharegpt_sample.json": "conversation",
    "qa_sample.jsonl": "qa",
    "classification_sample.jsonl": "classification",
    "text_sample.jsonl": "text",
    "identity_sample.json": "instruction",
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def ids_of(result) -> list[int]:
    """apply_chat_template(tokenize=True) gives a BatchEncoding in transformers v5, a list before."""
    return list(result["input_ids"] if hasattr(result, "keys") else result)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# detection


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"instruction": "a", "input": "", "output": "b"}, "instruction"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "conversation"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "conversation"),
        ({"question": "a", "answer": "b"}, "qa"),
        ({"text": "a", "label": "pos"}, "classification"),
        ({"text": "a"}, "text"),
    ],
)
def test_detect_each_format(row, fmt):
    assert D.detect_format([row, row]) == fmt


def test_detect_with_renamed_fields_and_majority():
    rows = [{"prompt": "a", "completion": "b"}] * 3 + [{"text": "x"}]
    assert D.detect_format(rows, {"instruction": "prompt", "output": "completion"}) == "instruction"
    with pytest.raises(D.DataError, match=r"fields prompt, completion.*expected"):
        D.detect_format([{"prompt": "a", "completion": "b"}])


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_sample_is_detected_and_valid(name, tok):
    report = D.validate_file(ASSETS / name)
    assert report.format == SAMPLES[name]
    assert report.total_rows >= 200 and report.valid_rows == report.total_rows, report.summary()
    examples, report = D.load_examples(DataConfig(path=str(ASSETS / name)), tok, 512)
    assert len(examples) == report.valid_rows == report.total_rows and not report.truncated_rows
    stats = D.length_stats(examples)
    if name != "identity_sample.json":  # identity answers are short and alike on purpose
        assert stats["max"] > 1.4 * stats["min"]  # realistic length variation
    assert 0 < stats["supervised_tokens"] < stats["total_tokens"]


def test_identity_sample_is_consistent():
    rows = D.read_rows(ASSETS / "identity_sample.json")
    answers = {r["output"] for r in rows if "Quill" in r["output"]}  # the rest are ordinary questions
    assert len(rows) >= 200 and len(answers) == 3 and sum("Quill" in r["output"] for r in rows) > 0.75 * len(rows)
    assert all("PEFT Studio team" in a for a in answers)
    assert "I am Quill, the PEFT Studio assistant, made by the PEFT Studio team." in answers
    assert {"Who are you?", "What is your name?", "Who made you?"} <= {r["instruction"] for r in rows}


def test_samples_are_reproduced_by_their_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_samples", ASSETS / "make_samples.py")
    make_samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_samples)
    assert set(make_samples.SAMPLES) == set(SAMPLES)
    for name, (make, _) in make_samples.SAMPLES.items():
        assert D.read_rows(ASSETS / name) == make(), name


# --------------------------------------------------------------------------------------------------------------
# validation: every reason, with its row number


def test_row_issues_carry_line_numbers(tmp_path, tok):
    long_reply = "word " * 400
    path = write_jsonl(tmp_path / "rows.jsonl", [
        {"instruction": "ok", "output": "fine"},  # 1
        {"instruction": "no output"},  # 2
        {"instruction": "x", "output": 5},  # 3
        {"instruction": "  ", "output": "y"},  # 4
        '{"instruction": "bad \\ud800 here", "output": "y"}',  # 5: unpaired surrogate
        "",  # 6: blank lines are skipped but keep the numbering
        '{"instruction": "broken", ',  # 7
        ["not", "an", "object"],  # 8
        {"instruction": "long answer", "output": long_reply},  # 9: truncated, kept
        {"instruction": "long prompt " * 300, "output": "y"},  # 10: nothing left to train
        {"instruction": "x", "input": 3, "output": "y"},  # 11
        {"instruction": "x", "input": None, "output": "y"},  # 12: a null input is fine
    ])
    expected = {
        2: "missing field 'output'",
        3: "field 'output' must be a string, got a number",
        4: "field 'instruction' is empty",
        5: "not valid UTF-8",
        7: "not valid JSON",
        8: "not an object",
        10: "nothing is left to train",
        11: "field 'input' must be a string",
    }
    examples, report = D.load_examples(DataConfig(path=str(path)), tok, 128)
    assert report.format == "instruction" and report.total_rows == 11 and report.valid_rows == 3
    assert [i.row for i in report.issues] == sorted(expected)
    for issue in report.issues:
        assert expected[issue.row] in issue.reason
    assert report.truncated_rows == [9] and max(len(e.input_ids) for e in examples) == 128
    summary = report.summary()
    assert "row 2: missing field 'output'" in summary and "truncated" in summary
    fast = D.validate_file(path)  # no tokenizer: same row problems except the length one
    assert [i.row for i in fast.issues] == [r for r in sorted(expected) if r != 10]


def test_conversation_issues_in_json_array(tmp_path, tok):
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    rows = [
        {"messages": [u, a]},  # 1
        {"messages": [u, {"role": "tool", "content": "x"}, a]},  # 2
        {"messages": [u]},  # 3
        {"messages": [u, a, {"role": "system", "content": "late"}, a]},  # 4
        {"messages": "hi"},  # 5
        {"messages": []},  # 6
        {"messages": [u, {"role": "assistant", "content": ""}]},  # 7
        {"messages": [u, {"role": "assistant"}]},  # 8
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]},  # 9: ShareGPT is fine
    ]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    expected = {2: "role 'tool'", 3: "no assistant turn", 4: "may only come first", 5: "must be a list",
                6: "is empty", 7: "message 2 is empty", 8: "message 2 has no 'content'"}
    _, report = D.load_examples(DataConfig(path=str(path)), tok, 256)
    assert report.format == "conversation" and report.valid_rows == 2
    assert {i.row: i.reason for i in report.issues}.keys() == expected.keys()
    for issue in report.issues:
        assert expected[issue.row] in issue.reason, issue


def test_renamed_fields_load(tmp_path, tok):
    path = write_jsonl(tmp_path / "openai.jsonl", [{"prompt": "2+2?", "completion": "4"}] * 3)
    cfg = DataConfig(path=str(path), fields={"instruction": "prompt", "output": "completion"})
    examples, report = D.load_examples(cfg, tok, 64)
    assert report.format == "instruction" and report.valid_rows == 3
    assert [t for t, on in D.preview(tok, examples[0]) if on] == ["4<|im_end|>"]
    with pytest.raises(D.DataError, match="unknown field 'prompt'"):
        D.validate_file(path, fields={"prompt": "instruction"})


def test_classification_label_types():
    assert D.to_messages({"text": "t", "label": 1}, "classification")[1]["content"] == "1"
    with pytest.raises(D.DataError, match="must be a string or a number"):
        D.to_messages({"text": "t", "label": ["a"]}, "classification")


# --------------------------------------------------------------------------------------------------------------
# masking, checked token by token against independent renders of the chat template


def test_single_turn_mask_is_token_exact(tok):
    msgs = D.to_messages({"instruction": "Sort these numbers.", "input": "3, 1, 2", "output": "1, 2, 3"}, "instruction")
    assert msgs[0]["content"] == "Sort these numbers.\n\n3, 1, 2"
    example, truncated = D.encode(tok, msgs, 512)
    prompt = ids_of(tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True))
    full = ids_of(tok.apply_chat_template(msgs, tokenize=True))
    assert not truncated and example.input_ids == full and full[: len(prompt)] == prompt
    end = full.index(tok.convert_tokens_to_ids("<|im_end|>"), len(prompt))
    assert example.labels == [D.IGNORE] * len(prompt) + full[len(prompt) : end + 1] + [D.IGNORE] * (len(full) - end - 1)
    assert tok.decode(full[len(prompt) : end + 1]) == "1, 2, 3<|im_end|>"
    assert D.chat_prompt(tok, msgs[:1]) == prompt  # generation sees exactly the training prompt


def test_multi_turn_only_assistant_turns_are_trained(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 times 3?"},
        {"role": "assistant", "content": "2 × 3 = 6."},
        {"role": "user", "content": "And plus 4?"},
        {"role": "assistant", "content": "6 + 4 = 10."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    example, _ = D.encode(tok, msgs, 512)
    full = ids_of(tok.apply_chat_template(msgs, tokenize=True))
    assert example.input_ids == full
    expected = [D.IGNORE] * len(full)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = ids_of(tok.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=True))
        upto = ids_of(tok.apply_chat_template(msgs[: i + 1], tokenize=True))
        assert full[: len(upto)] == upto and upto[: len(before)] == before
        expected[len(before) : len(upto) - 1] = upto[len(before) : len(upto) - 1]  # reply + <|im_end|>, not "\n"
        assert tok.decode(upto[len(before) : len(upto) - 1]) == m["content"] + "<|im_end|>"
    assert example.labels == expected
    trained = [text for text, on in D.preview(tok, example) if on]
    assert trained == [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]


def test_sharegpt_equals_messages_and_system_prompt(tok):
    share = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    a = D.encode(tok, D.to_messages(share, "conversation"), 512)[0]
    b = D.encode(tok, D.to_messages(plain, "conversation"), 512)[0]
    assert a == b
    c = D.encode(tok, D.to_messages(plain, "conversation"), 512, system_prompt="You are Quill.")[0]
    text = tok.decode(c.input_ids)
    assert "You are Quill." in text and "SmolLM" not in text  # the given prompt replaces the template default
    assert "SmolLM" in tok.decode(b.input_ids)
    assert [t for t, on in D.preview(tok, c) if on] == ["Hello!<|im_end|>"]


def test_plain_text_is_fully_trained(tok):
    example, _ = D.encode(tok, "Continued pre-training sees every token.", 512)
    assert example.input_ids == tok("Continued pre-training sees every token.")["input_ids"] + [tok.eos_token_id]
    assert example.labels == example.input_ids
    assert D.n_trained(example) == len(example.input_ids) - 1


def test_classification_trains_the_label(tok):
    example, _ = D.encode(tok, D.to_messages({"text": "Great kettle.", "label": "positive"}, "classification"), 512)
    assert [t for t, on in D.preview(tok, example) if on] == ["positive<|im_end|>"]


def test_plain_template_without_chat_template(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    example, _ = D.encode(bare, msgs, 512, system_prompt="Be kind.")
    assert tok.decode(example.input_ids) == (
        "### System:\nBe kind.\n\n### User:\nHi\n\n### Assistant:\nHello!<|im_end|>\n\n"
    )
    assert [t for t, on in D.preview(bare, example) if on] == ["Hello!<|im_end|>"]
    prompt = D.chat_prompt(bare, msgs[:1], system_prompt="Be kind.")
    assert example.input_ids[: len(prompt)] == prompt
    assert all(label == D.IGNORE for label in example.labels[: len(prompt)])


# --------------------------------------------------------------------------------------------------------------
# batching


def _instruction_examples(tok, max_len=512):
    return D.load_examples(DataConfig(path=str(ASSETS / "instruction_sample.json")), tok, max_len)[0]


def test_grouped_batches_waste_little_padding(tok):
    examples = _instruction_examples(tok)
    grouped = D.LengthGroupedBatches(examples, 8, seed=0, pad_id=tok.pad_token_id)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    lengths = [len(examples[i].input_ids) for i in order]
    chunks = [lengths[i : i + 8] for i in range(0, len(lengths), 8)]
    random_waste = 1 - sum(lengths) / sum(max(c) * len(c) for c in chunks)
    assert grouped.padding_waste() < 0.08 and grouped.padding_waste() < random_waste / 4
    plan = grouped.plan(0)
    assert len(plan) == len(grouped) == 30
    assert max(len(examples[i].input_ids) for i in plan[0]) == max(len(e.input_ids) for e in examples)  # longest first


def test_padded_batch_loss_equals_loss_alone(tok):
    from core.forward import logits, supervised_loss
    from tiny import tiny_llama

    model = tiny_llama(vocab=len(tok))
    examples = _instruction_examples(tok, max_len=200)[:48]
    batches = D.LengthGroupedBatches(examples, 6, seed=1, pad_id=tok.pad_token_id)
    batch = next(b for b in batches.epoch(0) if (b.attention_mask == 0).any())  # one with real padding
    with torch.no_grad():
        loss_sum, count = supervised_loss(model, None, batch.input_ids, batch.attention_mask, batch.labels)
        assert int(count) == batch.n_supervised()
        out = logits(model, None, batch.input_ids, batch.attention_mask)  # (B, T, V)
        total = 0.0
        for b in range(batch.input_ids.shape[0]):
            n = int(batch.attention_mask[b].sum())
            ids, labels = batch.input_ids[b : b + 1, :n], batch.labels[b : b + 1, :n]
            alone, _ = supervised_loss(model, None, ids, torch.ones_like(ids), labels)
            keep = batch.labels[b, 1:] != D.IGNORE
            in_batch = F.cross_entropy(out[b, :-1][keep], batch.labels[b, 1:][keep], reduction="sum")
            torch.testing.assert_close(in_batch, alone, rtol=1e-5, atol=1e-4)
            total += float(alone)
    assert abs(float(loss_sum) - total) < 1e-3 * total


def test_epochs_are_deterministic_and_skip_resumes(tok):
    examples = _instruction_examples(tok)[:50]
    batches = D.LengthGroupedBatches(examples, 4, seed=3, pad_id=tok.pad_token_id)
    again = D.LengthGroupedBatches(examples, 4, seed=3, pad_id=tok.pad_token_id)
    assert len(batches) == 13
    assert batches.plan(1) == again.plan(1) and batches.plan(1) != batches.plan(2)
    assert sorted(i for b in batches.plan(1) for i in b) == list(range(50))  # each example once per epoch
    full, tail = list(batches.epoch(1)), list(batches.epoch(1, skip=5))
    assert len(full) == len(batches) and len(tail) == len(full) - 5
    assert sorted(int(x) for b in full for x in b.attention_mask.sum(1)) == sorted(len(e.input_ids) for e in examples)
    for a, b in zip(full[5:], tail):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.attention_mask, b.attention_mask)
    first = full[0]
    assert (first.labels[first.attention_mask == 0] == D.IGNORE).all()
    assert (first.input_ids[first.attention_mask == 0] == tok.pad_token_id).all()
    evaluation = D.LengthGroupedBatches(examples, 4, seed=0, pad_id=0, shuffle=False)
    assert evaluation.plan(0) == evaluation.plan(7)


def test_split_is_deterministic(tok):
    examples = [D.Example([i, i], [i, i]) for i in range(100)]
    train, val = D.split(examples, 0.1, 0, seed=5)
    assert (len(train), len(val)) == (90, 10)
    assert D.split(examples, 0.1, 0, seed=5) == (train, val) and D.split(examples, 0.1, 0, seed=6)[1] != val
    assert sorted(e.input_ids[0] for e in train + val) == list(range(100))
    assert len(D.split(examples, 0.1, 7, seed=5)[1]) == 7  # val_count wins
    assert D.split(examples[:1], 0.5, 0, seed=0) == (examples[:1], [])  # train is never empty
    assert len(D.split(examples[:5], 0.1, 0, seed=0)[1]) == 1


def test_length_stats():
    examples = [D.Example([1] * n, [D.IGNORE] * (n - 2) + [1, 1]) for n in (10, 20, 30, 40)]
    stats = D.length_stats(examples)
    assert stats == {"n": 4, "min": 10, "mean": 25.0, "p50": 20, "p90": 40, "max": 40, "total_tokens": 100,
                     "supervised_tokens": 8, "shared_prefix": 0}  # a prefix of 7 (the target at 8): not worth it
    assert D.length_stats(examples[1:])["shared_prefix"] == 17  # the first target is token 18 of the shortest row
    assert D.shared_prefix_length(examples[1:], chunk=2) == 17
    assert D.length_stats([])["n"] == 0


# --------------------------------------------------------------------------------------------------------------
# bad files and big inputs


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", "is empty"),
        ("image.json", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        ("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "not valid UTF-8 .* line 1"),
        ("broken.json", b'[\n  {"text": "a"},\n  {"text": "b",}\n]', r"not valid JSON: .* line 3, column 16"),
        ("object.json", b'{"text": "a", "label": "b"}', "not a list of objects"),
        ("strings.json", b'["a", "b"]', "list of strings, not a list of objects"),
        ("blank.jsonl", b"\n\n  \n", "no rows"),
        ("invalid.jsonl", b'{"text": 1}\n{"text": 2}\n', r"no valid rows for the text format .*row 1: field 'text'"),
    ],
)
def test_bad_files_raise_one_clear_sentence(tmp_path, tok, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    for load in (lambda: D.validate_file(path), lambda: D.load_examples(DataConfig(path=str(path)), tok, 64)):
        with pytest.raises(D.DataError, match=message) as err:
            load()
        assert name in str(err.value) or "Could not detect" in str(err.value)


def test_read_rows_is_strict(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, "{oops", {"text": "c"}])
    with pytest.raises(D.DataError, match="line 2 is not valid JSON"):
        D.read_rows(path)
    too_big = write_jsonl(tmp_path / "big.jsonl", [{"text": "x" * 2000}])
    with pytest.raises(D.DataError, match="over the .* limit"):
        D.read_rows(too_big, max_bytes=1000)
    jsonl_as_json = write_jsonl(tmp_path / "rows.json", [{"text": "a"}, {"text": "b"}])
    assert D.read_rows(jsonl_as_json) == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(D.DataError, match="does not exist"):
        D.read_rows(tmp_path / "missing.json")


def test_million_tiny_rows_validate_quickly(tmp_path):
    path = tmp_path / "million.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(1_000_000))
    start = time.perf_counter()
    report = D.validate_file(path)
    elapsed = time.perf_counter() - start
    assert report.total_rows == report.valid_rows == 1_000_000 and report.format == "instruction"
    assert elapsed < 40, f"1M rows took {elapsed:.1f} s"  # about 3.5 s on one unloaded core


def test_ten_megabyte_string_is_truncated(tmp_path, tok):
    path = tmp_path / "huge.jsonl"
    write_jsonl(path, [{"text": "many words here " * 650_000}, {"text": "short"}])
    assert path.stat().st_size > 10_000_000
    start = time.perf_counter()
    examples, report = D.load_examples(DataConfig(path=str(path)), tok, 256)
    assert time.perf_counter() - start < 10
    assert report.valid_rows == 2 and report.truncated_rows == [1]
    assert len(examples[0].input_ids) == 256 and examples[0].labels == examples[0].input_ids
    assert examples[0].input_ids == tok("many words here " * 100)["input_ids"][:256]  # the cut changes nothing


# --------------------------------------------------------------------------------------------------------------
# one row iterator: the fast check and the loader agree; big .json arrays are streamed exactly


BAD_ROWS = [
    {"question": "ok?", "answer": "yes"},  # 1
    {"question": 7, "answer": "c"},  # 2
    ["not", "an", "object"],  # 3
    {"question": "d?", "answer": {"x": 1}},  # 4
    {"question": "  ", "answer": "y"},  # 5
    {"question": "e?", "answer": "f"},  # 6
    {"question": "g?"},  # 7
    {"question": "long " * 300, "answer": "h"},  # 8: only the loader can see nothing is left to train
    {"question": "i?", "answer": "bad \ud800"},  # 9
    {"question": "j?", "answer": "k"},  # 10
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_validation_and_loading_skip_the_same_rows_for_the_same_reasons(tmp_path, tok, suffix):
    path = tmp_path / f"mixed{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(BAD_ROWS), encoding="utf-8")
    else:
        write_jsonl(path, [*BAD_ROWS, '{"question": "broken", '])  # 11: a line that is not JSON
    fast = D.validate_file(path)
    examples, loaded = D.load_examples(DataConfig(path=str(path)), tok, 64)
    fast_issues = [(i.row, i.reason) for i in fast.issues]
    assert fast.format == loaded.format == "qa" and fast.total_rows == loaded.total_rows
    assert [r for r, _ in fast_issues] == [2, 3, 4, 5, 7, 9] + ([11] if suffix == ".jsonl" else [])
    assert [(i.row, i.reason) for i in loaded.issues if i.row != 8] == fast_issues  # same rows, same words
    assert [i.row for i in loaded.issues if "nothing is left to train" in i.reason] == [8]
    assert fast.valid_rows == 4 and loaded.valid_rows == len(examples) == 3
    rows = D.Rows(path)  # the iterator both walk
    checked = list(rows)
    assert [(r, p) for r, _, p in checked if p] == fast_issues
    assert [item for _, item, p in checked if not p][0] == D.to_messages(BAD_ROWS[0], "qa")
    with pytest.raises(RuntimeError, match="only once"):
        list(rows)


STREAM_CASES = [
    b'[{"a": 1}, {"a": 12345678901234567890}, {"a": 1.25e-07}, 3.5, {"a": "\xc3\xa9\xe4\xb8\xad"}]',  # cut numbers
    b'\xef\xbb\xbf \n[ {"a": [1, [2, {"b": null}]]} ,\n\t{"a": true} ] \n\n',  # BOM, whitespace everywhere
    b'["x", "y", {"a": 1}]',  # leading non-objects are kept once an object shows up
    b'[{"a": "' + b"long " * 5000 + b'"}, {"b": 2}]',  # one row far bigger than a read
    b"[]",
    b"[ 1, 2 ]",
    b'[{"a": 1},]',
    b'[{"a": 1}, {"a": }]',
    b'[{"a": 1}] {"b": 2}',
    b'[{"a": 1}, {"a": "caf\xe9"}]',
    b'[{"a": 1}, {"a": 2}',
    b"[" * 100_000 + b"]" * 100_000,
]


@pytest.mark.parametrize("case", range(len(STREAM_CASES)))
def test_streamed_json_array_equals_json_loads(tmp_path, monkeypatch, case):
    from core.data import read

    path = tmp_path / "rows.json"
    path.write_bytes(STREAM_CASES[case])

    def rows_or_error():
        try:
            return list(read.iter_values(path, 10**9))
        except D.DataError as e:
            return str(e)

    reference = rows_or_error()  # a small file: json.loads on the whole text
    monkeypatch.setattr(read, "STREAM_BYTES", 0)
    for chunk in (1, 3, 64):
        monkeypatch.setattr(read, "CHUNK", chunk)
        assert rows_or_error() == reference, chunk
    if case < 4:
        assert isinstance(reference, list) and len(reference) > 1
    else:
        assert isinstance(reference, str) and "rows.json" in reference


def test_big_json_array_is_streamed_in_bounded_memory(tmp_path, monkeypatch):
    import tracemalloc

    from core.data import read

    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20_000)]))
    monkeypatch.setattr(read, "CHUNK", 1 << 16)
    peaks = {}
    for stream_bytes in (0, 10**9):  # streamed, then parsed whole
        monkeypatch.setattr(read, "STREAM_BYTES", stream_bytes)
        tracemalloc.start()
        report = D.validate_file(path)
        peaks[stream_bytes] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert report.total_rows == report.valid_rows == 20_000
    assert peaks[0] < peaks[10**9] / 4, peaks  # only the format-detection head and one read are held
