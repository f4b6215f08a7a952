"""The engine end to end on tiny float32 checkpoints: batching, chunked prefill, preemption and prefix
caching never change what a request gets; sampling parameters, stops, logprobs and detokenization
behave as defined; bad input fails with a clear error.

References: "one at a time" runs of the same engine, a plain forward of the network over
prompt + output with `CausalAttention` (no cache), and naive per-row loops written here.
"""

from __future__ import annotations

import functools
import math
import random
from collections import Counter

import pytest
import torch
from cases import preset_checkpoint

from param2moe import LLM, SamplingParams
from param2moe.engine import OutputKind
from param2moe.engine.detokenizer import IncrementalDetokenizer
from param2moe.engine.sampler import Sampler
from param2moe.engine.sequence import Request, Sequence
from param2moe.model.attention import CausalAttention

FIRST_ORDINARY_ID = 25  # ids 0..24 are Param2's special tokens
EOS = 3
# Against the reference forward: 1e-5, relative above |logprob| 1 (float32 rounding grows with the
# logits; measured worst on this checkpoint ~6e-6).
LP_TOL = 1e-5


def close(got: float, want: float) -> bool:
    return abs(got - want) <= LP_TOL * max(1.0, abs(want))

# Between two engine runs of one request in different batches: float32 matmuls over different row counts
# round differently (seen: 1.1e-5 after 20 tokens); tokens must still be the same.
RUN_TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """The tiny preset (Param2 layout: a dense first layer, then MoE with shared experts), 2 layers. A head
    scale of 0.2 keeps logits within about +-20, where float32 rounding stays well inside LP_TOL (at the
    writer's default 0.5, logprobs reach -45 and the reference forward itself is off by ~2e-5)."""
    return preset_checkpoint(tmp_path_factory, "tiny-engine", {"num_hidden_layers": 2}, seed=5, head_std=0.2)


@pytest.fixture(scope="module")
def make_llm(ckpt):
    """LLM(**options) for the module's checkpoint, built once per distinct set of options."""
    @functools.cache
    def build(**options) -> LLM:
        kw = dict(max_model_len=256, kv_cache_memory=8 << 20, seed=0)
        kw.update(options)
        return LLM(ckpt, **kw)

    return build


@pytest.fixture(scope="module")
def llm(make_llm) -> LLM:
    return make_llm()


@pytest.fixture(scope="module")
def vocab(llm) -> int:
    return llm.llm_engine.model_config.vocab_size


def ids_prompt(tokens: list[int]) -> dict:
    return {"prompt_token_ids": list(tokens)}


def gen(llm: LLM, prompts, params) -> list:
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    return llm.generate([ids_prompt(p) for p in prompts], params, use_tqdm=False)


def gen_one(llm: LLM, prompt, params):
    return gen(llm, [prompt], params)[0]


@torch.no_grad()
def reference_logprobs(llm: LLM, seqs: list[list[int]]) -> list[torch.Tensor]:
    """log_softmax [len, V] of a plain forward (no cache) over each sequence."""
    model = llm.llm_engine.model
    ids = torch.tensor([t for s in seqs for t in s])
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    h = model(ids, positions, CausalAttention([len(s) for s in seqs]))
    return list(model.compute_logits(h).log_softmax(-1).split([len(s) for s in seqs]))


def random_prompts(vocab: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_ORDINARY_ID, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# ------------------------------------------------------------------------------------ the 64-request workload
@pytest.fixture(scope="module")
def workload(vocab):
    """64 requests: prompts of 1..100 tokens, 1..40 output tokens; half greedy, half seeded sampling with
    temperature / top_p / top_k; every one asks for 2 logprobs, every third for 1 prompt logprob."""
    rng = random.Random(1234)
    prompts = random_prompts(vocab, 64, 1, 100, seed=99)
    params = []
    for i in range(64):
        max_tokens = rng.randint(1, 40)
        if i % 2 == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2))
        else:
            params.append(SamplingParams(
                temperature=rng.choice([0.5, 0.8, 1.0, 1.3]), top_p=rng.choice([1.0, 0.9, 0.7]),
                top_k=rng.choice([-1, 5, 50]), seed=1000 + i, max_tokens=max_tokens, ignore_eos=True, logprobs=2))
    for sp in params[::3]:
        sp.prompt_logprobs = 1
    return prompts, params


@pytest.fixture(scope="module")
def one_at_a_time(make_llm, workload):
    prompts, params = workload
    llm = make_llm(enable_prefix_caching=False)
    return [gen_one(llm, p, sp) for p, sp in zip(prompts, params)]


def assert_same_outputs(got, want, what: str) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.prompt_token_ids == b.prompt_token_ids
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids, f"{what}: request {i} ({len(a.prompt_token_ids)}-token prompt) differs"
        assert ca.finish_reason == cb.finish_reason == "length"
        assert len(ca.logprobs) == len(cb.logprobs) == len(ca.token_ids)
        for pos, (la, lb) in enumerate(zip(ca.logprobs, cb.logprobs)):
            assert la.keys() == lb.keys(), f"{what}: request {i}, token {pos}: top logprob ids differ"
            for tok in la:
                assert abs(la[tok] - lb[tok]) < RUN_TOL, f"{what}: request {i}, token {pos}"
        assert abs(ca.cumulative_logprob - cb.cumulative_logprob) < 1e-4
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        if a.prompt_logprobs is not None:
            assert len(a.prompt_logprobs) == len(a.prompt_token_ids) and a.prompt_logprobs[0] is None
            for pos, (la, lb) in enumerate(zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])):
                assert la.keys() == lb.keys(), f"{what}: request {i}, prompt position {pos + 1}"
                assert max(abs(la[t] - lb[t]) for t in la) < RUN_TOL


def test_workload_lengths(workload, one_at_a_time):
    prompts, params = workload
    assert {len(p) for p in prompts} >= {1} and max(len(p) for p in prompts) > 80
    for out, sp in zip(one_at_a_time, params):
        assert len(out.outputs[0].token_ids) == sp.max_tokens


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_batched_chunked_prefill_equals_one_at_a_time(make_llm, workload, one_at_a_time, overlap):
    prompts, params = workload
    # prompts of up to 100 tokens come in chunks; with overlap, each step is launched before the
    # tokens of the one before are read (the GPU default, forced here on the CPU)
    llm = make_llm(max_num_seqs=8, max_num_batched_tokens=24, async_scheduling=overlap)
    engine = llm.llm_engine
    chunked = []
    orig_schedule = engine.scheduler.schedule

    def spy():
        batch = orig_schedule()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if 0 < seq.num_computed_tokens < seq.num_prompt_tokens:
                chunked.append(n)  # a prefill continued after an earlier chunk
        return batch

    engine.scheduler.schedule = spy
    try:
        outs = gen(llm, prompts, params)
    finally:
        engine.scheduler.schedule = orig_schedule
    assert chunked, "no prompt was split into chunks"
    assert_same_outputs(outs, one_at_a_time, "batched with chunked prefill")
    assert engine.block_manager.num_free_blocks == len(engine.block_manager.blocks)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_preemption_gives_identical_outputs(make_llm, workload, one_at_a_time, overlap):
    prompts, params = workload
    # 9 blocks of 16 tokens: room for about one long sequence, so running ones are preempted and recomputed.
    llm = make_llm(max_model_len=140, kv_cache_memory=(10 * 16) * 2 * 2 * 2 * 32 * 4, max_num_seqs=16,
                   max_num_batched_tokens=64, async_scheduling=overlap)
    engine = llm.llm_engine
    assert len(engine.block_manager.blocks) == 9
    outs = gen(llm, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert_same_outputs(outs, one_at_a_time, "with preemption")
    assert engine.block_manager.num_free_blocks == len(engine.block_manager.blocks)


# ------------------------------------------------------------------------------------ prefix caching
def test_prefix_cache_hits_give_identical_logprobs(make_llm, vocab):
    system = random_prompts(vocab, 1, 45, 45, seed=7)[0]  # two full blocks and a bit
    prompts = [system + s for s in random_prompts(vocab, 6, 1, 20, seed=8)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    cached_llm = make_llm(enable_prefix_caching=True, max_num_batched_tokens=512)
    bm = cached_llm.llm_engine.block_manager
    hits0 = bm.hits
    first = gen_one(cached_llm, prompts[0], params)
    rest = gen(cached_llm, prompts[1:], params)
    assert bm.hits - hits0 >= 5 * 32
    assert all(o.num_cached_tokens >= 32 for o in rest)
    plain = gen(make_llm(enable_prefix_caching=False), prompts, params)
    assert all(o.num_cached_tokens == 0 for o in plain)
    for got, want in zip([first, *rest], plain):
        a, b = got.outputs[0], want.outputs[0]
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.keys() == lb.keys()
            assert max(abs(la[t] - lb[t]) for t in la) < RUN_TOL


# ------------------------------------------------------------------------------------ stopping
@pytest.fixture(scope="module")
def greedy_text_case(llm):
    """A text prompt, its greedy output restricted (by logit_bias) to tokens of 2+ printable ASCII chars
    so that the text is clean, the bias, and the text of each output token."""
    prompt = "The river flows to the sea; the monsoon brings rain to the fields, and farmers sow"
    tok = llm.get_tokenizer()
    vocab = llm.llm_engine.model_config.vocab_size
    clean = [t for t in range(vocab) if (len(s := tok.decode([t])) >= 2 and s.isascii() and s.isprintable())]
    assert len(clean) > 50
    bias = {t: -100.0 for t in set(range(vocab)) - set(clean)}
    ids = tok.encode(prompt)
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logit_bias=bias)
    out = gen_one(llm, ids, sp).outputs[0]
    detok = IncrementalDetokenizer(tok, ids)
    pieces = [detok.add(t) for t in out.token_ids]
    assert "".join(pieces) == out.text == tok.decode(out.token_ids)
    assert all(p == tok.decode([t]) for p, t in zip(pieces, out.token_ids))
    return ids, out, pieces, bias


def test_stop_string_across_token_boundary(llm, greedy_text_case):
    ids, out, pieces, bias = greedy_text_case
    text, stop = out.text, None
    offset = 0
    for i in range(len(pieces) - 1):
        offset += len(pieces[i])
        candidate = pieces[i][-2:] + pieces[i + 1][:2]
        if text.find(candidate) == offset - 2:  # its first occurrence spans this boundary
            stop = candidate
            break
    assert stop is not None, f"no stop string spans a token boundary in {pieces}"
    cut = text.find(stop)
    kw = dict(temperature=0.0, max_tokens=40, ignore_eos=True, logit_bias=bias)
    c = gen_one(llm, ids, SamplingParams(stop=["zzzz", stop], **kw)).outputs[0]
    assert c.text == text[:cut]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.token_ids == out.token_ids[:len(c.token_ids)] and len(c.token_ids) < len(out.token_ids)
    keep = gen_one(llm, ids, SamplingParams(stop=stop, include_stop_str_in_output=True, **kw)).outputs[0]
    assert keep.text == text[:cut + len(stop)] and keep.stop_reason == stop
    # streamed (DELTA) pieces never show text past the stop string
    engine = llm.llm_engine
    engine.add_request("stream-stop", ids, SamplingParams(stop=stop, output_kind=OutputKind.DELTA, **kw))
    streamed = ""
    while engine.has_unfinished_requests():
        for o in engine.step():
            streamed += o.outputs[0].text
    assert streamed == text[:cut]


def test_stop_token_ids(llm, greedy_text_case):
    ids, out, _, bias = greedy_text_case
    k = next(i for i in range(3, len(out.token_ids)) if out.token_ids[i] not in out.token_ids[:i])
    stop_tok = out.token_ids[k]
    c = gen_one(llm, ids, SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop_tok],
                                         logit_bias=bias)).outputs[0]
    assert c.token_ids == out.token_ids[:k + 1]  # the stop token is in the ids, not in the text
    assert c.text == llm.get_tokenizer().decode(out.token_ids[:k])
    assert (c.finish_reason, c.stop_reason) == ("stop", stop_tok)


def test_eos_ignore_eos_min_tokens_max_tokens(llm, vocab):
    prompt = random_prompts(vocab, 1, 10, 10, seed=3)[0]
    push_eos = {EOS: 50.0}  # EOS becomes (nearly) certain
    c = gen_one(llm, prompt, SamplingParams(temperature=0.0, max_tokens=10, logit_bias=push_eos)).outputs[0]
    assert c.token_ids == [EOS] and (c.finish_reason, c.stop_reason) == ("stop", None)
    c = gen_one(llm, prompt, SamplingParams(temperature=0.0, max_tokens=7, logit_bias=push_eos,
                                            ignore_eos=True)).outputs[0]
    assert c.token_ids == [EOS] * 7 and c.finish_reason == "length"
    c = gen_one(llm, prompt, SamplingParams(temperature=0.0, max_tokens=10, logit_bias=push_eos,
                                            min_tokens=4)).outputs[0]
    assert len(c.token_ids) == 5 and EOS not in c.token_ids[:4] and c.token_ids[4] == EOS
    assert c.finish_reason == "stop"
    # min_tokens also holds back stop_token_ids
    c = gen_one(llm, prompt, SamplingParams(temperature=0.0, max_tokens=10, logit_bias={77: 50.0},
                                            stop_token_ids=[77], min_tokens=3)).outputs[0]
    assert len(c.token_ids) == 4 and 77 not in c.token_ids[:3] and (c.token_ids[3], c.stop_reason) == (77, 77)
    c = gen_one(llm, prompt, SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)).outputs[0]
    assert len(c.token_ids) == 9 and (c.finish_reason, c.stop_reason) == ("length", None)


def test_overlap_keeps_stops_penalties_and_streams(make_llm, llm, greedy_text_case, vocab):
    """Launching each step before reading the last one's tokens changes nothing a user sees: stop
    strings, stop tokens, EOS, min_tokens, penalties (which read earlier tokens), n > 1, context
    length, and the streamed deltas, all in one batch."""
    ids, out, _, bias = greedy_text_case
    text = out.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    kw = dict(temperature=0.0, max_tokens=40, logit_bias=bias)
    prompts = [ids, ids, ids, ids] + random_prompts(vocab, 4, 5, 30, seed=11)
    params = [SamplingParams(stop=[stop], ignore_eos=True, **kw),
              SamplingParams(stop_token_ids=[out.token_ids[5]], **kw),
              SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, ignore_eos=True, **kw),
              SamplingParams(n=3, temperature=0.9, seed=5, max_tokens=25, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0.0, max_tokens=12, logit_bias={EOS: 50.0}, min_tokens=3),
              SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True),  # runs to max_model_len
              SamplingParams(frequency_penalty=0.7, temperature=0.0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)]
    sync = make_llm(max_model_len=96, async_scheduling=False)
    over = make_llm(max_model_len=96, async_scheduling=True)
    assert over.llm_engine.overlap and not sync.llm_engine.overlap
    want, got = gen(sync, prompts, params), gen(over, prompts, params)
    for i, (a, b) in enumerate(zip(got, want)):
        for ca, cb in zip(a.outputs, b.outputs):
            assert (ca.token_ids, ca.text, ca.finish_reason, ca.stop_reason) == \
                (cb.token_ids, cb.text, cb.finish_reason, cb.stop_reason), f"request {i}"
    assert want[0].outputs[0].stop_reason == stop and want[4].outputs[0].token_ids[-1] == EOS
    assert want[5].outputs[0].finish_reason == "length"
    engine = over.llm_engine
    engine.add_request("stream-overlap", ids, SamplingParams(stop=stop, output_kind=OutputKind.DELTA,
                                                             ignore_eos=True, **kw))
    streamed, seen = "", []
    while engine.has_unfinished_requests():
        for o in engine.step():
            streamed += o.outputs[0].text
            seen += o.outputs[0].token_ids
    assert streamed == want[0].outputs[0].text and seen == want[0].outputs[0].token_ids
    assert engine.block_manager.num_free_blocks == len(engine.block_manager.blocks)


def test_context_length_finishes_with_length(make_llm, vocab):
    llm = make_llm(max_model_len=64)
    prompt = random_prompts(vocab, 1, 60, 60, seed=4)[0]
    c = gen_one(llm, prompt, SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)).outputs[0]
    assert len(c.token_ids) == 4 and c.finish_reason == "length"


# ------------------------------------------------------------------------------------ n > 1, seeds
def test_n_samples(llm, vocab):
    prompt = random_prompts(vocab, 1, 12, 12, seed=5)[0]
    sp = SamplingParams(n=4, temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    out = gen_one(llm, prompt, sp)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    samples = [tuple(c.token_ids) for c in out.outputs]
    assert all(len(s) == 16 for s in samples)
    assert len(set(samples)) == 4, "the n samples are not distinct"
    again = gen_one(llm, prompt, sp)
    assert [tuple(c.token_ids) for c in again.outputs] == samples  # seeded: reproducible
    other = gen_one(llm, prompt, SamplingParams(n=4, temperature=1.0, seed=43, max_tokens=16, ignore_eos=True))
    assert [tuple(c.token_ids) for c in other.outputs] != samples


def test_seeded_sampling_independent_of_batch(llm, vocab):
    prompts = random_prompts(vocab, 9, 3, 60, seed=6)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=777, max_tokens=20, ignore_eos=True)
    alone = gen_one(llm, prompts[0], seeded).outputs[0].token_ids
    others = [SamplingParams(temperature=t, max_tokens=m, ignore_eos=True, repetition_penalty=r)
              for t, m, r in [(1.0, 5, 1.0), (0.0, 30, 1.2), (0.7, 12, 1.0), (1.5, 25, 1.0),
                              (0.3, 3, 1.1), (1.0, 40, 1.0), (0.0, 8, 1.0), (2.0, 17, 1.0)]]
    for idx in (0, 4, 8):  # first, in the middle, last
        outs = gen(llm, prompts[1:idx + 1] + [prompts[0]] + prompts[idx + 1:], others[:idx] + [seeded] + others[idx:])
        assert outs[idx].outputs[0].token_ids == alone


# ------------------------------------------------------------------------------------ logprobs
def test_logprobs_match_reference_forward(llm, vocab):
    prompts = random_prompts(vocab, 5, 2, 50, seed=9)
    params = [SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True, logprobs=5),
              SamplingParams(temperature=1.0, seed=3, max_tokens=15, ignore_eos=True, logprobs=5),
              SamplingParams(temperature=0.7, top_k=20, seed=4, max_tokens=9, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=11, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=1.2, top_p=0.8, seed=5, max_tokens=15, ignore_eos=True, logprobs=5)]
    outs = gen(llm, prompts, params)
    refs = reference_logprobs(llm, [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)])
    for prompt, sp, out, ref in zip(prompts, params, outs, refs):
        c = out.outputs[0]
        total = 0.0
        for j, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            row = ref[len(prompt) - 1 + j]
            top = row.topk(sp.logprobs)
            want = {int(i): float(v) for v, i in zip(top.values, top.indices)}
            want[tok] = float(row[tok])
            assert entry.keys() == want.keys()
            for t, v in want.items():
                assert close(entry[t], v), (j, t, entry[t], v)
                assert entry[t].rank == int((row > row[t]).sum()) + 1
            total += float(row[tok])
        assert abs(c.cumulative_logprob - total) < 1e-4
        if sp.greedy and sp.repetition_penalty == 1.0:
            assert all(entry[t].rank == 1 for t, entry in zip(c.token_ids, c.logprobs))


def test_prompt_logprobs_match_reference_forward(make_llm, vocab):
    llm = make_llm(max_num_batched_tokens=32, max_num_seqs=4)  # the long prompts are prefilled in chunks
    prompts = random_prompts(vocab, 4, 1, 90, seed=10) + [random_prompts(vocab, 1, 90, 90, seed=11)[0]]
    sp = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=3)
    outs = gen(llm, prompts, sp)
    refs = reference_logprobs(llm, prompts)
    for prompt, out, ref in zip(prompts, outs, refs):
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        for j in range(1, len(prompt)):
            row, tok = ref[j - 1], prompt[j]
            top = row.topk(3)
            want = {int(i): float(v) for v, i in zip(top.values, top.indices)}
            want[tok] = float(row[tok])
            assert plp[j].keys() == want.keys()
            for t, v in want.items():
                assert close(plp[j][t], v), (j, t, plp[j][t], v)
        assert out.num_cached_tokens == 0


# ------------------------------------------------------------------------------------ sampling parameters
def test_logit_bias_forces_token(llm, vocab):
    prompts = random_prompts(vocab, 3, 5, 30, seed=12)
    for sp in (SamplingParams(temperature=0.0, max_tokens=8, logit_bias={123: 100.0}),
               SamplingParams(temperature=1.0, seed=1, max_tokens=8, logit_bias={123: 100.0})):
        assert all(o.outputs[0].token_ids == [123] * 8 for o in gen(llm, prompts, sp))


def test_filters_that_leave_one_token_are_greedy(llm, vocab):
    prompts = random_prompts(vocab, 4, 5, 30, seed=13)
    greedy = [o.outputs[0].token_ids for o in gen(llm, prompts, SamplingParams(temperature=0.0, max_tokens=12,
                                                                                ignore_eos=True))]
    for kw in (dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6)):
        sp = SamplingParams(temperature=1.5, seed=9, max_tokens=12, ignore_eos=True, **kw)
        assert [o.outputs[0].token_ids for o in gen(llm, prompts, sp)] == greedy, kw


def test_repetition_penalty_changes_greedy_choice(llm, vocab):
    # Find a greedy continuation that repeats a token: the context before the repeat already holds the
    # token the model picks next, so a repetition penalty must push it down.
    for prompt in random_prompts(vocab, 20, 4, 20, seed=14):
        out = gen_one(llm, prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)).outputs[0]
        k = next((i for i, t in enumerate(out.token_ids) if t in prompt + out.token_ids[:i]), None)
        if k is None:
            continue
        context, repeated = prompt + out.token_ids[:k], out.token_ids[k]
        row = reference_logprobs(llm, [context])[0][-1]
        logits = llm.llm_engine.model.compute_logits(  # raw logits of the last position
            _hidden_last(llm, context))[0]
        assert int(logits.argmax()) == repeated == int(row.argmax())
        penalty = 3.0
        expected = logits.clone()
        for t in set(context):
            expected[t] = expected[t] / penalty if expected[t] > 0 else expected[t] * penalty
        want = int(expected.argmax())
        if want == repeated:
            continue  # the penalty was not enough to change the choice here
        got = gen_one(llm, context, SamplingParams(temperature=0.0, max_tokens=1,
                                                   repetition_penalty=penalty)).outputs[0].token_ids
        assert got == [want] and want != repeated
        # and a penalty below 1 rewards repeats: the chosen token does not change
        got = gen_one(llm, context, SamplingParams(temperature=0.0, max_tokens=1, repetition_penalty=0.5))
        assert got.outputs[0].token_ids == [repeated]
        return
    pytest.fail("no greedy continuation with a repeat whose choice the penalty changes")


@torch.no_grad()
def _hidden_last(llm: LLM, tokens: list[int]) -> torch.Tensor:
    model = llm.llm_engine.model
    h = model(torch.tensor(tokens), torch.arange(len(tokens)), CausalAttention([len(tokens)]))
    return h[-1:]


def naive_process(logits: torch.Tensor, seqs: list[Sequence], eos: list[int]) -> torch.Tensor:
    """Bias, min_tokens masking and penalties, one row and one token at a time."""
    out = logits.clone().double()
    for i, s in enumerate(seqs):
        p, row = s.params, out[i]
        for t, b in (p.logit_bias or {}).items():
            row[t] += b
        if len(s.output_token_ids) < p.min_tokens:
            for t in ([] if p.ignore_eos else eos) + list(p.stop_token_ids):
                row[t] = -math.inf
        if p.repetition_penalty != 1.0:
            for t in set(s.token_ids):
                row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
        for t, count in Counter(s.output_token_ids).items():
            row[t] -= p.frequency_penalty * count + p.presence_penalty
    return out


def naive_filter(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """top-k, then top-p (smallest set of the most likely tokens whose mass reaches top_p), then min-p."""
    out = torch.full_like(x, -math.inf)
    for i, p in enumerate(params):
        row = x[i].double()
        order = sorted(range(row.numel()), key=lambda t: -float(row[t]))
        keep = order[:p.top_k] if p.top_k > 0 else order
        probs = torch.softmax(row[keep], 0).tolist()
        mass, kept = 0.0, []
        for t, q in zip(keep, probs):
            if mass > p.top_p:  # the mass before this token already exceeds top_p
                break
            kept.append((t, q))
            mass += q
        kept = [(t, q) for t, q in kept if q >= p.min_p * probs[0]]
        for t, _ in kept:
            out[i, t] = x[i, t]
    return out


def _seqs(vocab: int, params: list[SamplingParams], seed: int) -> list[Sequence]:
    rng = random.Random(seed)
    seqs = []
    for i, p in enumerate(params):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        seq = Sequence(i, Request(str(i), None, prompt, p), 0, None)
        seq.token_ids += [rng.randrange(min(vocab, 60)) for _ in range(rng.randint(0, 25))]  # repeats likely
        seqs.append(seq)
    return seqs


def test_sampler_processing_matches_naive_loop(vocab):
    params = [SamplingParams(),
              SamplingParams(repetition_penalty=1.7),
              SamplingParams(repetition_penalty=0.6, presence_penalty=0.5),
              SamplingParams(frequency_penalty=1.5),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.3, logit_bias={5: 3.0, 400: -7.5, 9: 1e3}),
              SamplingParams(min_tokens=100, max_tokens=200, stop_token_ids=[7, 8]),
              SamplingParams(min_tokens=100, max_tokens=200, ignore_eos=True, stop_token_ids=[11]),
              SamplingParams(repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.2, logit_bias={1: -2.0})]
    seqs = _seqs(vocab, params, seed=15)
    logits = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(0)) * 3
    sampler = Sampler([EOS])
    got = sampler._apply_bias_and_penalties(logits.clone(), seqs)
    want = naive_process(logits, seqs, [EOS])
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    assert torch.allclose(got[finite].double(), want[finite], atol=1e-4)
    # the filters, on temperature-scaled rows
    fparams = [SamplingParams(top_k=5), SamplingParams(top_p=0.9), SamplingParams(min_p=0.2),
               SamplingParams(top_k=50, top_p=0.5, min_p=0.05), SamplingParams(top_p=0.3), SamplingParams(),
               SamplingParams(top_k=1), SamplingParams(top_k=vocab + 10)]
    x = torch.randn(len(fparams), vocab, generator=torch.Generator().manual_seed(1)) * 2
    got = Sampler._top_k_top_p_min_p(x, fparams)
    want = naive_filter(x, fparams)
    assert torch.equal(got, want)


def test_sampling_follows_the_filtered_distribution(vocab):
    """Many seeded draws from one row: every drawn token is allowed, frequencies follow the probabilities."""
    sampler = Sampler([EOS])
    p = SamplingParams(temperature=0.8, top_k=6, top_p=0.95)
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(2)) * 2
    allowed = naive_filter(logits / 0.8, [p])[0]
    probs = allowed.softmax(-1)
    n = 3000
    seqs = _seqs(vocab, [p] * n, seed=16)
    for i, s in enumerate(seqs):
        s.seed = i
    counts = Counter(sampler(logits.expand(n, -1).contiguous(), seqs).token_ids)
    assert set(counts) <= set(torch.nonzero(probs > 0)[:, 0].tolist())
    for t, c in counts.items():
        assert abs(c / n - float(probs[t])) < 0.04


# ------------------------------------------------------------------------------------ detokenizer
def test_incremental_detokenizer_never_splits_a_character(llm):
    tok = llm.get_tokenizer()
    text = "नमस्ते 😀 दुनिया — ça va? 你好 🙏🏽 done"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # most of it is byte-level tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold part of a character
    for prompt in ([], tok.encode("Hello there, "), tok.encode("नम")):
        detok = IncrementalDetokenizer(tok, prompt)
        pieces = [detok.add(i) for i in ids]
        for piece in pieces:
            assert "\ufffd" not in piece
            piece.encode("utf-8")  # valid text
        assert "".join(pieces) == tok.decode(ids) == text


def test_engine_text_is_the_decoded_tokens(llm, vocab):
    """Generated text is the decode of the generated ids, less a character still incomplete at the end."""
    tok = llm.get_tokenizer()
    outs = gen(llm, random_prompts(vocab, 12, 3, 20, seed=17),
               SamplingParams(temperature=1.0, seed=2, max_tokens=25, ignore_eos=True))
    for o in outs:
        c = o.outputs[0]
        full = tok.decode(c.token_ids)
        assert c.text in (full, full.removesuffix("\ufffd")), (c.text, full)


# ------------------------------------------------------------------------------------ abort, errors
def test_abort_frees_every_block(make_llm, vocab):
    llm = make_llm(max_num_batched_tokens=32, max_num_seqs=4)
    engine = llm.llm_engine
    bm = engine.block_manager
    total = len(bm.blocks)
    prompts = random_prompts(vocab, 6, 20, 80, seed=18)
    for i, p in enumerate(prompts):
        engine.add_request(f"abort-{i}", ids_prompt(p),
                           SamplingParams(n=2 if i == 0 else 1, temperature=1.0, max_tokens=50, ignore_eos=True))
    for _ in range(6):
        engine.step()
    assert bm.num_free_blocks < total and engine.scheduler.running and engine.scheduler.waiting
    for i in range(len(prompts)):
        engine.abort(f"abort-{i}")
    assert bm.num_free_blocks == total
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not engine.scheduler.has_work() and not engine.has_unfinished_requests()
    assert engine.step() == []


def test_prompt_longer_than_context_is_refused(make_llm, vocab):
    llm = make_llm(max_model_len=64)
    engine = llm.llm_engine
    ok = random_prompts(vocab, 1, 10, 10, seed=19)[0]
    too_long = random_prompts(vocab, 1, 64, 64, seed=19)[0]
    with pytest.raises(ValueError, match="max_model_len"):
        gen(llm, [ok, too_long], SamplingParams(max_tokens=4))
    assert not engine.has_unfinished_requests() and not engine.scheduler.has_work()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen_one(llm, [1, 2, vocab], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        gen_one(llm, [], SamplingParams())


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0.0), ("repetition_penalty", math.nan),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("max_tokens", 0), ("min_tokens", -1),
    ("logprobs", -1), ("prompt_logprobs", -3), ("stop", ""), ("seed", "x"),
])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_names_the_field():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


@pytest.mark.parametrize("kw,field", [
    (dict(logit_bias={10**6: 1.0}), "logit_bias"), (dict(stop_token_ids=[10**6], min_tokens=2), "stop_token_ids"),
    (dict(logprobs=10**6), "logprobs"), (dict(prompt_logprobs=10**6), "prompt_logprobs"),
])
def test_request_params_checked_against_the_model(llm, vocab, kw, field):
    with pytest.raises(ValueError, match=field):
        gen_one(llm, [30, 31, 32], SamplingParams(max_tokens=3, **kw))
    # the engine is still usable afterwards
    assert len(gen_one(llm, [30, 31, 32], SamplingParams(max_tokens=3, ignore_eos=True)).outputs[0].token_ids) == 3


# ------------------------------------------------------------------------------------ vLLM references
def _vllm_reference():
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ref_file = root / "tests" / "data" / "vllm_reference.json"
    if not ref_file.exists():
        return None, []
    spec = importlib.util.spec_from_file_location("make_vllm_reference", root / "scripts" / "make_vllm_reference.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script, json.loads(ref_file.read_text())["cases"]


_SCRIPT, _VLLM_CASES = _vllm_reference()


@pytest.mark.parametrize("case", _VLLM_CASES, ids=[c["name"] for c in _VLLM_CASES])
def test_batched_generate_matches_vllm(case, tmp_path):
    """All of a case's prompts in one LLM.generate call (batched, float32, greedy): the same 32 tokens as
    vLLM and prompt logprobs within 1e-4 of vLLM's."""
    ckpt = tmp_path / case["name"]
    _SCRIPT.write_case(case, str(ckpt))
    if _SCRIPT.weights_sha256(str(ckpt)) != case["weights_sha256"]:
        pytest.fail(f"{case['name']}: the writer's weights changed; rerun scripts/make_vllm_reference.py")
    llm = LLM(str(ckpt), dtype="float32", max_model_len=256, kv_cache_memory=16 << 20, seed=0)
    n = len(case["greedy_tokens"][0])
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, prompt_logprobs=0, logprobs=0)
    outs = gen(llm, case["prompts"], sp)
    for i, (out, prompt) in enumerate(zip(outs, case["prompts"])):
        c = out.outputs[0]
        assert c.token_ids == case["greedy_tokens"][i], f"{case['name']}: prompt {i} greedy tokens differ"
        mine = [None] + [out.prompt_logprobs[j][t] for j, t in enumerate(prompt) if j > 0]
        for j, (a, b) in enumerate(zip(mine, case["prompt_logprobs"][i])):
            assert (a is None) == (b is None)
            assert b is None or abs(a - b) < 1e-4, f"{case['name']}: prompt {i}, position {j}: {a} vs {b}"
        for j, (t, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            assert abs(entry[t] - case["greedy_logprobs"][i][j]) < 1e-4, f"{case['name']}: prompt {i}, token {j}"
