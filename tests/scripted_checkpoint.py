"""A tiny real checkpoint that writes what a test wants: a "bigram" model whose next token is a fixed
function of the current one.

Every attention output projection and MLP down projection is zero, so the residual stream at each
position is the current token's embedding; the untied head then scores token b by how close the
current token is to b's chosen predecessor. With nearly orthogonal random embeddings, greedy decoding
follows the chains given here exactly: real engine, real sampler, real detokenizer, scripted text.

Chains are lists of pieces; each piece is a token: a special token by its text, or a new plain added
token with that text. A piece may appear in one chain only (a token has one successor), except the
end markers, which only have predecessors.
"""

from __future__ import annotations

import json
import os

import torch

from param2moe.writer import preset_config, write_checkpoint


def write_scripted_checkpoint(out_dir: str, chains: dict[str, list[str]], entries: dict[str, str | int]
                              ) -> dict[str, int]:
    """chains: name -> pieces; entries: name -> the token (text of a piece, or an id) that starts it,
    i.e. the last token of a prompt that should make the model write that chain. Returns text -> id of
    every piece."""
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Tokenizer

    cfg = preset_config("tiny", {"tie_word_embeddings": False, "vocab_size": 1024, "max_position_embeddings": 1024})
    write_checkpoint(out_dir, cfg, seed=1)
    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    def single(text: str) -> int | None:
        found = tok.encode(text, add_special_tokens=False).ids
        return found[0] if len(found) == 1 and tok.decode(found, skip_special_tokens=False) == text else None

    pieces = {p for chain in chains.values() for p in chain} | {e for e in entries.values() if isinstance(e, str)}
    new = sorted(p for p in pieces if tok.token_to_id(p) is None and single(p) is None)
    tok.add_tokens([AddedToken(p, special=False, normalized=False, single_word=False) for p in new])
    assert tok.get_vocab_size(with_added_tokens=True) <= cfg.vocab_size
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    ids = {p: tok.token_to_id(p) if tok.token_to_id(p) is not None else single(p) for p in pieces}

    path = os.path.join(out_dir, "model.safetensors")
    w = load_file(path)
    for name in w:
        if name.endswith(("attention.dense.weight", "down_proj.weight")):
            w[name].zero_()
    w["model.norm.weight"].fill_(1.0)
    emb = w["model.word_embeddings.weight"].float()
    head = torch.zeros_like(emb)
    for name, chain in chains.items():
        entry = entries[name]
        prev = entry if isinstance(entry, int) else ids[entry]
        for piece in chain:
            e = emb[prev]
            head[ids[piece]] += 4.0 * e / e.norm()
            prev = ids[piece]
    w["lm_head.weight"] = head.to(w["lm_head.weight"].dtype)
    save_file(w, path, metadata={"format": "pt"})
    # Greedy by default, so that a request without temperature follows the script too.
    gen_path = os.path.join(out_dir, "generation_config.json")
    with open(gen_path) as f:
        gen = json.load(f)
    gen.update(temperature=0.0)
    gen.pop("top_k", None)
    gen.pop("top_p", None)
    with open(gen_path, "w") as f:
        json.dump(gen, f, indent=2)
    return ids
