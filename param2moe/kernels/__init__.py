"""The network's hot operations. Each has a plain torch version (the test oracle, and the CPU path)
and, on CUDA devices, a Triton version; a `Kernels` object (one backend) picks one by the tensors' device.
Nothing GPU-only is imported until a CUDA tensor arrives. A quantized weight (quant.QuantizedWeight) goes
to quant/ops.py, which picks its kernels the same way."""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch

from ..mapped import RowPieces
from ..quant import ops as _quant
from ..quant.formats import QuantizedWeight
from . import attention as _attention
from . import cpu as _cpu
from . import embedding as _embedding
from . import lora as _lora
from . import moe as _moe
from . import norm as _norm
from . import rope as _rope
from . import routing as _routing
from .attention import causal_attention
from .cpu import layer as _cpu_layer
from .matmul import linear as _linear
from .moe import silu_and_mul

_TRITON: dict = {}


def _tri(name: str):
    """The Triton module `kernels/triton/<name>.py`, imported on first use (None when triton is missing)."""
    mod = _TRITON.get(name, False)
    if mod is False:
        try:
            mod = importlib.import_module(f"{__name__}.triton.{name}")
        except ImportError:
            mod = None
        _TRITON[name] = mod
    return mod


def triton_available(name: str) -> bool:
    return _tri(name) is not None


class ExpertOutputs(NamedTuple):
    """A MoE layer's output not yet summed over each token's experts: `add_rms_norm` (the next layer's
    input norm, or the final norm) sums it in its own launch, one launch fewer a layer on CUDA."""

    pair_out: torch.Tensor  # [T*K, H]: (token t, k) at row t*K + k; rows whose id is -1 undefined
    weights: torch.Tensor  # [T, K] float32
    ids: torch.Tensor  # [T, K]; -1: no expert


_FP32_OUT_MM = {"ok": True}  # whether torch.mm takes out_dtype here
_ONE_PAIR: dict = {}  # device -> (weight 1, expert 0) of a dense MLP run as one expert


def _one_expert(w):
    """A matrix [N, K] as a stack of one [1, N, K]."""
    return w.as_stack() if isinstance(w, RowPieces) else w[None]


def _one_pair(device):
    """(weights [[1.0]], ids [[0]]) on a CUDA device: made on the first (eager) call, before any graph capture."""
    one = _ONE_PAIR.get(device)
    if one is None:
        one = _ONE_PAIR[device] = (torch.ones(1, 1, device=device), torch.zeros(1, 1, dtype=torch.long, device=device))
    return one
# (token, expert) pairs up to which CPU MoE layers run the native kernel; prefill sizes keep moe_experts_cpu
# (oneDNN matmuls per expert).
_NATIVE_MOE_UP_TO = 1024
# Rows up to which CPU linear layers (and MLPs, and the head) run the native tiles (cpu/moe_decode.c) instead of
# oneDNN: one or two tokens, where oneDNN's ~30 us a call is most of the time; from 4 rows its AMX matmul wins.
_NATIVE_LINEAR_UP_TO = 2


BACKENDS = ("auto", "torch")


class Kernels:
    """The hot ops of one backend. "auto": Triton kernels for CUDA tensors, the native C kernels for CPU decodes,
    plain torch otherwise; "torch": plain torch everywhere (the benchmarks' baseline, and differentiable). The
    engine makes one and hands it to the model, the sampler and the CUDA graphs; the module-level functions
    below are those of "auto" (tests, the reference forward)."""

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"kernels={backend!r}: expected one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.native = backend == "auto"  # the Triton and native CPU kernels may run

    def __repr__(self) -> str:
        return f"Kernels({self.backend!r})"

    def use_triton(self, x) -> bool:
        return self.native and x.is_cuda

    def _pick(self, x, name: str):
        return _tri(name) if self.native and x.is_cuda else None

    def _cpu(self, x) -> bool:
        """Whether the native CPU kernels (kernels/cpu) may take this op: a CPU tensor, backend "auto"."""
        return self.native and x.device.type == "cpu"

    def _cpu_small(self, x) -> bool:
        return self._cpu(x) and x.dim() == 2 and x.shape[0] <= _NATIVE_LINEAR_UP_TO

    causal_attention = staticmethod(causal_attention)
    silu_and_mul = staticmethod(silu_and_mul)

    def linear(self, x, weight, bias=None):
        """x @ weight.T + bias. Decode-sized CUDA batches with 16-bit weights: the Triton GEMV (gemv.py); one or
        two rows on the CPU: the native tiles."""
        if isinstance(weight, QuantizedWeight):
            return _quant.linear(x, weight, bias, native=self.native)
        if isinstance(weight, RowPieces):  # a weight left in the checkpoint's files in pieces
            return weight.linear(x, bias=bias, linear=self.linear)
        t = self._pick(x, "gemv")
        if t and t.usable(x, weight, bias):
            return t.gemv(x, weight)
        if self._cpu_small(x) and (y := _cpu.dense_linear(x, weight, bias)) is not None:
            return y
        return _linear(x, weight, bias)

    def logits(self, hidden, weight):
        """hidden @ weight.T in float32: the head (rounding logits to bf16 would turn near-ties into exact ties,
        steps of 1/16 at magnitude 8, and greedy choices would flip on rounding noise). Decode-sized CUDA batches
        with a 16-bit head: the Triton GEMV streaming the weight; else a CUDA matmul writing its float32
        accumulator (torch.mm out_dtype), or the matmul in the activation dtype, upcast."""
        if isinstance(weight, QuantizedWeight):
            return _quant.logits(hidden, weight, native=self.native)
        t = self._pick(hidden, "gemv")
        if t and t.streams(hidden, weight):
            return t.gemv(hidden, weight, out_dtype=torch.float32, block_n=t.STREAM_BLOCK_N)
        if hidden.is_cuda and hidden.dtype != torch.float32 and _FP32_OUT_MM["ok"]:
            try:
                return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):
                _FP32_OUT_MM["ok"] = False
        if self._cpu_small(hidden) and (y := _cpu.dense_linear(hidden, weight, out_dtype=torch.float32)) is not None:
            return y
        return _linear(hidden, weight).float()

    def mlp(self, x, gate_up, down, unsummed: bool = False):
        """down(silu(gate(x)) * up(x)), gate and up rows stacked in gate_up. One token on CUDA: the fused MoE's
        one-token GEMVs, the MLP as one expert of weight 1 (unsummed: as ExpertOutputs, which the next norm
        sums in its launch; elsewhere the result as always)."""
        if isinstance(gate_up, QuantizedWeight):
            if self.native and x.is_cuda and x.shape[0] == 1:
                one = _one_pair(x.device)
                y = _quant.mlp_one_token(x, gate_up, down, *one, unsummed=unsummed)
                if y is not None:
                    return ExpertOutputs(y, *one) if unsummed else y
            return _quant.mlp(x, gate_up, down, native=self.native)
        t = self._pick(x, "moe")
        if t and x.shape[0] == 1 and x.dtype == gate_up.dtype == down.dtype:
            one = _one_pair(x.device)
            y = t.moe_experts(x, gate_up[None], down[None], *one, unsummed=unsummed)
            return ExpertOutputs(y, *one) if unsummed else y
        if self._cpu_small(x) and x.dtype == gate_up.dtype == down.dtype:
            # the MLP as one expert of weight 1: one call
            one = _ONE_PAIR.get("cpu")
            if one is None:
                n = _NATIVE_LINEAR_UP_TO
                one = _ONE_PAIR["cpu"] = (torch.ones(n, 1), torch.zeros(n, 1, dtype=torch.int64))
            y = _cpu.moe_decode(x, _one_expert(gate_up), _one_expert(down), one[0][:x.shape[0]], one[1][:x.shape[0]])
            if y is not None:
                return y
        return self.linear(silu_and_mul(self.linear(x, gate_up)), down)

    def rms_norm(self, x, weight, eps: float):
        t = self._pick(x, "norm")
        if t:
            return t.rms_norm(x, weight, eps)
        if self._cpu(x) and (y := _cpu.add_rms_norm(x, None, weight, eps)) is not None:
            return y[0]
        return _norm.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps: float):
        """(rms_norm(x + residual), x + residual); x may be ExpertOutputs."""
        if isinstance(x, ExpertOutputs):
            t = self._pick(residual, "norm")
            fn = t.expert_sum_add_rms_norm if t else _norm.expert_sum_add_rms_norm
            return fn(*x, residual, weight, eps)
        t = self._pick(x, "norm")
        if t:
            return t.add_rms_norm(x, residual, weight, eps)
        if self._cpu(x) and (y := _cpu.add_rms_norm(x, residual, weight, eps)) is not None:
            return y
        return _norm.add_rms_norm(x, residual, weight, eps)

    def sum_experts(self, x):
        """A tensor for x (ExpertOutputs summed; a tensor as it is)."""
        if not isinstance(x, ExpertOutputs):
            return x
        t = self._pick(x.pair_out, "moe")
        if t:
            out = torch.empty(x.ids.shape[0], x.pair_out.shape[1], dtype=x.pair_out.dtype, device=x.pair_out.device)
            return t.combine(x.pair_out, x.weights, x.ids, out)
        return _norm.expert_sum(*x)

    def token_inputs(self, embedding, cos_table, sin_table, input_ids, positions, prev=None):
        """(embedding rows [T, H], RoPE cos [T, R], sin [T, R]) of the step's tokens at their positions; prev =
        (prev_index, prev_tokens): rows with prev_index >= 0 take their id from the previous step's sampled ids
        (still on the device). One launch on CUDA."""
        t = self._pick(embedding, "embedding")
        fn = t.token_inputs if t else _embedding.token_inputs
        return fn(embedding, cos_table, sin_table, input_ids, positions, prev)

    def argmax(self, logits, out=None):
        """Each row's index of its largest value [B] int64 (greedy sampling; ties: the lowest index), into out
        when given."""
        t = self._pick(logits, "sampling")
        if t:
            return t.argmax(logits, out)
        ids = logits.argmax(-1)
        return ids if out is None else out.copy_(ids)

    def apply_rope(self, x, cos, sin):
        t = self._pick(x, "norm")
        return t.apply_rope(x, cos, sin) if t else _rope.apply_rope(x, cos, sin)

    def qk_norm_rope(self, q, k, q_weight, k_weight, cos, sin, eps: float, kv_write=None):
        """Per-head RMSNorm of q and k (none when the weights are None), then RoPE, and with kv_write =
        (v, k_cache, v_cache, slot_mapping) the KV-cache write: one launch on CUDA."""
        t = self._pick(q, "norm")
        fn = t.qk_norm_rope if t else _rope.qk_norm_rope
        return fn(q, k, q_weight, k_weight, cos, sin, eps, kv_write)

    def route(self, logits, expert_bias, top_k: int, **kw):
        t = self._pick(logits, "routing")
        return t.route(logits, expert_bias, top_k, **kw) if t else _routing.route(logits, expert_bias, top_k, **kw)

    def gate_route(self, x, gate_weight, expert_bias, top_k: int, **kw):
        """Router logits (fp32) and routing; one launch for decode-sized CUDA batches, one native call on CPUs."""
        t = self._pick(x, "routing")
        if t:
            return t.gate_route(x, gate_weight, expert_bias, top_k, **kw)
        if self._cpu(x) and (y := _cpu.gate_route(x, gate_weight, expert_bias, top_k, **kw)) is not None:
            return y
        return _routing.gate_route(x, gate_weight, expert_bias, top_k, **kw)

    def add_rms_norm_gate_route(self, x, residual, norm_weight, eps: float, gate_weight, expert_bias, top_k: int,
                                experts_w13=None, choice=None, **kw):
        """(normed, residual', weights, ids, started): add_rms_norm, then the router on the normed rows (one
        launch for decode-sized CUDA batches). choice: (weights, ids) returned instead of the router's (the
        benchmarks' uniform routing; the router still runs). experts_w13: the stacked experts with the shared
        expert folded in (kw num_appended): on Hopper at one token their gate/up GEMM is launched behind the
        router, `started` (else None), for moe_experts to go on from."""
        if experts_w13 is not None and self.use_triton(x):
            gate_up = None  # bf16 experts: moe.py's; quantized ones: the quant module's, where it takes them
            if isinstance(experts_w13, QuantizedWeight):
                gate_up = _quant.gate_up_behind_router(x, experts_w13)
            if gate_up is not None or isinstance(experts_w13, torch.Tensor):
                return _tri("moe").add_rms_norm_gate_route_gate_up(x, residual, norm_weight, eps, gate_weight,
                                                                   expert_bias, top_k, experts_w13, choice,
                                                                   gate_up=gate_up, **kw)
        t = self._pick(x, "routing")
        if t:
            normed, residual, weights, ids = t.add_rms_norm_gate_route(x, residual, norm_weight, eps, gate_weight,
                                                                       expert_bias, top_k, **kw)
        else:  # the two steps (each native on CPUs where it can be)
            normed, residual = self.add_rms_norm(x, residual, norm_weight, eps)
            weights, ids = self.gate_route(normed, gate_weight, expert_bias, top_k, **kw)
        return (normed, residual, *(choice or (weights, ids)), None)

    def map_experts(self, ids, table, counts, num_physical: int, load=None, slots=None, padding_slot: int = -1,
                    local=None):
        """Logical expert ids -> physical replicas (expert load balancing), each pair's expert counted into load:
        see routing.map_experts. One launch on CUDA."""
        t = self._pick(ids, "routing")
        fn = t.map_experts if t else _routing.map_experts
        return fn(ids, table, counts, num_physical, load, slots, padding_slot, local)

    def moe_experts(self, x, w13, w2, weights, ids, unsummed: bool = False, started=None, lora=None,
                    num_appended: int = 0):
        """sum_k weights[t, k] * Expert_{ids[t, k]}(x[t]). unsummed: on CUDA, ExpertOutputs for the next
        norm to sum (elsewhere the sum, as always). started: add_rms_norm_gate_route's fifth result.
        lora: a lora.ExpertLoRA, each pair's expert adapted by its token's adapter (never over quantized
        experts: LoRASlots refuses their slots). num_appended: the folded shared expert's columns of ids
        (quantized experts' kernel starts them early)."""
        if lora is not None:
            t = self._pick(x, "lora")
            if t:
                y = t.moe_experts_lora(x, w13, w2, weights, ids, lora, unsummed=unsummed)
                return ExpertOutputs(y, weights, ids) if unsummed else y
            return _lora.moe_experts_lora(x, w13, w2, weights, ids, lora)
        if isinstance(w13, QuantizedWeight):
            kw = dict(native=self.native, num_appended=num_appended,
                      started=started.inter if started is not None else None)
            if unsummed and (y := _quant.moe_pairs(x, w13, w2, weights, ids, **kw)) is not None:
                return ExpertOutputs(y, weights, ids)
            return _quant.moe_experts(x, w13, w2, weights, ids, **kw)
        t = self._pick(x, "moe")
        if t:
            y = t.moe_experts(x, w13, w2, weights, ids, unsummed=unsummed, started=started)
            return ExpertOutputs(y, weights, ids) if unsummed else y
        if x.device.type != "cpu":
            return _moe.moe_experts(x, w13, w2, weights, ids)
        if ids.numel() <= _NATIVE_MOE_UP_TO and self.native:  # decode steps: the native kernel, one call
            y = _cpu.moe_decode(x, w13, w2, weights, ids)
            if y is not None:
                return y
        return _moe.moe_experts_cpu(x, w13, w2, weights, ids)

    def lora_rows(self, index, num_buckets: int):
        """How a batch's rows group by adapter for add_lora: index [M] int32, each row's bucket (-1: none).
        On CUDA device tensors and no host sync (capturable); elsewhere lists read on the host."""
        t = self._pick(index, "lora")
        return t.lora_rows(index, num_buckets) if t else _lora.rows_by_bucket(index)

    def add_lora(self, y, x, a, b, rows):
        """y += each row's LoRA delta (x @ a[i].T) @ b[i].T, in place (kernels/lora.py); rows: lora_rows(...)."""
        t = self._pick(x, "lora")
        return t.add_lora(y, x, a, b, rows) if t else _lora.add_lora(y, x, a, b, rows)

    def decode_layer(self, layer, h, residual, cos, sin, attn):
        """A decoder layer's forward (model/network.py DecoderLayer) for a CPU decode step in one native call
        (cpu/layer.py): (mlp_out, residual), or None where it does not apply (then the per-op forward runs)."""
        if isinstance(h, ExpertOutputs) or not (self.native and h.device.type == "cpu"):
            return None
        cache = getattr(attn, "decode_cache", None)
        kv = cache(layer.attention.layer_idx) if cache is not None else None
        lw = layer.native_weights() if kv is not None else None
        if lw is None:
            return None
        return _cpu_layer.decode_layer(layer, lw, h, residual, cos, sin, *kv)

    def paged_attention(self, q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale: float,
                        max_query_len: int, max_context_len: int, new_kv=None):
        """Attention over the paged cache. new_kv = (k, v, slot_mapping, q_weight, k_weight, cos, sin, eps): q
        and k arrive as projected; QK-norm + RoPE run first and the new k, v go to the cache at slot_mapping
        (on CUDA inside the attention's launch at decode with a split walk, else one launch before it)."""
        t = self._pick(q, "attention")
        if t:
            return t.paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale,
                                     max_query_len, max_context_len, new_kv=new_kv)
        cpu_decode = max_query_len == 1 and self._cpu(q)
        if cpu_decode and new_kv is not None:  # the C kernel (cpu/): QK-norm, RoPE, the cache write and attention
            k, v, slots, *norm_rope = new_kv
            out = _cpu.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len,
                                    (k, v, slots), norm_rope)
            if out is not None:  # None: off (P2M_CPU_NATIVE=0), no compiler, or inputs it does not take
                return out
        kv = None
        if new_kv is not None:
            k, v, slots, q_weight, k_weight, cos, sin, eps = new_kv
            q, k = _rope.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
            kv = (k, v, slots)
        if cpu_decode:
            out = _cpu.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len, kv)
            if out is not None:
                return out
        if kv is not None:
            _attention.write_kv_cache(kv[0], kv[1], k_cache, v_cache, kv[2])
        return _attention.paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale,
                                          max_query_len, max_context_len)


AUTO = Kernels("auto")
linear = AUTO.linear
logits = AUTO.logits
mlp = AUTO.mlp
rms_norm = AUTO.rms_norm
add_rms_norm = AUTO.add_rms_norm
sum_experts = AUTO.sum_experts
token_inputs = AUTO.token_inputs
argmax = AUTO.argmax
apply_rope = AUTO.apply_rope
qk_norm_rope = AUTO.qk_norm_rope
route = AUTO.route
gate_route = AUTO.gate_route
add_rms_norm_gate_route = AUTO.add_rms_norm_gate_route
map_experts = AUTO.map_experts
moe_experts = AUTO.moe_experts
paged_attention = AUTO.paged_attention


__all__ = [
    "AUTO", "BACKENDS", "ExpertOutputs", "Kernels", "add_rms_norm", "add_rms_norm_gate_route", "apply_rope",
    "argmax", "causal_attention", "gate_route", "linear", "logits", "map_experts", "mlp", "moe_experts",
    "paged_attention", "qk_norm_rope", "rms_norm", "route", "silu_and_mul", "sum_experts", "token_inputs",
    "triton_available"]
