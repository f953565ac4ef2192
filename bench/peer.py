"""Side (b): transformers.Trainer + peft, the way their users typically run it, and with group_by_length.

Default settings: pad to the longest sequence in each batch (DataCollatorForSeq2Seq), the model's own loss
(logits over the full vocabulary at every position), the Trainer's default optimiser. Only the hyperparameters
that the comparison must share (lr, batch, epochs, seed, schedule) are set.

Two things are shared with our side so that the eval losses differ by the implementations only, not by luck:
the initial trainable weights (our seeded init, copied into peft's tensors) and the batches (the rows of each
optimiser step, read in our engine's order with the sequential sampler; on CPU they are uniform random draws,
the same distribution as the Trainer's default random sampler, so the padding the peer pays is typical).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from core.models import default_dtype, load_tokenizer, resolve_device, resolve_model_path, resolve_precision

from .common import BATCH, SEED, Case, encode_file, our_batch_order, peak_memory_mb, supervised_tokens


class Rows(torch.utils.data.Dataset):
    """The training rows as a plain map-style torch Dataset of feature dicts (no ``datasets`` package needed:
    the GPU image has none). The Trainer reads ``input_ids`` lengths from it when it groups by length."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def features(example) -> dict:
    """One row as the Trainer's collator wants it: ids, labels (-100 on prompt tokens), an all-ones mask."""
    return {"input_ids": example.input_ids, "labels": example.labels, "attention_mask": [1] * len(example.input_ids)}


def peft_config(case: Case, model):
    import peft

    k = case.knobs
    if case.method == "lora":
        return peft.LoraConfig(r=k["r"], lora_alpha=k["alpha"], target_modules=k["targets"], lora_dropout=0.0,
                               task_type="CAUSAL_LM")
    if case.method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=k["num_virtual_tokens"], task_type="CAUSAL_LM")
    if case.method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=k["num_virtual_tokens"], prefix_projection=True,
                                       encoder_hidden_size=k["encoder_hidden"], task_type="CAUSAL_LM")
    if case.method == "p_tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=k["num_virtual_tokens"], encoder_hidden_size=k["encoder_hidden"],
                                        encoder_reparameterization_type=k["encoder_type"].upper(), task_type="CAUSAL_LM")
    raise ValueError(f"peft has no counterpart for {case.method}")


def plain_model(name: str):
    """(model, tokenizer) as the peer's users load them: transformers alone, in the dtype core.models.load_model
    picks, with none of our engine's kernels (core.attention, core.linear). The process shares core.linear's
    oneDNN cache setting (64 compiled shapes; ours ran at the same speed with the default 1024)."""
    device = resolve_device("auto")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=default_dtype(device),
                                                 attn_implementation="sdpa")
    return model.to(device).eval().requires_grad_(False), load_tokenizer(name)


@torch.no_grad()
def our_init(case: Case, model) -> list[torch.Tensor]:
    """The trainable tensors our engine starts from (core.train.train seeds right before it builds the method)."""
    from core.config import method_config
    from core.methods import build_method

    torch.manual_seed(SEED)
    method = build_method(method_config(case.method, case.knobs))
    method.apply(model)
    init = [p.detach().clone() for p in method.trainable_parameters(model).values()]
    method.remove(model)
    model.requires_grad_(False)
    return init


@torch.no_grad()
def start_from(peft_model, init: list[torch.Tensor], case: Case) -> None:
    """Start peft from our initial weights, so the eval losses differ by the training runs only, not by the luck
    of the initialisation. Our trainable tensors and peft's come in the same module order with the same shapes;
    anything else is refused."""
    theirs = [p for p in peft_model.parameters() if p.requires_grad]
    if [tuple(t.shape) for t in init] != [tuple(t.shape) for t in theirs]:
        raise RuntimeError(f"{case.name}: our trainable tensors do not line up with peft's; cannot share the init")
    for mine, their in zip(init, theirs):
        their.copy_(mine)


@torch.no_grad()
def eval_loss(model, examples, collator, device) -> float:
    """Token-mean cross-entropy over the supervised tokens of the held-out rows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), BATCH):
        feats = [features(e) for e in examples[i : i + BATCH]]
        batch = {k: v.to(device) for k, v in collator(feats).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    return total / count


def run(case: Case, model, tokenizer, train_file: Path, val_file: Path, work: Path, device,
        grouped: bool = False, epochs: int = 1, attn: str = "sdpa",
        training: AbstractContextManager | None = None) -> dict:
    """Timed like ours (the whole of core.train.train): tokenise, wrap, train, save the adapter.

    ``grouped``: the Trainer's strongest standard setting, batches of similar lengths (its LengthGroupedSampler,
    group_by_length) instead of our batches in our order; the rows and the init are still shared. ``attn``: the
    model's attn_implementation, transformers' default "sdpa" or its "eager" matmuls (faster for short rows under
    bf16 autocast on a CPU, where SDPA's flash kernel runs in bf16). ``training``: a context ``trainer.train()``
    alone goes through (bench.one's FLOP counter)."""
    import peft

    init = our_init(case, model)  # not timed
    model.set_attn_implementation(attn)
    t0 = time.perf_counter()
    train = encode_file(train_file, tokenizer)
    model = peft.get_peft_model(model, peft_config(case, model))
    start_from(model, init, case)
    order = range(len(train)) if grouped else our_batch_order(train, device, epochs)  # every epoch's batches
    ds = Rows([features(train[i]) for i in order])
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    args = TrainingArguments(
        output_dir=str(work / "peer"), per_device_train_batch_size=BATCH, num_train_epochs=epochs if grouped else 1,
        learning_rate=case.lr, lr_scheduler_type="linear", warmup_steps=0, seed=SEED, report_to="none",
        save_strategy="no", logging_steps=10, disable_tqdm=True, use_cpu=device.type == "cpu",
        # our batches in our order (see our_batch_order), or the Trainer's own length grouping
        train_sampling_strategy="group_by_length" if grouped else "sequential",
        # bf16 autocast where our side runs bf16-mixed: precision "auto" on a GPU with bf16 or a CPU with AMX or
        # AVX512-BF16 (Trainer's bf16 keeps fp32 weights and autocasts the forward pass)
        bf16=resolve_precision(case.precision, device) == "bf16-mixed",
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    with training or nullcontext():
        trainer.train()
    trainer.save_model(str(work / "peer" / "adapter"))
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    mem = peak_memory_mb(device)
    return {
        "wall_s": wall,
        "tokens_per_s": supervised_tokens(train) / wall,
        "peak_mem_mb": mem,
        "eval_loss": eval_loss(model, encode_file(val_file, tokenizer), collator, device),
        "trainable": model.get_nb_trainable_parameters()[0],
    }
