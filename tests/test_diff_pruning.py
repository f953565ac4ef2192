import math

import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint import ADAPTER_WEIGHTS, load_adapter
from core.config import method_config
from core.forward import logits, supervised_loss
from core.methods import build_method, specs
from core.methods.base import RunPlan
from core.methods.diff_pruning import LOG_RATIO, DiffPruningConfig, DiffPruningMethod, keep_count
from core.schedules import param_groups
from tiny import (
    VOCAB, assert_bake_round_trip, assert_toggle_restores, batch, greedy, overfit, overfit_data, saved_logits,
    sharpened, tiny_gpt2, tiny_llama, tiny_qwen2,
)

# The generic checks of tests/test_contract.py: a plain AdamW loop (tiny.overfit) on tiny models. No projection
# happens there (no after_step), so the diff trains densely like full fine-tuning of the targeted linears; a loop
# that calls after_step projects at the end, hence sparsity 0.5, which keeps the memorised tokens.
CONTRACT = {
    "config": {"sparsity": 0.5, "alpha_init": 5.0},
    "lr": 1e-2,
    "steps": 60,
    "accuracy": 0.9,
    "measured": "token accuracy 0.989 after 60 steps on sharpened llama, qwen2 and gpt2 (loss 6.9 -> 0.43); still "
                "0.966 (llama) / 0.989 (gpt2) when the diff is then projected to 50% (at 5%: 0.02)",
}


def method(**kw) -> DiffPruningMethod:
    return build_method(DiffPruningConfig(**kw))  # type: ignore[return-value]


def applied(model, total_steps=10, lr=1e-2, **kw) -> DiffPruningMethod:
    m = method(**kw)
    m.apply(model)
    m.prepare(model, [], None, RunPlan(total_steps=total_steps, lr=lr))
    return m


def optimizer(model, m, lr=1e-2, weight_decay=0.1):
    return torch.optim.AdamW(param_groups(model, m.trainable_parameters(model), lr, 1.0, weight_decay), lr=lr)


def train(model, m, steps, lr=1e-2, weight_decay=0.1, after_step=True, mode_train=True, opt=None) -> list[float]:
    """The loop contract (core.schedules): AdamW over the method's groups, after_step after every step."""
    ids, mask, labels = overfit_data()
    opt = opt or optimizer(model, m, lr, weight_decay)
    model.train(mode_train)
    losses = []
    for _ in range(steps):
        for half in (slice(0, 4), slice(4, 8)):  # two backward calls per step, as core.train's pieces
            loss_sum, n = supervised_loss(model, m, ids[half], mask[half], labels[half])
            (loss_sum / 8 / (ids.shape[1] - 1)).backward()
            losses.append(loss_sum.item() / n.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step:
            m.after_step(model)
    model.eval()
    return losses


def effective(m, model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {p: layer.effective_weight(sample=False).clone() for p, layer in m.layers(model).items()}


def test_registered_with_its_flags():
    s = specs()["diff_pruning"]
    assert s.family == "selective" and s.can_merge and s.prepares and not s.trains_base
    assert "smallest" in s.goals


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_gpt2], ids=["llama", "qwen2", "gpt2"])
def test_starts_at_base_counts_in_closed_form_and_disables(build):
    model = build()
    ids, mask = batch()
    base = logits(model, None, ids, mask)
    m = applied(model, sparsity=0.05)
    targeted = [layer.diff.numel() for layer in m.layers(model).values()]
    assert m.expected_trainable(model) == m.parameter_counts(model)[0] == 2 * sum(targeted)
    assert torch.equal(logits(model, m, ids, mask), base)  # w = 0
    train(model, m, steps=2)
    tuned = logits(model, m, ids, mask)
    assert not torch.equal(tuned, base)
    assert_toggle_restores(model, m, ids, mask, base, tuned)
    m.remove(model)
    assert torch.equal(logits(model, None, ids, mask), base)


def test_structured_adds_one_gate_per_tensor():
    model = tiny_llama()
    m = applied(model, structured=True)
    n = len(m.layers(model))
    assert m.expected_trainable(model) == m.parameter_counts(model)[0] == 2 * sum(
        layer.diff.numel() for layer in m.layers(model).values()) + n


@pytest.mark.parametrize("structured", [False, True])
def test_l0_gradient_is_added_exactly_once_per_step(structured):
    # alpha_init 0.5: the gates are not saturated, so α also gets a gradient from the loss
    cfg = dict(alpha_init=0.5, l0_weight=0.3, structured=structured)
    ids, mask, labels = overfit_data()

    def grads(l0_weight):
        model = tiny_llama()
        m = applied(model, lr=1e-2, alpha_lr=1e-2, **{**cfg, "l0_weight": l0_weight})
        with torch.no_grad():
            for layer in m.layers(model).values():
                layer.diff.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        for half in (slice(0, 4), slice(4, 8)):  # two backward calls: the penalty must come once
            loss_sum, _ = supervised_loss(model, m, ids[half], mask[half], labels[half])
            (loss_sum / 88).backward()
        return model, m

    with_l0, m = grads(0.3)
    without, _ = grads(0.0)
    layers_a, layers_b = m.layers(with_l0), DiffPruningMethod.layers(without)
    for path, layer in layers_a.items():
        ref = layers_b[path]
        alphas = [layer.gate_logit] + ([layer.group_logit] if structured else [])
        pen = torch.autograd.grad(0.3 * layer.expected_l0(), alphas)  # ∂(λ·L0)/∂α̂ by autograd
        assert torch.allclose(layer.gate_logit.grad, ref.gate_logit.grad + pen[0], atol=1e-7, rtol=1e-5), path
        if structured:
            assert torch.allclose(layer.group_logit.grad, ref.group_logit.grad + pen[1], atol=1e-7, rtol=1e-5)
        assert torch.equal(layer.diff.grad, ref.diff.grad)


def test_l0_term_falls_during_training():
    model = tiny_llama()
    m = applied(model, total_steps=100, l0_weight=1e-2, alpha_lr=0.2, alpha_init=3.0)
    before = m.expected_l0(model)
    assert before == pytest.approx(sum(layer.diff.numel() for layer in m.layers(model).values()) / (1 + math.exp(-3.0)))
    train(model, m, steps=15, weight_decay=0.0)
    after = m.expected_l0(model)
    assert after < 0.8 * before
    # with λ = 0 the same run keeps (nearly) every gate open: the fall is the penalty's doing
    model0 = tiny_llama()
    m0 = applied(model0, total_steps=100, l0_weight=0.0, alpha_lr=0.2, alpha_init=3.0)
    train(model0, m0, steps=15, weight_decay=0.0)
    assert m0.expected_l0(model0) > 0.95 * before


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_projection_keeps_the_target_count_and_the_largest_entries(build, tmp_path):
    model = build()
    m = applied(model, total_steps=6, sparsity=0.03, fixed_mask_steps=2)
    before_projection = {}

    def remember():
        with torch.no_grad():
            for p, layer in m.layers(model).items():
                before_projection[p] = layer.delta(sample=False).clone()

    train(model, m, steps=4, after_step=False)
    m.steps = 3  # the 4th step's after_step projects (total 6 − 2 fixed-mask steps)
    remember()
    m.after_step(model)
    assert m.projected(model) and m.steps == 4
    assert m.expected_trainable(model) == m.parameter_counts(model)[0]
    for p, layer in m.layers(model).items():
        n, kept = layer.diff.numel(), int(layer.mask.sum())
        assert kept == keep_count(n, 0.03) and abs(kept - 0.03 * n) <= 1, p
        d = before_projection[p].abs()
        assert d[layer.mask].min() >= d[~layer.mask].max(), p  # the top-k by |z ⊙ w|
        # the kept entries keep their delta, the others are exactly θ₀ again
        with torch.no_grad():
            now = layer.delta(sample=False)
        assert torch.equal(now[layer.mask], before_projection[p][layer.mask])
        assert torch.equal(now[~layer.mask], torch.zeros_like(now[~layer.mask]))
    saved = load_file(str(saved_logits(model, m, tmp_path / "dp") and tmp_path / "dp" / ADAPTER_WEIGHTS))
    for p, layer in m.layers(model).items():
        assert torch.equal(saved[f"{p}.weight.indices"], layer.mask.flatten().nonzero().squeeze(1))
    assert sum(t.numel() for k, t in saved.items() if k.endswith(".indices")) == m.parameter_counts(model)[0]


def test_fixed_mask_steps_move_only_kept_entries_bit_identically_elsewhere():
    model = tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = applied(model, total_steps=8, sparsity=0.05, fixed_mask_steps=4)
    opt = optimizer(model, m)  # one optimiser for both phases, as in core.train: momentum carries over
    train(model, m, steps=4, opt=opt)  # dense, then projected by the 4th after_step
    assert m.projected(model)
    projected = effective(m, model)
    train(model, m, steps=4, opt=opt)  # fixed mask, AdamW weight decay and momentum on w and α
    now = effective(m, model)
    moved = 0
    for p, layer in m.layers(model).items():
        w0 = base[f"{p}.weight"]
        assert torch.equal(layer.base_layer.weight, w0), p  # θ₀ never trains
        assert torch.equal(now[p][~layer.mask], w0[~layer.mask]), p  # θ = θ₀ bit for bit off the mask
        assert torch.equal(layer.diff[~layer.mask], torch.zeros_like(layer.diff[~layer.mask])), p
        moved += int((now[p][layer.mask] != projected[p][layer.mask]).sum())
    assert moved > 0.9 * m.parameter_counts(model)[0]  # the kept entries did train
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_without_after_step_momentum_would_move_masked_diff_entries():
    # the check above can fail: skipping after_step lets AdamW move w off the mask
    model = tiny_llama()
    m = applied(model, total_steps=8, sparsity=0.05, fixed_mask_steps=4)
    opt = optimizer(model, m)
    train(model, m, steps=4, opt=opt)
    train(model, m, steps=1, after_step=False, opt=opt)
    layer = next(iter(m.layers(model).values()))
    assert layer.diff[~layer.mask].abs().sum() > 0


def test_eval_gates_are_deterministic_and_training_gates_sample():
    model = tiny_llama()
    m = applied(model, alpha_init=0.0)
    train(model, m, steps=1, after_step=False)
    ids, mask = batch()
    a, b = logits(model, m, ids, mask), logits(model, m, ids, mask)
    assert torch.equal(a, b)
    model.train()
    c = logits(model, m, ids, mask)
    model.eval()
    assert not torch.equal(a, c)


@pytest.mark.parametrize("project", [False, True], ids=["dense", "projected"])
def test_save_load_identical_logits_and_merge(project, tmp_path):
    model = tiny_llama()
    m = applied(model, sparsity=0.05)
    train(model, m, steps=3)
    if project:
        m.project(model)
    ids, mask, want = saved_logits(model, m, tmp_path / "dp")
    saved = load_file(str(tmp_path / "dp" / ADAPTER_WEIGHTS))
    assert all(t.dtype == torch.int64 for k, t in saved.items() if k.endswith(".indices"))
    fresh = tiny_llama()
    loaded = load_adapter(fresh, tmp_path / "dp")
    assert torch.equal(logits(fresh, loaded, ids, mask), want)
    assert loaded.projected(fresh)
    if project:
        assert loaded.parameter_counts(fresh) == m.parameter_counts(model)
    # merged == unmerged bit for bit, and unmerge restores θ₀ exactly
    base_w = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    loaded.merge(fresh)
    assert torch.equal(logits(fresh, loaded, ids, mask), want)
    loaded.unmerge(fresh)
    assert all(torch.equal(p, base_w[n]) for n, p in fresh.named_parameters())
    assert_bake_round_trip(fresh, loaded, tmp_path / "hf")
    assert not DiffPruningMethod.layers(fresh)


def test_bake_gpt2_then_from_pretrained(tmp_path):
    model = tiny_gpt2()
    m = applied(model, total_steps=4, sparsity=0.1, fixed_mask_steps=1)
    train(model, m, steps=4)
    assert m.projected(model)
    assert_bake_round_trip(model, m, tmp_path / "hf")


def test_memorises_and_generates():
    model = sharpened("llama")  # a frozen head that can express peaked distributions (see tiny.sharpened)
    m = build_method(method_config("diff_pruning", CONTRACT["config"]))
    m.apply(model)
    losses = overfit(model, m, steps=CONTRACT["steps"], lr=CONTRACT["lr"])
    assert losses[-1] < 0.1 * losses[0]
    ids, mask, labels = overfit_data()
    with torch.no_grad():
        pred = logits(model, m, ids, mask)[:, :-1].argmax(-1)
    assert (pred == labels[:, 1:]).float().mean() >= CONTRACT["accuracy"]
    m.project(model)  # a loop that calls after_step projects at the end (fixed_mask_steps 0): still memorised
    with torch.no_grad():
        pred = logits(model, m, ids, mask)[:, :-1].argmax(-1)
    assert (pred == labels[:, 1:]).float().mean() >= CONTRACT["accuracy"]
    seq = greedy(model, m, ids[:1, :4], new_tokens=6)
    assert torch.equal(seq, greedy(model, m, ids[:1, :4], new_tokens=6)) and int(seq.max()) < VOCAB


def test_the_real_training_loop_projects_before_the_fixed_mask_steps(tmp_path):
    from test_train import run, run_config, steps, write_qa

    data = write_qa(tmp_path / "qa.json", n=8)
    cfg = run_config(data, method=DiffPruningConfig(sparsity=0.02, fixed_mask_steps=2, l0_weight=1e-3), max_steps=5,
                     weight_decay=0.01)
    events = run(cfg, tmp_path / "run")
    assert events[-1]["status"] == "completed" and len(steps(events)) == 5
    saved = load_file(str(tmp_path / "run" / "adapter" / ADAPTER_WEIGHTS))
    sizes = {k[: -len(".indices")]: t.numel() for k, t in saved.items() if k.endswith(".indices")}
    from test_train import tiny_lm

    shapes = {n: p.numel() for n, p in tiny_lm().named_parameters()}
    assert sizes and all(n == keep_count(shapes[k], 0.02) for k, n in sizes.items())


def test_bad_delta_is_refused():
    model = tiny_llama()
    m = applied(model)
    good = m.adapter_tensors(model)
    key = next(k for k in good if k.endswith(".indices"))
    for bad in (
        {**good, key: torch.tensor([10**9])},  # out of range (and length mismatch)
        {k: v for k, v in good.items() if k != key},  # missing
        {**good, "x.weight.values": torch.zeros(1)},  # unexpected
    ):
        fresh = tiny_llama()
        f = applied(fresh)
        with pytest.raises(ValueError, match="diff pruning"):
            f.load_adapter_tensors(fresh, bad)


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: DiffPruningConfig(sparsity=0.0), "sparsity"),
        (lambda: DiffPruningConfig(sparsity=1.5), "sparsity"),
        (lambda: method_config("diff_pruning", {"l0_weight": -1}), "l0_weight"),
        (lambda: method_config("diff_pruning", {"alpha_lr": 0}), "alpha_lr"),
        (lambda: method_config("diff_pruning", {"alpha_init": 99}), "alpha_init"),
        (lambda: method_config("diff_pruning", {"fixed_mask_steps": -1}), "fixed_mask_steps"),
        (lambda: applied(tiny_llama(), targets=["nope"]), "targets"),
        (lambda: applied(tiny_llama(), total_steps=3, fixed_mask_steps=3), "fixed_mask_steps"),
    ],
)
def test_bad_knobs_name_the_field(build, field):
    with pytest.raises(ValueError, match=f"DiffPruningConfig.{field}"):
        build()


def test_cli_help_lists_the_method_and_its_knobs(capsys):
    from core.__main__ import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])  # help strings go through argparse's % formatting
    out = capsys.readouterr().out
    assert "diff_pruning" in out
    assert all(f"--{k}" in out for k in ("sparsity", "l0-weight", "alpha-lr", "fixed-mask-steps", "structured"))


@pytest.mark.parametrize("stop_at", [2, 4], ids=["before-projection", "after-projection"])
def test_stop_and_resume_equals_one_uninterrupted_run(tmp_path, stop_at):
    """The projection happens at the planned step (3 of 5) whether the run was resumed before or after it."""
    from test_train import STOP_FILE, run, run_config, steps, write_qa

    data = write_qa(tmp_path / "qa.json", n=8)
    cfg = run_config(data, method=DiffPruningConfig(sparsity=0.02, fixed_mask_steps=2, l0_weight=1e-3), max_steps=5,
                     weight_decay=0.01, save_every=1)
    whole = run(cfg, tmp_path / "whole")

    def stop(e):
        if e["type"] == "step" and e["step"] == stop_at:
            (tmp_path / "split" / STOP_FILE).write_text("")

    first = run(cfg, tmp_path / "split", on_event=stop)
    assert first[-1]["status"] == "stopped"
    second = run(cfg, tmp_path / "split", resume=True)
    assert second[0]["resumed_from"] == stop_at and second[-1]["status"] == "completed"
    assert [e["loss"] for e in steps(first) + steps(second)] == [e["loss"] for e in steps(whole)]
    ta = load_file(str(tmp_path / "whole" / "adapter" / ADAPTER_WEIGHTS))
    tb = load_file(str(tmp_path / "split" / "adapter" / ADAPTER_WEIGHTS))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
