"""The Param2MoE network (docs/model.md §3) in plain PyTorch.

Tokens are flattened: every forward takes input_ids [T] and positions [T] of one or more sequences
packed back to back, and an attention object that knows how those tokens group into sequences and
where their keys and values live (see `attention.py`). Module names follow the Hugging Face
checkpoint so that the name map in `checkpoint.py` stays short; what differs is fused for speed:
gate and up projections in one matrix, routed experts stacked per layer ([E, ...] tensors).

Quantization: a `QuantPlan` (quant/plan.py) says which weight matrices are held as QuantizedWeights (the
kernels' linear, mlp, moe_experts and logits take either); the router, norms and embeddings never are.

Tensor parallelism: a `Shard` tells each module which slice of heads, widths, experts and vocabulary
this rank holds, and where the partial sums are reduced. With one rank every reduction is a no-op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Param2MoEConfig
from ..kernels import AUTO, Kernels
from ..kernels.cpu.layer import LayerWeights
from ..kernels.embedding import resolve_ids
from ..kernels.routing import append_experts
from ..quant import layout as qlayout
from ..quant.formats import QuantFormatError
from .native_layer import native_weights
from .rope import rope_cos_sin
from .shard import Shard


def _param(*shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _matrix(quant, modules: list[str], *shape, dtype):
    """A weight matrix (or stack of them): a QuantizedWeight where the plan quantizes the checkpoint modules
    it is loaded from, else a parameter of the model's dtype."""
    if quant is not None and quant.quantizes(modules):
        return quant.empty(shape, modules[0])
    return _param(*shape, dtype=dtype)


def _as_param(w):
    return nn.Parameter(w, requires_grad=False) if isinstance(w, torch.Tensor) else w


class RMSNorm(nn.Module):
    ops: Kernels = AUTO  # the engine's backend: Param2MoEForCausalLM.use_kernels

    def __init__(self, size: int, eps: float, dtype):
        super().__init__()
        self.weight = _param(size, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    """GQA attention with a fused QKV projection, optional QK-norm, partial RoPE (docs/model.md §3.2)."""

    ops: Kernels = AUTO

    def __init__(self, cfg: Param2MoEConfig, layer_idx: int, shard: Shard, dtype, quant=None):
        super().__init__()
        self.layer_idx, self.shard = layer_idx, shard
        d, h = cfg.head_size, cfg.hidden_size
        self.num_heads = cfg.num_attention_heads // shard.tp_size
        self.num_kv_heads = shard.local_kv_heads(cfg.num_kv_heads)
        self.head_dim, self.scale = d, d**-0.5
        p = f"model.layers.{layer_idx}.attention."
        self.query_key_value = nn.Module()
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * d
        self.query_key_value.weight = _matrix(quant, [p + "query_key_value"], qkv_rows, h, dtype=dtype)
        self.query_key_value.bias = _param(qkv_rows, dtype=dtype) if cfg.use_qkv_bias else None
        self.dense = nn.Module()
        self.dense.weight = _matrix(quant, [p + "dense"], h, self.num_heads * d, dtype=dtype)
        self.dense.bias = _param(h, dtype=dtype) if cfg.use_bias else None
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
            self.key_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        else:
            self.query_layernorm = self.key_layernorm = None
        self.lora_qkv = self.lora_dense = None  # LoRA hooks (param2moe/lora/slots.py): y = hook.add(x, y)

    def forward(self, x, cos, sin, attn) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        qkv = self.ops.linear(x, self.query_key_value.weight, self.query_key_value.bias)
        if self.lora_qkv is not None:
            qkv = self.lora_qkv.add(x, qkv)
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        q, k, v = q.reshape(t, self.num_heads, d), k.reshape(t, self.num_kv_heads, d), v.reshape(t, -1, d)
        # QK-norm (when the checkpoint has it) and RoPE run inside the attention (with the KV-cache write,
        # fused on CUDA): it takes q and k as projected.
        qn, kn = self.query_layernorm, self.key_layernorm
        norm_rope = (None if qn is None else qn.weight, None if kn is None else kn.weight, cos, sin,
                     0.0 if qn is None else qn.eps)
        o = attn.attend(self.layer_idx, q, k, v, self.scale, norm_rope)
        # Each rank holds a slice of the heads: partial sums, reduced; the bias is added by one rank.
        bias = self.dense.bias if self.shard.tp_rank == 0 else None
        o = o.reshape(t, -1)
        y = self.ops.linear(o, self.dense.weight, bias)
        if self.lora_dense is not None:
            y = self.lora_dense.add(o, y)
        return self.shard.all_reduce(y)


class MLP(nn.Module):
    """SwiGLU `down(silu(gate(x)) * up(x))` with gate and up fused in one matrix (docs/model.md §3.3)."""

    ops: Kernels = AUTO

    def __init__(self, hidden: int, width: int, dtype, quant=None, prefix: str = ""):
        super().__init__()
        # gate rows, then up rows
        self.gate_up_proj = _matrix(quant, [prefix + "gate_proj", prefix + "up_proj"], 2 * width, hidden, dtype=dtype)
        self.down_proj = _matrix(quant, [prefix + "down_proj"], hidden, width, dtype=dtype)
        self.lora_gate_up = self.lora_down = None  # LoRA hooks (param2moe/lora/slots.py)

    def forward(self, x: torch.Tensor, unsummed: bool = False) -> torch.Tensor:
        """The partial output of this rank's slice of the width (reduced by the caller); unsummed: see ops.mlp."""
        if self.lora_gate_up is None:
            return self.ops.mlp(x, self.gate_up_proj, self.down_proj, unsummed=unsummed)
        gate_up = self.lora_gate_up.add(x, self.ops.linear(x, self.gate_up_proj))
        act = self.ops.silu_and_mul(gate_up)
        return self.lora_down.add(act, self.ops.linear(act, self.down_proj))


class MoE(nn.Module):
    """Router, routed experts stacked into [E, ...] tensors, and the shared expert (docs/model.md §3.4)."""

    ops: Kernels = AUTO

    def __init__(self, cfg: Param2MoEConfig, shard: Shard, dtype, quant=None, prefix: str = ""):
        super().__init__()
        self.cfg, self.shard = cfg, shard
        e, h = cfg.num_experts, cfg.hidden_size
        self.expert_start, self.expert_end = shard.local_experts(e)  # physical slots (eplb: replicas too)
        # the logical expert in each of this rank's slots: the checkpoint's experts.{j} that fills it
        self.slot_experts = [p % e for p in range(self.expert_start, self.expert_end)]
        self.expert_map = None  # expert load balancing (param2moe/eplb): logical ids -> this rank's slots
        width = shard.local_expert_width(cfg.moe_intermediate_size)
        # Routing runs in fp32 whatever the checkpoint stores (router_dtype fp32).
        self.gate = nn.Module()
        self.gate.weight = _param(e, h, dtype=torch.float32)
        self.gate.expert_bias = _param(e, dtype=torch.float32) if cfg.moe_router_enable_expert_bias else None
        n_local = self.expert_end - self.expert_start
        experts = [f"{prefix}experts.{j}." for j in self.slot_experts]
        self.w13 = _matrix(quant, [e + p for e in experts for p in ("gate_proj", "up_proj")], n_local, 2 * width, h,
                           dtype=dtype)
        self.w2 = _matrix(quant, [e + "down_proj" for e in experts], n_local, h, width, dtype=dtype)
        shared = cfg.shared_expert_intermediate_size
        self.shared_experts = MLP(h, shared // shard.tp_size, dtype, quant, prefix + "shared_experts.") \
            if shared else None
        self.random_choice = None  # (weights, ids) replacing the router's choice this step (benchmarks)
        self.num_folded_shared = 0  # shared-expert pieces appended to w13/w2 (fold_shared_experts)
        self.lora_experts = None  # LoRA on the routed experts (param2moe/lora/slots.py)

    def fold_shared_experts(self) -> bool:
        """Append the shared expert to the stacked routed experts, cut into pieces of an expert's width
        (SwiGLU works channel by channel, so the pieces' outputs sum to the whole), each taken by every
        token with weight 1: the fused MoE kernel then does the shared expert in the same launches
        instead of four more (Param2: 2 pieces of 2048 beside 64 experts of 2048). One rank's slices
        with TP; not with EP (the shared expert is not partitioned by expert). Quantized weights fold alike
        (their codes and scales move with the rows), where the pieces fall on the scales' boundaries and
        the shared expert is held as the routed experts are."""
        s, width = self.shared_experts, self.w2.shape[2]
        if s is None or self.shard.ep_size > 1 or s.down_proj.shape[1] % width:
            return False
        n, total = s.down_proj.shape[1] // width, s.down_proj.shape[1]
        gate_up, down = s.gate_up_proj, s.down_proj
        cut = [slice(i * width, (i + 1) * width) for i in range(n)]
        try:
            w13 = qlayout.stack([qlayout.cat([gate_up[c], gate_up[total + c.start:total + c.stop]], dim=-2)
                                 for c in cut])
            w2 = qlayout.stack([down[:, c] for c in cut])
            w13, w2 = qlayout.cat([self.w13, w13], dim=0), qlayout.cat([self.w2, w2], dim=0)
        except QuantFormatError:  # held differently, or pieces that cut through the scales' blocks
            return False
        self.w13, self.w2 = _as_param(w13), _as_param(w2)
        self.shared_experts, self.num_folded_shared = None, n
        return True

    def _routing_options(self) -> dict:
        c = self.cfg
        return dict(score_function=c.score_function, n_group=c.n_group, topk_group=c.topk_group,
                    norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor,
                    num_appended=self.num_folded_shared)

    def route(self, x: torch.Tensor):
        """The router's (weights, ids) for normed rows x, the folded shared expert's pieces appended."""
        return self.ops.gate_route(x, self.gate.weight, self.gate.expert_bias, self.cfg.num_experts_per_tok,
                              **self._routing_options())

    def forward(self, a: torch.Tensor, residual: torch.Tensor, norm: RMSNorm):
        """The post-attention norm and this block: a is the attention output; returns (y, residual') with
        residual' = a + residual. The norm runs in the router's launch (decode sizes, CUDA), and with one
        rank y comes back unsummed over each token's experts (ops.ExpertOutputs): the next norm sums it."""
        single = self.shard.tp_size == 1 and self.shard.ep_size == 1 and self.shared_experts is None
        # Benchmarks with random weights (docs/model.md §7): the router still runs, as it would in a real model, but
        # uniformly random experts replace its choice (Param2MoEForCausalLM.set_uniform_random_routing).
        # One rank with the shared expert folded in: at one token the experts' gate/up may start behind the
        # router (`started`).
        # (Not with EPLB: the experts started behind the router would read its logical ids.)
        early = single and self.num_folded_shared and self.expert_map is None
        x, residual, weights, ids, started = self.ops.add_rms_norm_gate_route(
            a, residual, norm.weight, norm.eps, self.gate.weight, self.gate.expert_bias, self.cfg.num_experts_per_tok,
            experts_w13=self.w13 if early else None, choice=self.random_choice, **self._routing_options())
        if self.expert_map is not None:  # each token's experts to one replica each; counts the load
            ids = self.expert_map(self.ops, ids)
        elif self.shard.ep_size > 1:  # experts held by other ranks contribute nothing here
            local = (ids >= self.expert_start) & (ids < self.expert_end)
            ids = torch.where(local, ids - self.expert_start, -1)
        lora = None if self.lora_experts is None else self.lora_experts.for_step()
        y = self.ops.moe_experts(x, self.w13, self.w2, weights, ids, unsummed=single, started=started, lora=lora,
                                 num_appended=self.num_folded_shared if self.expert_map is None else 0)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return (y if single else self.shard.all_reduce(y)), residual


class DecoderLayer(nn.Module):
    ops: Kernels = AUTO

    def __init__(self, cfg: Param2MoEConfig, layer_idx: int, shard: Shard, dtype, quant=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attention = Attention(cfg, layer_idx, shard, dtype, quant)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        p = f"model.layers.{layer_idx}.mlp."
        if cfg.is_dense_layer(layer_idx):
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size // shard.tp_size, dtype, quant, p)
            self.reduce_mlp = shard.all_reduce if shard.tp_size > 1 else None
        else:
            self.mlp = MoE(cfg, shard, dtype, quant, p)  # reduces its own sum

    def native_weights(self) -> LayerWeights | None:
        """The layer as the fused CPU decode step reads it, or None where that step would not be exact
        (model/native_layer.py)."""
        return native_weights(self)

    def forward(self, h, residual, cos, sin, attn):
        """Pre-norm block with the residual carried separately: returns (mlp_out, residual); mlp_out may come
        unsummed over experts (ops.ExpertOutputs), which the next norm takes in. A CPU decode step may run the
        whole block in one native call (Kernels.decode_layer)."""
        fused = self.ops.decode_layer(self, h, residual, cos, sin, attn)
        if fused is not None:
            return fused
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        a = self.attention(x, cos, sin, attn)
        if isinstance(self.mlp, MoE):
            return self.mlp(a, residual, self.post_attention_layernorm)
        x, residual = self.post_attention_layernorm(a, residual)
        if self.reduce_mlp is None:  # one rank: may come unsummed (one token on CUDA), the next norm sums it
            return self.mlp(x, unsummed=True), residual
        return self.reduce_mlp(self.mlp(x)), residual


class Param2MoEModel(nn.Module):
    def __init__(self, cfg: Param2MoEConfig, shard: Shard, dtype, quant=None):
        super().__init__()
        self.shard = shard
        self.vocab_start, self.vocab_end = shard.local_vocab(cfg.vocab_size)
        # The first pipeline stage embeds; the last needs the matrix too when it is the (tied) head.
        self.word_embeddings = nn.Module()
        if shard.is_first_stage or (cfg.tie_word_embeddings and shard.is_last_stage):
            self.word_embeddings.weight = _param(self.vocab_end - self.vocab_start, cfg.hidden_size, dtype=dtype)
        else:
            self.word_embeddings.weight = None
        first, last = shard.local_layers(cfg.num_hidden_layers)
        self.layer_range = range(first, last)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, shard, dtype, quant) for i in self.layer_range})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard.tp_size == 1:
            return F.embedding(input_ids, self.word_embeddings.weight)
        local = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        h = F.embedding(torch.where(local, input_ids - self.vocab_start, 0), self.word_embeddings.weight)
        return self.shard.all_reduce(h * local[:, None].to(h.dtype))


class Param2MoEForCausalLM(nn.Module):
    """The whole network. Build on the meta device, then materialise and load (see checkpoint.py). `kernels`:
    the backend its hot ops run on (the engine's; default: Triton on CUDA, native C on CPU where they apply);
    `quant`: a QuantPlan (which weights are quantized, and how) or None."""

    ops: Kernels = AUTO

    def __init__(self, cfg: Param2MoEConfig, dtype=torch.bfloat16, shard: Shard | None = None,
                 kernels: Kernels | None = None, quant=None):
        super().__init__()
        self.config, self.dtype, self.quant = cfg, dtype, quant
        self.shard = shard or Shard()
        self.model = Param2MoEModel(cfg, self.shard, dtype, quant)
        # A tied head is the embedding matrix, unless the head is quantized: then a quantized copy of it.
        quant_head = quant is not None and quant.quantizes(["lm_head"])
        if not self.shard.is_last_stage or (cfg.tie_word_embeddings and not quant_head):
            self.lm_head = None
        else:
            self.lm_head = nn.Module()
            m = self.model
            self.lm_head.weight = _matrix(quant, ["lm_head"], m.vocab_end - m.vocab_start, cfg.hidden_size,
                                          dtype=dtype)
        self.rope_cos = self.rope_sin = None
        self.random_routing = None  # (weights, table of expert sets): set_uniform_random_routing
        self.lora = None  # adapter slots (param2moe/lora/slots.py), when LoRA is enabled
        self.expert_maps = None  # expert load balancing: set_eplb_state
        if kernels is not None:
            self.use_kernels(kernels)

    def use_kernels(self, kernels: Kernels) -> None:
        """Run every layer's hot ops on this backend."""
        for module in self.modules():
            if isinstance(module, (Param2MoEForCausalLM, DecoderLayer, RMSNorm, Attention, MLP, MoE)):
                module.ops = kernels

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.word_embeddings.weight if self.lm_head is None else self.lm_head.weight

    def init_rope(self, max_positions: int) -> None:
        device = self.model.norm.weight.device
        self.rope_cos, self.rope_sin = rope_cos_sin(self.config, max_positions, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn,
                hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None, prev=None,
                lora_index: torch.Tensor | None = None):
        """Run this rank's layers. The first pipeline stage embeds input_ids (prev = (prev_index,
        prev_tokens): rows with prev_index >= 0 take their id from the previous step's sampled ids, still
        on the device); later stages take the hidden state and residual of the stage before. lora_index
        [T] int32: each token's adapter slot (-1: none), when LoRA slots are attached. Returns the
        final normed hidden state on the last stage, else (hidden, residual) for the next stage."""
        if self.lora is not None:
            self.lora.begin(lora_index, self.ops)
        if self.rope_cos is None:  # the engine sizes the table for max_model_len up front
            self.init_rope(max(self.config.max_position_embeddings, int(positions.max()) + 1))
        shard = self.shard
        if shard.is_first_stage and shard.tp_size == 1:  # ids, embedding and RoPE rows: one launch on CUDA
            h, cos, sin = self.ops.token_inputs(self.model.word_embeddings.weight, self.rope_cos, self.rope_sin,
                                           input_ids, positions, prev)
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            h = self.model.embed(resolve_ids(input_ids, prev)) if shard.is_first_stage else hidden
        if self.random_routing is not None:
            self._draw_random_experts(positions.shape[0], positions.device)
        if self.expert_maps is not None:  # padding rows (their KV slot) are not counted in the experts' load
            self.expert_maps.begin_step(getattr(attn, "slot_mapping", None))
        for layer in self.model.layers.values():
            h, residual = layer(h, residual, cos, sin, attn)
        if not shard.is_last_stage:
            return self.ops.sum_experts(h), residual
        return self.model.norm(h, residual)[0] if residual is not None else self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab_size] in float32 (gathered over the ranks' vocabulary slices)."""
        logits = self.ops.logits(hidden, self.head_weight)
        return self.shard.all_gather_vocab(logits, self.config.vocab_size)

    def fold_shared_experts(self) -> int:
        """See MoE.fold_shared_experts; returns how many layers were folded."""
        return sum(m.fold_shared_experts() for m in self.modules() if isinstance(m, MoE))

    # ------------------------------------------------------------------ experts (vLLM's MixtureOfExperts names)
    @property
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @property
    def num_logical_experts(self) -> int:
        return self.config.num_experts

    @property
    def num_redundant_experts(self) -> int:
        return self.shard.num_redundant_experts

    @property
    def num_physical_experts(self) -> int:
        return self.num_logical_experts + self.num_redundant_experts

    @property
    def num_local_physical_experts(self) -> int:
        return self.num_physical_experts // self.shard.ep_size

    def set_eplb_state(self, maps) -> None:
        """Route through expert load balancing: maps (param2moe/eplb ExpertMaps) gives each MoE layer its
        logical-to-physical map and load counter (maps.layer(i)), and is told each step's KV slots."""
        self.expert_maps = maps
        for i, moe in enumerate(self.moe_layers):
            moe.expert_map = maps.layer(i)

    def update_physical_experts_metadata(self, slot_experts: list[list[int]]) -> None:
        """After a rearrangement: the logical expert in each of this rank's slots, a list per MoE layer."""
        for moe, experts in zip(self.moe_layers, slot_experts):
            moe.slot_experts = list(experts)

    def set_uniform_random_routing(self, on: bool, table_rows: int = 1 << 16) -> None:
        """Benchmarks with random weights (docs/model.md §7): every MoE layer's router runs, then each token takes
        a uniformly random set of experts instead of the router's choice: a random row of a table of sets
        drawn up front, for all layers of a step at once (two launches a step; drawing sets in each layer
        would add launches a real model does not have). off: the router's choice again."""
        self.random_routing = None
        self._moes = moes = [m for m in self.modules() if isinstance(m, MoE)]
        if on and moes:
            c, k, dev = self.config, self.config.num_experts_per_tok, self.model.norm.weight.device
            g = torch.Generator(device=dev).manual_seed(1234)
            table = torch.rand(table_rows, c.num_experts, device=dev, generator=g).topk(k).indices
            weights = torch.full((1, k), c.routed_scaling_factor / k, device=dev)
            # every layer folds the same way (or none does)
            self.random_routing = append_experts(weights, table, c.num_experts, moes[0].num_folded_shared)
        for module in moes:
            module.random_choice = None

    def _draw_random_experts(self, num_tokens: int, device) -> None:
        weights, table = self.random_routing
        picks = table[torch.randint(0, table.shape[0], (len(self._moes), num_tokens), device=device)]
        for module, ids in zip(self._moes, picks):
            module.random_choice = weights.expand(num_tokens, -1), ids
