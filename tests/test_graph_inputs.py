"""The CUDA graphs' static inputs (engine/cuda_graphs.py): how a step's host arrays are padded into them.
Plain numpy, no GPU: the graphs themselves are tested against the eager path in test_cuda_engine.py."""

import numpy as np

from param2moe.engine.cuda_graphs import (
    fill_decode_inputs,
    fill_token_inputs,
    graph_input_size,
    graph_input_views,
    token_sizes,
)

SCRATCH = 999


def test_padding_rows_form_one_sequence_without_context():
    buf = np.full(graph_input_size(32, 4, 3), 7, dtype=np.int32)
    f = graph_input_views(buf, 32, 4, 3)
    # two sequences: 3 new tokens after 2 cached, and one decode token (its id still on the device)
    host = dict(input_ids=np.array([11, 12, 13, 0]), positions=np.array([2, 3, 4, 8]),
                slot_mapping=np.array([34, 35, 36, 72]), prev_index=np.array([-1, -1, -1, 0]),
                context_lens=np.array([5, 9]), query_start_loc=np.array([0, 3, 4]),
                block_tables=np.array([[2, 0], [4, 5]]))
    n = fill_token_inputs(f, host, 16, SCRATCH)
    assert f["input_ids"][:16].tolist() == [11, 12, 13, 0] + [0] * 12
    assert f["positions"][:16].tolist() == [2, 3, 4, 8] + [0] * 12
    assert f["slot_mapping"][:16].tolist() == [34, 35, 36, 72] + [SCRATCH] * 12
    assert f["prev_index"][:16].tolist() == [-1, -1, -1, 0] + [-1] * 12
    assert f["lora_index"][:16].tolist() == [-1] * 16  # absent: no row has an adapter
    assert (f["input_ids"][16:] == 7).all()  # past the graph's size: not read
    assert f["context_lens"].tolist() == [5, 9, 0, 0]
    # rows 4..16 are sequence 2 (no context: its attention is zero); sequence 3 is empty
    assert f["query_start_loc"].tolist() == [0, 3, 4, 16, 16]
    assert f["block_tables"][:2].tolist() == [[2, 0, 0], [4, 5, 0]]
    assert (f["block_tables"][2:] == 7).all()  # no program reads them: left as they were, not copied
    assert n == f["block_tables_offset"] + 2 * 3 and f["block_tables_offset"] + 4 * 3 == len(buf)


def test_step_without_pending_ids_and_exact_size():
    buf = np.zeros(graph_input_size(16, 2, 2), dtype=np.int32)
    f = graph_input_views(buf, 16, 2, 2)
    host = dict(input_ids=np.arange(16), positions=np.arange(16), slot_mapping=np.arange(16) + 32,
                context_lens=np.array([16]), query_start_loc=np.array([0, 16]), block_tables=np.array([[2]]))
    fill_token_inputs(f, host, 16, SCRATCH)
    assert (f["prev_index"] == -1).all()
    assert f["query_start_loc"].tolist() == [0, 16, 16]  # the padding sequence has no rows


def test_token_sizes():
    assert token_sizes(0) == []
    assert token_sizes(100) == [16, 32, 64]
    sizes = token_sizes(2048)
    assert sizes[:4] == [16, 32, 64, 128] and sizes[-1] == 2048
    assert all(b - a == 128 for a, b in zip(sizes[3:], sizes[4:]))


def test_decode_graph_inputs_share_the_layout():
    """A decode graph of size 4 is the layout of 4 tokens of 4 sequences; rows past the batch are padding
    sequences of one token each: token 0 at position 0, to the scratch slot, one cached token, block table 0."""
    buf = np.full(graph_input_size(4, 4, 3), 7, dtype=np.int32)
    assert len(buf) == 5 * 4 + 4 + 5 + 4 * 3  # 5 token fields (lora_index the last)
    f = graph_input_views(buf, 4, 4, 3)
    host = dict(input_ids=np.array([11, 0]), positions=np.array([5, 8]), slot_mapping=np.array([37, 72]),
                prev_index=np.array([-1, 1]), context_lens=np.array([6, 9]), query_start_loc=np.array([0, 1, 2]),
                block_tables=np.array([[2, 0], [4, 5]]))
    fill_decode_inputs(f, host, 4, SCRATCH)
    assert f["input_ids"].tolist() == [11, 0, 0, 0] and f["positions"].tolist() == [5, 8, 0, 0]
    assert f["slot_mapping"].tolist() == [37, 72, SCRATCH, SCRATCH]
    assert f["prev_index"].tolist() == [-1, 1, -1, -1]
    assert f["context_lens"].tolist() == [6, 9, 1, 1]
    assert f["query_start_loc"].tolist() == [0, 1, 2, 3, 4]
    assert f["block_tables"].tolist() == [[2, 0, 0], [4, 5, 0], [0, 0, 0], [0, 0, 0]]
    assert f["lora_index"].tolist() == [-1] * 4  # no row has an adapter
    del host["prev_index"]  # no row waits for the previous step
    host["lora_index"] = np.array([2, -1])  # the first row's adapter is in slot 2
    fill_decode_inputs(f, host, 4, SCRATCH)
    assert f["prev_index"].tolist() == [-1] * 4
    assert f["lora_index"].tolist() == [2, -1, -1, -1]
