"""Learning-rate schedules: hand-computed factors at chosen steps, and Hugging Face's curves."""

from __future__ import annotations

import math

import pytest

from panda.plugins.schedulers import make_lr_scheduler, resolve_warmup_steps
from panda.recipe_schema import ScheduleSection
from panda.registry import registry

T, W = 110, 10  # total optimizer steps, warm-up steps: 100 steps of decay after warm-up


def schedule(name: str, **options):
    plugin_class = registry.get("scheduler", name)
    return plugin_class(plugin_class.Options(**options))


def factors(plugin, steps, total=T, warmup=W):
    return [plugin.factor(step, total, warmup) for step in steps]


@pytest.mark.parametrize("name", ["linear", "cosine", "constant", "poly", "warmup"])
def test_every_schedule_warms_up_linearly_from_zero(name):
    assert factors(schedule(name), [0, 1, 5, 9]) == pytest.approx([0.0, 0.1, 0.5, 0.9])
    assert schedule(name).factor(W, T, W) == pytest.approx(1.0)  # the peak right after


def test_linear_by_hand():
    # after warm-up: (T - s) / (T - W)
    assert factors(schedule("linear"), [10, 60, 109, 110, 500]) == pytest.approx(
        [1.0, 0.5, 0.01, 0.0, 0.0])


def test_cosine_by_hand():
    # progress p = (s - 10) / 100; 0.5 * (1 + cos(pi p))
    assert factors(schedule("cosine"), [35, 60, 85, 110, 300]) == pytest.approx(
        [0.5 + 0.5 * math.sqrt(0.5), 0.5, 0.5 - 0.5 * math.sqrt(0.5), 0.0, 0.0])
    # min_lr_ratio 0.1: 0.1 + 0.9 * the above
    assert factors(schedule("cosine", min_lr_ratio=0.1), [60, 110, 300]) == pytest.approx(
        [0.55, 0.1, 0.1])


def test_constant_by_hand():
    assert factors(schedule("constant"), [10, 60, 110, 1000]) == [1.0, 1.0, 1.0, 1.0]


def test_poly_by_hand():
    assert factors(schedule("poly"), [60, 110]) == pytest.approx([0.5, 0.0])
    assert factors(schedule("poly", power=2.0), [35, 60]) == pytest.approx([0.5625, 0.25])
    assert factors(schedule("poly", power=0.5), [60]) == pytest.approx([math.sqrt(0.5)])
    assert factors(schedule("poly", power=2.0, min_lr_ratio=0.2), [60, 110, 200]) == \
        pytest.approx([0.2 + 0.8 * 0.25, 0.2, 0.2])


def test_warmup_is_deepspeed_warmup_decay_lr():
    # DeepSpeed WarmupDecayLR, warmup_type "linear", min lr 0, written out:
    #   s < W: s / W;  s >= W: max(0, (T - s) / max(1, T - W))
    def deepspeed(step):
        if step < W:
            return step / W
        return max(0.0, (T - step) / max(1.0, T - W))

    steps = list(range(0, 130))
    assert factors(schedule("warmup"), steps) == pytest.approx([deepspeed(s) for s in steps])
    assert factors(schedule("warmup"), [5, 60, 110]) == pytest.approx([0.5, 0.5, 0.0])


def test_warmup_log_type_by_hand():
    # log(s + 1) / log(W) during warm-up, then the same linear decay
    plugin = schedule("warmup", warmup_type="log")
    assert factors(plugin, [0, 4, 9, 10, 60]) == pytest.approx(
        [0.0, math.log(5) / math.log(10), 1.0, 1.0, 0.5])


def test_no_warmup_starts_at_the_peak():
    assert schedule("linear").factor(0, 100, 0) == 1.0
    assert schedule("cosine").factor(50, 100, 0) == pytest.approx(0.5)
    assert schedule("warmup", warmup_type="log").factor(0, 100, 0) == 1.0


def test_warmup_longer_than_the_run_never_decays():
    assert factors(schedule("cosine"), [0, 10, 29], total=30, warmup=50) == pytest.approx(
        [0.0, 0.2, 0.58])


@pytest.mark.parametrize("name, hf_name, kwargs", [
    ("linear", "get_linear_schedule_with_warmup", {}),
    ("cosine", "get_cosine_schedule_with_warmup", {}),
    ("constant", "get_constant_schedule_with_warmup", {}),
    ("poly", "get_polynomial_decay_schedule_with_warmup", {"lr_end": 0.0, "power": 2.0}),
])
def test_curves_match_hugging_face(name, hf_name, kwargs):
    import torch
    import transformers

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    options = {"power": 2.0} if name == "poly" else {}
    hf_args = {} if name == "constant" else {"num_training_steps": T}
    hf = getattr(transformers, hf_name)(optimizer, num_warmup_steps=W, **hf_args, **kwargs)
    expected = [hf.lr_lambdas[0](step) for step in range(T)]
    assert factors(schedule(name, **options), range(T)) == pytest.approx(expected, abs=1e-12)


def test_resolve_warmup_steps():
    assert resolve_warmup_steps(ScheduleSection(), 1000) == 50  # the recipe default
    assert resolve_warmup_steps(ScheduleSection(warmup_steps=7), 1000) == 7
    # proportion replaces steps, rounded down as PandaLLM did: int(1234 * 0.01) = 12
    assert resolve_warmup_steps(ScheduleSection(warmup_proportion=0.01), 1234) == 12
    assert resolve_warmup_steps(ScheduleSection(warmup_proportion=0.5), 7) == 3


def test_make_lr_scheduler_drives_torch_and_resumes():
    import torch

    def new_optimizer():
        param = torch.nn.Parameter(torch.zeros(1))
        return torch.optim.SGD([{"params": [param]}, {"params": [], "weight_decay": 0.0}],
                               lr=0.2)

    plugin = schedule("cosine")
    optimizer = new_optimizer()
    scheduler = make_lr_scheduler(optimizer, plugin, total_steps=20, warmup_steps=4)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.2 * plugin.factor(s, 20, 4) for s in range(12)])

    # A scheduler rebuilt from state_dict continues where the first one was.
    resumed_optimizer = new_optimizer()
    resumed = make_lr_scheduler(resumed_optimizer, plugin, total_steps=20, warmup_steps=4)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.get_last_lr()[0] == pytest.approx(0.2 * plugin.factor(12, 20, 4))
    resumed_optimizer.step()
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * plugin.factor(13, 20, 4))


def test_schedule_options_are_validated():
    with pytest.raises(ValueError):
        registry.get("scheduler", "cosine").Options(min_lr_ratio=1.5)
    with pytest.raises(ValueError):
        registry.get("scheduler", "warmup").Options(warmup_type="exp")
