"""Optimizers against hand-computed updates on small tensors, and the weight-decay split.

Every reference below is written out element by element in plain Python from the
published update rule, independent of the implementation under test.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from panda.errors import MissingDependencyError, PandaError
from panda.plugins.optimizers import param_groups
from panda.registry import registry


def build(name: str, params, lr: float, weight_decay: float = 0.0, **options):
    plugin_class = registry.get("optimizer", name)
    plugin = plugin_class(plugin_class.Options(**options))
    return plugin.build([{"params": params, "weight_decay": weight_decay}], lr)


def step_with(optimizer, params, grads):
    for param, grad in zip(params, grads):
        param.grad = torch.tensor(grad, dtype=param.dtype)
    optimizer.step()


def as_list(param):
    return param.detach().tolist()


# -- adamw -------------------------------------------------------------------------------------

def adamw_reference(w, grads_per_step, lr, betas, eps, wd, decay_after_step=False):
    """torch AdamW decays the weights before the Adam step; bitsandbytes' kernels after it."""
    b1, b2 = betas
    w, m, v = list(w), [0.0] * len(w), [0.0] * len(w)
    for t, g in enumerate(grads_per_step, start=1):
        for i, gi in enumerate(g):
            if not decay_after_step:
                w[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            w[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
            if decay_after_step:
                w[i] *= 1 - lr * wd
    return w


def test_adamw_matches_hand_computed_two_steps():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    grads = [[0.5, 0.1, -0.3], [-0.2, 0.4, 0.0]]
    optimizer = build("adamw", [param], lr=0.1, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-6)
    for g in grads:
        step_with(optimizer, [param], [g])
    expected = adamw_reference([1.0, -2.0, 0.5], grads, 0.1, (0.9, 0.99), 1e-6, 0.1)
    assert as_list(param) == pytest.approx(expected, rel=1e-12)
    # First step by hand: m_hat/sqrt(v_hat) = sign(g), so w = w*(1 - 0.01) - 0.1*sign(g).
    one = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    step_with(build("adamw", [one], lr=0.1, weight_decay=0.1, eps=1e-12), [one], [[0.5]])
    assert one.item() == pytest.approx(0.99 - 0.1, rel=1e-9)


def test_adamw_is_not_fused_on_cpu_and_keeps_group_decay():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = build("adamw", [param], lr=1e-3, weight_decay=0.05)
    assert optimizer.defaults["fused"] is None
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)


@pytest.mark.gpu
def test_adamw_is_fused_on_cuda_and_matches_hand_computed():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], device="cuda"))
    grads = [[0.5, 0.1, -0.3], [-0.2, 0.4, 0.0]]
    optimizer = build("adamw", [param], lr=0.1, weight_decay=0.1)
    assert optimizer.defaults["fused"] is True
    for g in grads:
        param.grad = torch.tensor(g, device="cuda")
        optimizer.step()
    expected = adamw_reference([1.0, -2.0, 0.5], grads, 0.1, (0.9, 0.99), 1e-6, 0.1)
    assert param.detach().cpu().tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.gpu
def test_nvlamb_and_lion_on_cuda_match_the_references():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    w0 = [[3.0, -4.0, 1.0], [0.5, -0.25]]
    grads = [[[3.0, 4.0, -1.0], [0.5, 0.5]], [[0.01, -0.02, 0.03], [-0.01, 0.01]]]
    params = [torch.nn.Parameter(torch.tensor(w, device="cuda")) for w in w0]
    optimizer = build("nvlamb", params, lr=0.02, weight_decay=0.01)
    for step_grads in grads:
        for param, g in zip(params, step_grads):
            param.grad = torch.tensor(g, device="cuda")
        optimizer.step()
    expected = nvlamb_reference(w0, grads, 0.02, (0.9, 0.999), 1e-6, [0.01, 0.01])
    for param, want in zip(params, expected):
        assert param.detach().cpu().tolist() == pytest.approx(want, rel=1e-5)
    lion_param = torch.nn.Parameter(torch.tensor([0.0, 0.0], device="cuda"))
    lion = build("lion", [lion_param], lr=0.01)
    for g in ([1.0, 1.0], [-0.05, -20.0]):
        lion_param.grad = torch.tensor(g, device="cuda")
        lion.step()
    assert lion_param.detach().cpu().tolist() == pytest.approx([-0.02, 0.0], abs=1e-7)


# -- lion --------------------------------------------------------------------------------------

def lion_reference(w, grads_per_step, lr, betas, wd):
    b1, b2 = betas
    w, m = list(w), [0.0] * len(w)
    for g in grads_per_step:
        for i, gi in enumerate(g):
            c = b1 * m[i] + (1 - b1) * gi
            update = (c > 0) - (c < 0)
            w[i] -= lr * (update + wd * w[i])
            m[i] = b2 * m[i] + (1 - b2) * gi
    return w


def test_lion_first_step_by_hand():
    param = torch.nn.Parameter(torch.tensor([1.0, -0.5, 0.0]))
    optimizer = build("lion", [param], lr=0.1, weight_decay=0.5)
    step_with(optimizer, [param], [[0.3, -0.2, 0.0]])
    # sign(0.1*g) = [1, -1, 0]; w - 0.1*(sign + 0.5*w)
    assert as_list(param) == pytest.approx([0.85, -0.375, 0.0], abs=1e-7)
    assert optimizer.state[param]["exp_avg"].tolist() == pytest.approx([0.003, -0.002, 0.0])


def test_lion_momentum_decides_the_sign_on_later_steps():
    # Step 2's gradient points the other way, but beta1*m + (1-beta1)*g keeps
    # the sign of the momentum when |g| is small: a rule Adam-style tests miss.
    grads = [[1.0, 1.0], [-0.05, -20.0]]
    param = torch.nn.Parameter(torch.tensor([0.0, 0.0], dtype=torch.float64))
    optimizer = build("lion", [param], lr=0.01, betas=(0.9, 0.99))
    for g in grads:
        step_with(optimizer, [param], [g])
    expected = lion_reference([0.0, 0.0], grads, 0.01, (0.9, 0.99), 0.0)
    assert as_list(param) == pytest.approx(expected, abs=1e-15)
    assert expected == pytest.approx([-0.02, 0.0])  # first: +,+ ; second: +,- -> -0.01-0.01, -0.01+0.01


def test_lion_rejects_beta_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        registry.get("optimizer", "lion").Options(betas=(0.9, 1.0))


# -- nvlamb ------------------------------------------------------------------------------------

def nvlamb_reference(ws, grads_per_step, lr, betas, eps, wds, prenorm=True, max_norm=1.0,
                     bias_correction=True, adapt_all=True):
    """apex FusedLAMB (multi_tensor_lamb.cu) for a list of 1-D tensors given as lists."""
    b1, b2 = betas
    ws = [list(w) for w in ws]
    ms = [[0.0] * len(w) for w in ws]
    vs = [[0.0] * len(w) for w in ws]
    for t, grads in enumerate(grads_per_step, start=1):
        global_norm = math.sqrt(sum(g * g for grad in grads for g in grad))
        divisor = max(global_norm / max_norm, 1.0) if prenorm else 1.0
        c1 = 1 - b1 ** t if bias_correction else 1.0
        c2 = 1 - b2 ** t if bias_correction else 1.0
        for w, m, v, grad, wd in zip(ws, ms, vs, grads, wds):
            update = []
            for i, g in enumerate(grad):
                g = g / divisor
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                update.append((m[i] / c1) / (math.sqrt(v[i] / c2) + eps) + wd * w[i])
            w_norm = math.sqrt(sum(x * x for x in w))
            u_norm = math.sqrt(sum(x * x for x in update))
            ratio = 1.0
            if (adapt_all or wd != 0) and w_norm > 0 and u_norm > 0:
                ratio = w_norm / u_norm
            for i, u in enumerate(update):
                w[i] -= lr * ratio * u
    return ws


def test_nvlamb_first_step_by_hand():
    # ||G|| = 5 > 1, so g is pre-normalized to [0.6, 0.8]; with bias correction the
    # Adam step is sign(g) (eps aside): u = [1, 1], ||u|| = sqrt(2), ||w|| = 5,
    # trust ratio 5/sqrt(2): w = [3, 4] - 0.01 * 5/sqrt(2) * [1, 1].
    param = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = build("nvlamb", [param], lr=0.01, eps=1e-12)
    step_with(optimizer, [param], [[3.0, 4.0]])
    shift = 0.01 * 5 / math.sqrt(2)
    assert as_list(param) == pytest.approx([3.0 - shift, 4.0 - shift], rel=1e-9)


def test_nvlamb_matches_apex_reference_over_steps_and_groups():
    # Two tensors in two groups (one decayed, one not); gradient norms above and
    # below the pre-normalization threshold; a zero tensor (trust ratio 1).
    w0 = [[3.0, -4.0, 1.0], [0.0, 0.0], [0.5, -0.25]]
    grads = [[[3.0, 4.0, -1.0], [1.0, -2.0], [0.5, 0.5]],
             [[0.01, -0.02, 0.03], [0.02, 0.0], [-0.01, 0.01]],
             [[-1.0, 0.5, 0.2], [0.3, 0.3], [0.0, 0.0]]]
    params = [torch.nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in w0]
    plugin_class = registry.get("optimizer", "nvlamb")
    optimizer = plugin_class(plugin_class.Options()).build(
        [{"params": params[:1], "weight_decay": 0.01},
         {"params": params[1:], "weight_decay": 0.0}], lr=0.02)
    for step_grads in grads:
        step_with(optimizer, params, step_grads)
    expected = nvlamb_reference(w0, grads, 0.02, (0.9, 0.999), 1e-6, [0.01, 0.0, 0.0])
    for param, want in zip(params, expected):
        assert as_list(param) == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("options", [
    dict(grad_pre_normalization=False),
    dict(bias_correction=False),
    dict(adapt_all=False),
    dict(prenorm_max_norm=0.5),
])
def test_nvlamb_options_follow_the_reference(options):
    w0 = [[3.0, -4.0], [1.0, 2.0]]
    grads = [[[3.0, 4.0], [1.0, -1.0]], [[0.1, 0.2], [0.0, 0.3]]]
    params = [torch.nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in w0]
    plugin_class = registry.get("optimizer", "nvlamb")
    optimizer = plugin_class(plugin_class.Options(**options)).build(
        [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
        lr=0.05)
    for step_grads in grads:
        step_with(optimizer, params, step_grads)
    expected = nvlamb_reference(
        w0, grads, 0.05, (0.9, 0.999), 1e-6, [0.1, 0.0],
        prenorm=options.get("grad_pre_normalization", True),
        max_norm=options.get("prenorm_max_norm", 1.0),
        bias_correction=options.get("bias_correction", True),
        adapt_all=options.get("adapt_all", True))
    for param, want in zip(params, expected):
        assert as_list(param) == pytest.approx(want, rel=1e-10)


def test_nvlamb_pre_normalization_changes_later_steps():
    def run(prenorm: bool):
        param = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
        optimizer = build("nvlamb", [param], lr=0.1, grad_pre_normalization=prenorm)
        for g in ([30.0, 40.0], [0.1, -0.1]):
            step_with(optimizer, [param], [g])
        return as_list(param)

    assert run(True) != pytest.approx(run(False), rel=1e-3)


@pytest.mark.slow
def test_nvlamb_on_sharded_dtensors_matches_unsharded(tmp_path):
    """FSDP2 shards parameters as DTensors: norms must cover the whole tensor on every rank."""
    import socket
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = Path(__file__).with_name("nvlamb_sharded_worker.py")
    result = subprocess.run([sys.executable, str(worker), str(port), str(tmp_path / "worst")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float((tmp_path / "worst").read_text()) < 1e-6


def test_nvlamb_max_trust_ratio_clamps():
    param = torch.nn.Parameter(torch.tensor([30.0, 40.0], dtype=torch.float64))
    optimizer = build("nvlamb", [param], lr=0.01, eps=1e-12, max_trust_ratio=2.0)
    step_with(optimizer, [param], [[1.0, 1.0]])
    # ratio would be 50/sqrt(2) ~ 35; clamped to 2.
    assert as_list(param) == pytest.approx([30.0 - 0.02, 40.0 - 0.02], rel=1e-9)


# -- adafactor ---------------------------------------------------------------------------------

def adafactor_reference(w, grads_per_step, lr, eps1=1e-30, clip=1.0, decay_rate=-0.8, wd=0.0):
    """Factored Adafactor (Shazeer & Stern 2018, Alg. 4), no relative step, no param scale."""
    rows, cols = len(w), len(w[0])
    w = [list(r) for r in w]
    R, C = [0.0] * rows, [0.0] * cols
    for t, g in enumerate(grads_per_step, start=1):
        beta2 = 1 - t ** decay_rate
        sq = [[g[i][j] ** 2 + eps1 for j in range(cols)] for i in range(rows)]
        R = [beta2 * R[i] + (1 - beta2) * sum(sq[i]) / cols for i in range(rows)]
        C = [beta2 * C[j] + (1 - beta2) * sum(sq[i][j] for i in range(rows)) / rows
             for j in range(cols)]
        mean_r = sum(R) / rows
        u = [[g[i][j] / math.sqrt((R[i] / mean_r) * C[j]) for j in range(cols)]
             for i in range(rows)]
        rms = math.sqrt(sum(x * x for r in u for x in r) / (rows * cols))
        scale = lr / max(rms / clip, 1.0)
        for i in range(rows):
            for j in range(cols):
                w[i][j] -= w[i][j] * wd * lr
                w[i][j] -= scale * u[i][j]
    return w


def test_adafactor_factored_update_matches_paper_reference():
    w0 = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]
    grads = [[[0.1, -0.2, 0.3], [0.4, 0.0, -0.1]], [[-0.3, 0.1, 0.2], [0.05, -0.5, 0.2]]]
    param = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    optimizer = build("adafactor", [param], lr=0.01, weight_decay=0.1)
    for g in grads:
        step_with(optimizer, [param], [g])
    expected = adafactor_reference(w0, grads, lr=0.01, wd=0.1)
    for row, want in zip(param.detach().tolist(), expected):
        assert row == pytest.approx(want, rel=1e-9)


def test_adafactor_uses_the_given_lr_not_a_relative_step():
    param = torch.nn.Parameter(torch.tensor([2.0, -2.0]))
    optimizer = build("adafactor", [param], lr=0.01)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01
    assert group["relative_step"] is False and group["scale_parameter"] is False
    step_with(optimizer, [param], [[1.0, -1.0]])
    # Unfactored (1-D): v = g^2 + eps, u = g/sqrt(v) = sign(g), RMS 1 -> no clipping.
    assert as_list(param) == pytest.approx([1.99, -1.99], rel=1e-6)


# -- adamw8bit ---------------------------------------------------------------------------------

def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_bitsandbytes(), reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_names_the_extra():
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(MissingDependencyError) as info:
        build("adamw8bit", [param], lr=1e-3)
    assert info.value.message == ("optimizer 'adamw8bit' needs bitsandbytes: "
                                  "pip install 'pandallm[quant]'")


@pytest.mark.gpu
def test_adamw8bit_matches_adamw_on_cuda():
    if not _has_bitsandbytes():
        pytest.skip("bitsandbytes is not installed (pip install 'pandallm[quant]')")
    if not torch.cuda.is_available():
        pytest.skip("adamw8bit needs a CUDA device")
    torch.manual_seed(0)
    # Small tensors keep 32-bit states in bitsandbytes (min_8bit_size=4096): exact
    # AdamW. The large one gets block-wise 8-bit states: close to AdamW, not equal.
    small = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], device="cuda"))
    large = torch.nn.Parameter(torch.randn(128, 64, device="cuda"))
    start_large = large.detach().clone()
    optimizer = build("adamw8bit", [small, large], lr=0.01, weight_decay=0.1)
    grads_large = [torch.randn(128, 64, device="cuda") for _ in range(3)]
    grads_small = [[0.5, 0.1, -0.3], [-0.2, 0.4, 0.0], [0.1, 0.1, 0.1]]
    for g_small, g_large in zip(grads_small, grads_large):
        small.grad = torch.tensor(g_small, device="cuda")
        large.grad = g_large
        optimizer.step()
    expected = adamw_reference([1.0, -2.0, 0.5], grads_small, 0.01, (0.9, 0.99), 1e-6, 0.1,
                               decay_after_step=True)
    assert small.detach().cpu().tolist() == pytest.approx(expected, rel=1e-6)

    reference = torch.nn.Parameter(start_large.clone())
    exact = torch.optim.AdamW([reference], lr=0.01, betas=(0.9, 0.99), eps=1e-6,
                              weight_decay=0.1)
    for g_large in grads_large:
        reference.grad = g_large
        exact.step()
    moved = (reference - start_large).abs().mean()
    error = (large - reference).abs().mean()
    assert error < 0.05 * moved


# -- weight-decay split and plugin hygiene ------------------------------------------------------

def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         **overrides)
    return LlamaForCausalLM(config)


def test_param_groups_on_llama_names():
    model = tiny_llama(attention_bias=True, tie_word_embeddings=False)
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    plain = sorted(names[id(p)] for p in groups[1]["params"])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert decayed == sorted([
        "model.embed_tokens.weight", "lm_head.weight",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight"])
    assert plain == sorted([
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight", "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.k_proj.bias", "model.layers.0.self_attn.v_proj.bias",
        "model.layers.0.self_attn.o_proj.bias"])


def test_param_groups_skip_frozen_and_tied_and_named_norms():
    model = tiny_llama(tie_word_embeddings=True)
    model.model.layers[0].mlp.requires_grad_(False)
    # A 2-D parameter whose name says "norm" gets no decay either.
    model.model.register_parameter("extra_norm", torch.nn.Parameter(torch.ones(2, 2)))
    groups = param_groups(model, weight_decay=0.1)
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})  # tied weight once
    assert not any(p is model.model.layers[0].mlp.up_proj.weight for p in all_params)
    assert any(p is model.model.extra_norm for p in groups[1]["params"])


def test_param_groups_without_trainable_parameters_is_a_user_error():
    model = tiny_llama()
    model.requires_grad_(False)
    with pytest.raises(PandaError, match="no trainable parameters"):
        param_groups(model, 0.1)


def test_optimizer_plugins_import_without_torch():
    code = ("import sys\n"
            "from panda.registry import registry\n"
            "for name in ['adamw', 'adamw8bit', 'adafactor', 'lion', 'nvlamb']:\n"
            "    registry.get('optimizer', name).Options()\n"
            "import panda.plugins.optimizers\n"
            "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes') if m in sys.modules]\n"
            "print(heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
