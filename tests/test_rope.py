"""Rotary embedding against an independent implementation written here from docs/model.md §3.2 and the usual
definitions of the scaling types (the ones Hugging Face's rope utilities implement), in plain Python
floats: the cos/sin tables, the rotation the network applies to q and k (partial rotary included),
and relative-position invariance of the attention scores. Also against values that depend on no
implementation (golden numbers written out from math) and against transformers' rope utilities
(skipped when transformers is not installed)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from param2moe import kernels as ops
from param2moe.checkpoint import load_model
from param2moe.config import Param2MoEConfig
from param2moe.kernels import apply_rope
from param2moe.model.attention import CausalAttention
from param2moe.model.network import Attention
from param2moe.model.rope import rope_cos_sin, rope_inv_freq
from param2moe.model.shard import Shard
from param2moe.writer import parse_overrides, preset_config, write_checkpoint


# ------------------------------------------------------------------------------------ the reference
def ref_inv_freq(r: int, theta: float, scaling: dict | None = None, max_pos: int = 2048) -> tuple[list, float]:
    """(inv_freq [r/2] as Python floats, attention factor), from the definitions of each type."""
    inv = [theta ** (-2 * j / r) for j in range(r // 2)]
    if not scaling:
        return inv, 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return inv, 1.0
    factor = scaling["factor"]
    if kind == "linear":  # positions divided by factor == inv_freq divided by factor
        return [f / factor for f in inv], 1.0
    if kind == "dynamic":
        # NTK-aware base, fixed once for a context of max_pos * factor (rope.py's documented choice):
        # base' = base * (factor * L / max_pos - (factor - 1)) ** (r / (r - 2)), L = max_pos * factor.
        big_l = max_pos * factor
        new_base = theta * (factor * big_l / max_pos - (factor - 1)) ** (r / (r - 2))
        return [new_base ** (-2 * j / r) for j in range(r // 2)], 1.0
    if kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old / high:  # high frequencies: unchanged
                out.append(f)
            elif wavelen > old / low:  # low frequencies: interpolated by factor
                out.append(f / factor)
            else:  # the band between: a smooth mix
                s = (old / wavelen - low) / (high - low)
                out.append((1 - s) * f / factor + s * f)
        return out, 1.0
    if kind == "yarn":
        old = scaling.get("original_max_position_embeddings") or max_pos
        beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

        def dim_of(rotations):  # the dim whose wavelength makes `rotations` turns over `old` tokens
            return r * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), r - 1)
        out = []
        for j, f in enumerate(inv):
            ramp = min(max((j - lo) / (hi - lo), 0.0), 1.0)  # 0: extrapolate (keep), 1: interpolate
            out.append(f * (1 - ramp) + (f / factor) * ramp)
        attn = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0)
        return out, attn
    raise AssertionError(kind)


def ref_cos_sin(r, theta, positions, scaling=None, max_pos=2048):
    inv, attn = ref_inv_freq(r, theta, scaling, max_pos)
    ang = torch.tensor([[p * f for f in inv] for p in positions], dtype=torch.float64)
    return ang.cos() * attn, ang.sin() * attn


def ref_rotate(x: torch.Tensor, positions, r, theta, scaling=None, max_pos=2048) -> torch.Tensor:
    """NeoX rotate-half on the first r dims of each head of x [T, heads, D]; the rest unchanged."""
    cos, sin = ref_cos_sin(r, theta, positions, scaling, max_pos)
    out = x.double().clone()
    half = r // 2
    for t in range(x.shape[0]):
        for j in range(half):
            a, b = x[t, :, j].double(), x[t, :, j + half].double()
            out[t, :, j] = a * cos[t, j] - b * sin[t, j]
            out[t, :, j + half] = b * cos[t, j] + a * sin[t, j]
    return out


def cfg_with(rope_theta=10000.0, scaling=None, head_dim=32, partial=1.0, max_pos=2048) -> Param2MoEConfig:
    return Param2MoEConfig.from_dict(dict(
        model_type="param2moe", vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, intermediate_size=64, rope_theta=rope_theta,
        rope_scaling=scaling, partial_rotary_factor=partial, max_position_embeddings=max_pos))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 1024}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
        "beta_fast": 32, "beta_slow": 1}
SCALINGS = {
    "none": None,
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "linear-legacy-key": {"type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": LLAMA3,
    "yarn": YARN,
    "yarn-defaults": {"rope_type": "yarn", "factor": 4.0},  # beta 32 / 1, old context = max_position_embeddings
    "yarn-attention-factor": dict(YARN, attention_factor=1.25),
}
POSITIONS = [0, 1, 2, 3, 7, 100, 511, 1000, 2047, 4095]


# ------------------------------------------------------------------------------------ the tables
@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_cos_sin_tables_match_the_definitions(name, theta):
    scaling = SCALINGS[name]
    cfg = cfg_with(theta, scaling)
    cos, sin = rope_cos_sin(cfg, 4096)
    assert cos.shape == sin.shape == (4096, 16) and cos.dtype == torch.float32
    ref_cos, ref_sin = ref_cos_sin(32, theta, POSITIONS, scaling)
    torch.testing.assert_close(cos[POSITIONS].double(), ref_cos, atol=2e-7, rtol=0)
    torch.testing.assert_close(sin[POSITIONS].double(), ref_sin, atol=2e-7, rtol=0)


def test_the_reference_bands_are_all_exercised():
    """Guard for the test above: the llama3 and yarn settings hit every branch of their definitions."""
    inv = [1e4 ** (-2 * j / 32) for j in range(16)]
    wl = [2 * math.pi / f for f in inv]
    assert any(w < 1024 / 4 for w in wl) and any(w > 1024 for w in wl) and any(256 <= w <= 1024 for w in wl)
    scaled, attn = ref_inv_freq(32, 1e4, YARN)
    ratios = [s / f for s, f in zip(scaled, inv)]
    assert ratios[0] == 1.0 and ratios[-1] == 0.25 and any(0.25 < x < 1.0 for x in ratios)
    assert attn == pytest.approx(0.1 * math.log(4) + 1)


def test_linear_scaling_is_position_over_factor():
    cos, sin = rope_cos_sin(cfg_with(scaling={"rope_type": "linear", "factor": 4.0}), 401)
    cos0, sin0 = rope_cos_sin(cfg_with(), 101)
    torch.testing.assert_close(cos[::4], cos0, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[::4], sin0, atol=1e-6, rtol=0)


def test_yarn_attention_factor_scales_cos_and_sin():
    cos, sin = rope_cos_sin(cfg_with(scaling=YARN), 50)
    m = 0.1 * math.log(4.0) + 1
    torch.testing.assert_close(cos[0], torch.full((16,), m, dtype=torch.float32))  # angle 0
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, m * m))


def test_dynamic_base_is_fixed_whatever_the_table_length():
    cfg = cfg_with(scaling={"rope_type": "dynamic", "factor": 2.0})
    short, _ = rope_cos_sin(cfg, 64)
    long, _ = rope_cos_sin(cfg, 8192)
    torch.testing.assert_close(short, long[:64], atol=0, rtol=0)
    # and it is not the unscaled table
    plain, _ = rope_cos_sin(cfg_with(), 64)
    assert (short - plain).abs().max() > 1e-3


@pytest.mark.parametrize("partial, theta", [(1.0, 1e4), (0.5, 1e6), (0.25, 1e6)])
def test_partial_rotary_uses_rotary_dim_for_the_frequencies(partial, theta):
    cfg = cfg_with(theta, head_dim=64, partial=partial)
    r = int(64 * partial)
    cos, sin = rope_cos_sin(cfg, 3000)
    assert cos.shape == (3000, r // 2)
    ref_cos, ref_sin = ref_cos_sin(r, theta, POSITIONS[:-1])
    torch.testing.assert_close(cos[POSITIONS[:-1]].double(), ref_cos, atol=2e-7, rtol=0)
    torch.testing.assert_close(sin[POSITIONS[:-1]].double(), ref_sin, atol=2e-7, rtol=0)


# ------------------------------------------------------------------------------------ golden values
# Written out once with Python's math module, so these checks depend on no implementation at all:
# angle = position * theta ** (-2 j / r); theta 1e6, r 64 (head_dim 64, full rotary).
GOLDEN = [  # (position, j, cos(angle), sin(angle))
    (1, 0, 0.5403023058681398, 0.8414709848078965),  # angle 1
    (1, 1, 0.7964578744859591, 0.6046940169782634),  # angle 1e6 ** (-1/32)
    (1, 8, 0.9995000416652778, 0.03161750640243371),  # angle 1e6 ** (-1/4)
    (1, 31, 0.9999999999988143, 1.5399265260588833e-06),  # angle 1e6 ** (-31/32)
    (100, 0, 0.8623188722876839, -0.5063656411097588),  # angle 100
    (100, 1, -0.5102829429002417, 0.8600065803149816),
    (100, 8, -0.9997860728793259, -0.020683531529582043),
    (100, 31, 0.9999999881431315, 0.00015399265199732563),
]


@pytest.mark.parametrize("pos, j, cos_ref, sin_ref", GOLDEN)
def test_golden_values_theta_1e6_r64(pos, j, cos_ref, sin_ref):
    cos, sin = rope_cos_sin(cfg_with(1e6, head_dim=64), 101)
    assert cos.shape == (101, 32)
    assert cos[pos, j].item() == pytest.approx(cos_ref, abs=1e-7)
    assert sin[pos, j].item() == pytest.approx(sin_ref, abs=1e-7)


def test_golden_values_linear_and_yarn():
    # linear, factor 4: position 100, j 0 has angle 100 / 4 = 25; cos(25), sin(25)
    cos, sin = rope_cos_sin(cfg_with(1e6, {"rope_type": "linear", "factor": 4.0}, head_dim=64), 101)
    assert (cos[100, 0].item(), sin[100, 0].item()) == pytest.approx((0.9912028118634736, -0.13235175009777303),
                                                                     abs=1e-7)
    # yarn, factor 4: cos and sin scaled by 0.1 * ln(4) + 1; at position 0, cos = that factor
    cos, _ = rope_cos_sin(cfg_with(scaling=YARN), 1)
    assert cos[0].tolist() == pytest.approx([1.138629436111989] * 16, abs=1e-6)


# ------------------------------------------------------------------------------------ Hugging Face
# transformers' rope utilities (ROPE_INIT_FUNCTIONS), an implementation written by others, give inv_freq and
# the attention factor from a config object. Their `dynamic` type recomputes the base for the current sequence
# length; ours fixes it for max_position_embeddings * factor (see rope.py), so that is the length passed.
HF_MAX_POS = 4096  # yarn's original context 1024 * factor 4, so transformers sees a consistent config
HF_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": LLAMA3,
    "yarn": YARN,
    "yarn-attention-factor": dict(YARN, attention_factor=1.25),
}


def hf_inv_freq(scaling, theta, head_dim, partial):
    """(inv_freq float64, attention factor) from transformers, for a Llama config with these RoPE settings."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default" and "default" not in ROPE_INIT_FUNCTIONS:
        # transformers 5 moved `default` into each model, and Llama's ignores partial_rotary_factor;
        # its `linear` type with factor 1 is the same definition and honours it
        kind, scaling = "linear", {"rope_type": "linear", "factor": 1.0}
    hf = transformers.LlamaConfig(vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=head_dim, max_position_embeddings=HF_MAX_POS, rope_theta=theta,
                                  rope_scaling=dict(scaling) if scaling else None, partial_rotary_factor=partial)
    init = ROPE_INIT_FUNCTIONS[kind]
    seq_len = int(HF_MAX_POS * scaling["factor"]) if kind == "dynamic" else None
    inv_freq, attention_factor = init(hf, device="cpu", seq_len=seq_len)
    return inv_freq.double(), float(attention_factor)


@pytest.mark.parametrize("name", list(HF_CASES))
@pytest.mark.parametrize("theta, head_dim, partial", [(1e4, 32, 1.0), (1e6, 64, 0.5)])
def test_tables_match_transformers_rope_utils(name, theta, head_dim, partial):
    scaling = HF_CASES[name]
    ref_inv, ref_attn = hf_inv_freq(scaling, theta, head_dim, partial)
    cfg = cfg_with(theta, scaling, head_dim=head_dim, partial=partial, max_pos=HF_MAX_POS)
    inv, attn = rope_inv_freq(cfg)
    torch.testing.assert_close(inv, ref_inv, rtol=1e-6, atol=0)  # transformers computes in float32
    assert attn == pytest.approx(ref_attn, rel=1e-12)
    cos, sin = rope_cos_sin(cfg, 4096)
    positions = torch.tensor(POSITIONS, dtype=torch.float64)
    angles = positions[:, None] * ref_inv
    # float32 inv_freq (relative error ~6e-8) times position 4095 moves an angle by up to ~3e-4
    torch.testing.assert_close(cos[POSITIONS].double(), angles.cos() * ref_attn, atol=5e-4, rtol=0)
    torch.testing.assert_close(sin[POSITIONS].double(), angles.sin() * ref_attn, atol=5e-4, rtol=0)
    near = positions <= 7  # where float32 rounding cannot hide a real difference
    torch.testing.assert_close(cos[POSITIONS].double()[near], (angles.cos() * ref_attn)[near], atol=2e-6, rtol=0)
    torch.testing.assert_close(sin[POSITIONS].double()[near], (angles.sin() * ref_attn)[near], atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------ the rotation
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_apply_rope_rotates_only_the_first_r_dims(partial):
    torch.manual_seed(0)
    theta, d = 1e6, 32
    r = int(d * partial)
    cfg = cfg_with(theta, head_dim=d, partial=partial)
    positions = [0, 5, 17, 300, 2000]
    x = torch.randn(len(positions), 3, d)
    cos, sin = rope_cos_sin(cfg, 2048)
    y = apply_rope(x, cos[positions], sin[positions])
    torch.testing.assert_close(y.double(), ref_rotate(x, positions, r, theta), atol=1e-5, rtol=0)
    assert torch.equal(y[..., r:], x[..., r:])  # pass-through, bit for bit
    assert (y[1:, :, :r] - x[1:, :, :r]).abs().max() > 1e-2  # and the rest did rotate


@pytest.mark.parametrize("name", ["none", "linear", "dynamic", "llama3", "yarn"])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_scores_depend_only_on_the_position_difference(name, partial):
    torch.manual_seed(1)
    cfg = cfg_with(1e6 if partial < 1 else 1e4, SCALINGS[name], head_dim=32, partial=partial)
    cos, sin = rope_cos_sin(cfg, 4096)
    q, k = torch.randn(1, 4, 32), torch.randn(1, 4, 32)

    def score(m, n):
        qm = apply_rope(q, cos[[m]], sin[[m]])
        kn = apply_rope(k, cos[[n]], sin[[n]])
        return (qm * kn).sum(-1)

    base = score(7, 3)
    for m, n in [(8, 4), (107, 103), (1003, 999), (3000, 2996)]:
        torch.testing.assert_close(score(m, n), base, atol=2e-4, rtol=2e-4)
    assert (score(7, 1) - base).abs().max() > 1e-3  # another difference gives another score


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


class _Recorder(CausalAttention):
    """CausalAttention that keeps each layer's q, k, v as the network hands them over."""

    def __init__(self, seq_lens):
        super().__init__(seq_lens)
        self.seen = {}

    def attend(self, layer, q, k, v, scale, norm_rope):
        qn, kn = ops.qk_norm_rope(q, k, *norm_rope)  # what the attention computes from the projections
        self.seen[layer] = (qn.clone(), kn.clone(), v.clone())
        return super().attend(layer, q, k, v, scale, norm_rope)


def test_attention_module_rotates_q_and_k_partially():
    """Call one Attention module directly: fused contiguous QKV rows, QK-norm, then partial RoPE."""
    torch.manual_seed(2)
    cfg = cfg_with(1e6, head_dim=32, partial=0.5)
    cfg.use_qk_norm = True
    att = Attention(cfg, 0, Shard(), torch.float32)
    with torch.no_grad():
        att.query_key_value.weight.normal_(0, 0.2)
        att.dense.weight.normal_(0, 0.1)
        att.query_layernorm.weight.uniform_(0.5, 1.5)
        att.key_layernorm.weight.uniform_(0.5, 1.5)
    positions = [0, 1, 2, 3, 4, 5, 6]
    x = torch.randn(len(positions), 128)
    cos, sin = rope_cos_sin(cfg, 64)
    rec = _Recorder([len(positions)])
    with torch.no_grad():
        att(x, cos[positions], sin[positions], rec)
    q, k, v = rec.seen[0]
    w = att.query_key_value.weight.detach()
    q0 = (x @ w[:4 * 32].T).view(-1, 4, 32)
    k0 = (x @ w[4 * 32:6 * 32].T).view(-1, 2, 32)
    v0 = (x @ w[6 * 32:].T).view(-1, 2, 32)
    q0 = _rms(q0, att.query_layernorm.weight.detach(), cfg.rms_norm_eps)
    k0 = _rms(k0, att.key_layernorm.weight.detach(), cfg.rms_norm_eps)
    torch.testing.assert_close(q.double(), ref_rotate(q0, positions, 16, 1e6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.double(), ref_rotate(k0, positions, 16, 1e6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, v0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q[..., 16:], q0[..., 16:], atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def partial_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("partial-rope")
    cfg = preset_config("tiny", parse_overrides(["partial_rotary_factor=0.5", "rope_theta=1e6"]))
    assert cfg.partial_rotary_factor == 0.5 and cfg.rope_theta == 1e6 and cfg.rotary_dim == 16
    write_checkpoint(str(out), cfg, seed=3)
    model = load_model(str(out), dtype=torch.float32, progress=False)
    return model, load_file(str(out / "model.safetensors"))


def test_full_model_first_layer_q_k_with_partial_rotary(partial_model):
    """A tiny checkpoint with partial_rotary_factor 0.5 and theta 1e6: the first attention layer's
    rotated q and k equal the formula applied to tensors read straight from the file."""
    model, tensors = partial_model
    cfg = model.config
    nh, nkv, d = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_size
    ids = torch.tensor([5, 77, 300, 12, 9, 401, 250, 33, 100, 2])
    positions = list(range(len(ids)))
    rec = _Recorder([len(ids)])
    with torch.no_grad():
        model(ids, torch.tensor(positions), rec)
    q, k, _ = rec.seen[0]

    p = "model.layers.0."
    x = tensors["model.word_embeddings.weight"][ids].double()
    x = _rms(x, tensors[p + "input_layernorm.weight"].double(), cfg.rms_norm_eps)
    w = tensors[p + "attention.query_key_value.weight"].double()
    q0 = (x @ w[:nh * d].T).view(-1, nh, d)
    k0 = (x @ w[nh * d:(nh + nkv) * d].T).view(-1, nkv, d)
    q0 = _rms(q0, tensors[p + "attention.query_layernorm.weight"].double(), cfg.rms_norm_eps)
    k0 = _rms(k0, tensors[p + "attention.key_layernorm.weight"].double(), cfg.rms_norm_eps)
    ref_q, ref_k = ref_rotate(q0, positions, 16, 1e6), ref_rotate(k0, positions, 16, 1e6)
    torch.testing.assert_close(q.double(), ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.double(), ref_k, atol=1e-5, rtol=1e-5)
    # dims 16..31 of every head are the QK-normed projections, unrotated
    torch.testing.assert_close(q[..., 16:].double(), q0[..., 16:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k[..., 16:].double(), k0[..., 16:], atol=1e-5, rtol=1e-5)
    assert (q[1:, :, :16].double() - q0[1:, :, :16]).abs().max() > 1e-2


def test_full_model_is_invariant_to_a_shift_of_all_positions(partial_model):
    """Scores depend only on position differences, so shifting every position changes no logit."""
    model, _ = partial_model
    ids = torch.tensor([5, 77, 300, 12, 9, 401, 250, 33])
    n = len(ids)
    with torch.no_grad():
        out0 = model.compute_logits(model(ids, torch.arange(n), CausalAttention([n])))
        out1 = model.compute_logits(model(ids, torch.arange(n) + 1000, CausalAttention([n])))
        scrambled = model.compute_logits(model(ids, torch.arange(n).flip(0), CausalAttention([n])))
    torch.testing.assert_close(out1, out0, atol=2e-4, rtol=2e-4)
    assert (scrambled - out0).abs().max() > 1e-2  # positions do matter
