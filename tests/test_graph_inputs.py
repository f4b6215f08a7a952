"""The token graphs' static inputs (engine/cuda_graphs.py): how a step's host arrays are padded into them.
Plain numpy, no GPU: the graphs themselves are tested against the eager path in test_cuda_engine.py."""

import numpy as np

from param2moe.engine.cuda_graphs import fill_token_inputs, token_sizes, token_views, token_views_size

SCRATCH = 999


def test_padding_rows_form_one_sequence_without_context():
    buf = np.full(token_views_size(32, 4, 3), 7, dtype=np.int32)
    f = token_views(buf, 32, 4, 3)
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
    assert (f["input_ids"][16:] == 7).all()  # past the graph's size: not read
    assert f["context_lens"].tolist() == [5, 9, 0, 0]
    # rows 4..16 are sequence 2 (no context: its attention is zero); sequence 3 is empty
    assert f["query_start_loc"].tolist() == [0, 3, 4, 16, 16]
    assert f["block_tables"][:2].tolist() == [[2, 0, 0], [4, 5, 0]]
    assert (f["block_tables"][2:] == 7).all()  # no program reads them: left as they were, not copied
    assert n == f["block_tables_offset"] + 2 * 3 and f["block_tables_offset"] + 4 * 3 == len(buf)


def test_step_without_pending_ids_and_exact_size():
    buf = np.zeros(token_views_size(16, 2, 2), dtype=np.int32)
    f = token_views(buf, 16, 2, 2)
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
