"""Tokenizers (tokenizer.json and raw bytes), the KV cache and single-process generation."""

from __future__ import annotations

import pytest
import torch

from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.models.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from shardwright.parallel.context import ParallelContext


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids == list("héllo ✓".encode())
    assert tok.decode(ids) == "héllo ✓"


def test_tokenizer_json_is_loaded_with_the_tokenizers_package(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.encode("the lazy fox") == tok.encode("the lazy fox").ids
    assert loaded.decode(loaded.encode("the lazy fox")) == "the lazy fox"
    assert isinstance(load_tokenizer(tmp_path / "absent"), ByteTokenizer)


def test_incremental_decoding_equals_full_recompute(checkpoints):
    """Each token from the KV-cache path equals argmax of a fresh full forward pass."""
    _, model = load_model(checkpoints["llama_gqa"], ParallelContext.single("cpu"))
    prompt = [5, 17, 42, 9, 100]
    tokens = greedy_generate(model, prompt, 12)
    seq = list(prompt)
    with torch.no_grad():
        for tok in tokens:
            logits = model.full_logits(model(torch.tensor([seq]), torch.arange(len(seq))[None]))
            assert int(logits[0, -1].argmax()) == tok
            seq.append(tok)


def test_generation_stops_at_stop_id_and_checks_length(checkpoints):
    _, model = load_model(checkpoints["gpt2"], ParallelContext.single("cpu"))
    full = greedy_generate(model, [1, 2, 3], 8)
    stopped = greedy_generate(model, [1, 2, 3], 8, stop_ids=[full[2]])
    assert stopped == full[: full.index(full[2]) + 1]
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        greedy_generate(model, [1] * 250, 10)
    with pytest.raises(ValueError, match="empty"):
        greedy_generate(model, [], 3)
