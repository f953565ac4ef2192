import pytest

from core.advisor import GOALS, HARDWARE, recommend
from core.config import TrainConfig, method_config


def test_seed_table_rows():
    assert recommend(50_000, "large_gpu", "quality").method == "full"  # large data, enough compute
    assert recommend(500, "small_gpu", "quick").method == "lora"  # quick experiments
    assert recommend(5_000, "small_gpu", "multitask").method == "adapter"  # multi-task sharing
    assert recommend(500, "cpu", "smallest").method == "prompt_tuning"  # extreme compression
    assert recommend(50_000, "large_gpu", "smallest").method == "prefix_tuning"
    assert recommend(500, "cpu", "frozen_base").method == "lora"  # base must not change


def test_quality_refined_by_data_and_hardware():
    small = recommend(300, "large_gpu", "quality")
    assert small.method == "lora" and any("overfit" in r for r in small.reasons)
    weak = recommend(50_000, "cpu", "quality")
    assert weak.method == "lora" and any("16 bytes" in r for r in weak.reasons)
    big = recommend(50_000, "large_gpu", "quality")
    assert big.train["llrd_decay"] == 0.9 and big.label.startswith("LLRD")


@pytest.mark.parametrize("hardware", list(HARDWARE))
@pytest.mark.parametrize("goal", list(GOALS))
@pytest.mark.parametrize("rows", [10, 2_000, 100_000])
def test_every_advice_is_a_valid_config_with_reasons(rows, hardware, goal):
    a = recommend(rows, hardware, goal)
    method_config(a.method, a.method_config)  # raises if the knobs are invalid
    TrainConfig.from_dict(a.train)
    assert a.reasons and all(isinstance(r, str) and r for r in a.reasons)
    assert any("Seed table" in r or "LoRA" in r for r in a.reasons)


@pytest.mark.parametrize("args, field", [((-1, "cpu", "quick"), "rows"), ((10, "tpu", "quick"), "hardware"),
                                         ((10, "cpu", "fast"), "goal")])
def test_bad_inputs_name_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        recommend(*args)
