"""Specification of runner.tokenizer: Gemma-style sentencepiece models trained offline from the bundled corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.errors import CheckpointError
from runner.model.tokenizer import (
    BOS_ID,
    CORPUS_PATH,
    EOS_ID,
    PAD_ID,
    decode_tokens,
    encode_prompt,
    is_unknown,
    load_tokenizer,
    pad_sentencepiece,
    train_sentencepiece,
    unknown_token_text,
)

TINY_VOCAB = 512


@pytest.fixture(scope="module")
def corpus_lines() -> list[str]:
    return CORPUS_PATH.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory, corpus_lines: list[str]) -> Path:
    return train_sentencepiece(corpus_lines, TINY_VOCAB, tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path):
    return load_tokenizer(tokenizer_path)


def test_gemma_tokenizer_imports_with_the_pinned_sentencepiece_and_protobuf():
    from gemma import gm

    assert gm.text.Gemma2Tokenizer.special_tokens.BOS == BOS_ID


def test_bundled_corpus_is_40_to_80_kb_of_utf8_text():
    size = CORPUS_PATH.stat().st_size
    assert 40_000 <= size <= 80_000
    CORPUS_PATH.read_text(encoding="utf-8")


def test_trained_vocabulary_has_exactly_the_requested_size(tokenizer):
    assert tokenizer.vocab_size == TINY_VOCAB


def test_special_ids_are_gemmas(tokenizer):
    assert (PAD_ID, EOS_ID, BOS_ID) == (0, 1, 2)
    assert tokenizer.tokens[:4] == ["<pad>", "<eos>", "<bos>", "<unk>"]


def test_training_is_deterministic(tmp_path: Path, corpus_lines: list[str], tokenizer_path: Path):
    again = train_sentencepiece(corpus_lines, TINY_VOCAB, tmp_path / "again.model")
    assert again.read_bytes() == tokenizer_path.read_bytes()


def test_training_writes_no_stray_files(tmp_path: Path, corpus_lines: list[str]):
    train_sentencepiece(corpus_lines, TINY_VOCAB, tmp_path / "tokenizer.model")
    assert [path.name for path in tmp_path.iterdir()] == ["tokenizer.model"]


def test_a_vocabulary_the_text_cannot_fill_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="4096"):
        train_sentencepiece(["a few words only"], 4096, tmp_path / "tokenizer.model")
    assert not (tmp_path / "tokenizer.model").exists()


def test_a_vocabulary_without_room_for_the_byte_pieces_is_refused(tmp_path: Path, corpus_lines: list[str]):
    with pytest.raises(ValueError, match="byte"):
        train_sentencepiece(corpus_lines, 200, tmp_path / "tokenizer.model")


def test_encode_prompt_puts_bos_first_as_plain_ints(tokenizer):
    ids = encode_prompt(tokenizer, "We hold these truths")
    assert ids[0] == BOS_ID
    assert all(type(token) is int for token in ids)


@pytest.mark.parametrize(
    "text",
    [
        "We hold these truths to be self-evident.",
        "Two  spaces, a tab\tand a newline\nare kept.",
        "Naïve café, Grüße, 東京, emoji 🙂: unseen characters use byte fallback.",
    ],
)
def test_text_round_trips(tokenizer, text: str):
    assert decode_tokens(tokenizer, encode_prompt(tokenizer, text)) == text


def test_unseen_characters_become_byte_pieces_not_unk(tokenizer):
    ids = encode_prompt(tokenizer, "東")
    assert 3 not in ids
    assert [tokenizer.tokens[token] for token in ids[1:]] == ["<0xE6>", "<0x9D>", "<0xB1>"]


def test_special_tokens_decode_to_nothing(tokenizer):
    ids = encode_prompt(tokenizer, "liberty")
    assert decode_tokens(tokenizer, [PAD_ID, *ids, EOS_ID]) == "liberty"


def test_loading_a_missing_file_names_it(tmp_path: Path):
    with pytest.raises(CheckpointError, match="nowhere.model"):
        load_tokenizer(tmp_path / "nowhere.model")


def test_a_different_file_in_gemmas_cache_is_refused(tmp_path: Path, tokenizer_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "tokenizer").mkdir(parents=True)
    (cache / "tokenizer" / "tokenizer.model").write_bytes(b"another tokenizer")
    monkeypatch.setenv("GEMMA_CACHE_DIR", str(cache))
    with pytest.raises(CheckpointError, match="shadowed"):
        load_tokenizer(tokenizer_path)


def test_ids_without_a_piece_decode_to_a_visible_placeholder_between_the_text(tokenizer):
    ids = encode_prompt(tokenizer, "liberty and justice")[1:]
    beyond = [TINY_VOCAB, TINY_VOCAB + 127]
    text = decode_tokens(tokenizer, [*ids[:2], beyond[0], *ids[2:], beyond[1]])
    assert text == (decode_tokens(tokenizer, ids[:2]) + f"<unk-id:{beyond[0]}>" + decode_tokens(tokenizer, ids[2:])
                    + f"<unk-id:{beyond[1]}>")
    assert decode_tokens(tokenizer, [beyond[0]]) == unknown_token_text(beyond[0]) == f"<unk-id:{TINY_VOCAB}>"
    assert [is_unknown(tokenizer, token) for token in (0, TINY_VOCAB - 1, TINY_VOCAB, -1)] == [False, False, True, True]


def test_a_tokenizer_padded_with_filler_pieces_has_exactly_the_pieces_asked_for(tmp_path: Path, corpus_lines):
    path = train_sentencepiece(corpus_lines, TINY_VOCAB, tmp_path / "tokenizer.model")
    pad_sentencepiece(path, 2_000)
    padded = load_tokenizer(path)
    assert padded.vocab_size == 2_000
    assert padded.tokens[TINY_VOCAB] == f"<synthetic-{TINY_VOCAB}>"
    text = "We hold these truths to be self-evident."
    assert encode_prompt(padded, text) == encode_prompt(load_tokenizer(tokenizer_path_of(corpus_lines, tmp_path)),
                                                          text), "ordinary text never reaches the filler pieces"
    assert decode_tokens(padded, [1_999]) == "<synthetic-1999>"


def tokenizer_path_of(corpus_lines, tmp_path: Path) -> Path:
    return train_sentencepiece(corpus_lines, TINY_VOCAB, tmp_path / "plain.model")
