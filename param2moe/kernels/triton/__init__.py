"""Triton versions of the hot operations in `param2moe.kernels` (issue 5).

Each module here mirrors a plain torch oracle beside it in `param2moe/kernels/` (same signature, same
semantics; bf16 results within rounding of the oracle's). Nothing imports this package on the CPU path:
`param2moe.kernels` imports a module of it lazily, the first time a CUDA tensor arrives. The tests run
these kernels on CPU tensors too, through Triton's interpreter (TRITON_INTERPRET=1).

- norm.py:      rms_norm, add_rms_norm, expert_sum_add_rms_norm (the MoE's combine + the next norm),
                qk_norm_rope (+ the KV-cache write), apply_rope
- routing.py:   route, gate_route (router logits + routing), add_rms_norm_gate_route (+ the norm before it)
- moe.py:       moe_experts (align by expert + fused gate/up+SiLU GEMM + down GEMM + top-k combine), moe_align,
                add_rms_norm_gate_route_gate_up (one token: the gate/up GEMM launched behind the router, PDL)
- attention.py: paged_attention (GQA-packed, split-KV + reduce; QK-norm + RoPE + KV write inside at decode)
- gemv.py:      decode-sized linear layers, weights loaded before waiting for the kernel in front (PDL)
- quant.py:     linear layers and the fused MoE with int8 / int4 / fp8 weights (param2moe/quant/formats.py),
                dequantized in registers: a GEMV for few tokens and one-token experts, tensor-core tiles beyond
- moe_configs.py: block-size table of the fused MoE by token-count bucket
"""
