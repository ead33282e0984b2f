"""Gemma2 tokenizers: loading a real `tokenizer.model` and training small offline ones for synthetic models.

Synthetic tokenizers keep Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and its byte fallback, so any text
round-trips even with a 512-piece vocabulary. gemma's tokenizer and its pitfalls: `docs/penzai-gemma2.md#tokenizer`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from gemma import gm

from runner.errors import CheckpointError, first_line
from runner.files import write_bytes_atomically

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3

#: Bundled public-domain and original English prose: trains synthetic tokenizers, serves as evaluation text.
CORPUS_PATH = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"
#: The bundled evaluation text (570 KB, `runner/data/EVAL_TEXT_SOURCES.md`): large enough to train the 16,384
#: pieces of the published-size synthetic tokenizers.
EVAL_TEXT_PATH = Path(__file__).resolve().parents[1] / "data" / "eval_text.txt"

#: The 256 `<0xNN>` byte pieces plus pad, eos, bos and unk.
MIN_VOCAB_SIZE = 256 + 4
#: How sentencepiece writes a space inside a piece (gemma's `tokens` show it as " ").
_SENTENCEPIECE_SPACE = "\u2581"

# Trainer options that mirror the published Gemma2 tokenizer: no normalisation, whitespace kept verbatim,
# digits split, unknown characters spelled as UTF-8 bytes.
_GEMMA_LIKE_TRAINER_OPTIONS = dict(
    model_type="bpe",
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    bos_id=BOS_ID,
    unk_id=UNK_ID,
    pad_piece="<pad>",
    eos_piece="<eos>",
    bos_piece="<bos>",
    unk_piece="<unk>",
    byte_fallback=True,
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    hard_vocab_limit=True,
    num_threads=1,
    minloglevel=2,
)


def train_sentencepiece(text_lines: Iterable[str], vocab_size: int, out_path: Path) -> Path:
    """Trains a Gemma-style BPE sentencepiece model on `text_lines` and writes it atomically to `out_path`.

    Training is deterministic: the same lines and vocab size give the same file bytes.

    Raises:
      ValueError: `vocab_size` is below `MIN_VOCAB_SIZE`, or the text is too small to reach it exactly.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is below {MIN_VOCAB_SIZE} (256 byte pieces + 4 special ids)")
    lines = [line.rstrip("\n") for line in text_lines]
    model_bytes = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model_bytes,
            vocab_size=vocab_size,
            **_GEMMA_LIKE_TRAINER_OPTIONS,
        )
    except RuntimeError as error:
        raise ValueError(f"cannot train a {vocab_size}-piece tokenizer on this text: {error}") from None
    piece_count = spm.SentencePieceProcessor(model_proto=model_bytes.getvalue()).GetPieceSize()
    if piece_count != vocab_size:
        raise ValueError(f"trained tokenizer has {piece_count} pieces, expected exactly {vocab_size}")
    write_bytes_atomically(Path(out_path), model_bytes.getvalue())
    return Path(out_path)


def load_tokenizer(path: Path) -> gm.text.Gemma2Tokenizer:
    """Loads a local sentencepiece file as a gemma `Gemma2Tokenizer`.

    gemma reads `$GEMMA_CACHE_DIR/tokenizer/<file name>` (default `~/.gemma`) instead of the given path when that
    file exists, so the vocabulary gemma loaded is checked against the file's own, read by sentencepiece.

    Raises:
      CheckpointError: the file is missing or not a sentencepiece model, or gemma's tokenizer cache holds a
        different file of the same name, which gemma would silently load instead.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tokenizer file {path} does not exist")
    try:
        processor = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        reason = first_line(str(error))
        raise CheckpointError(f"tokenizer file {path} is not a sentencepiece model ({reason})") from None
    tokenizer = gm.text.Gemma2Tokenizer(path=str(path))
    try:
        loaded = tokenizer.tokens
    except (RuntimeError, OSError):  # gemma read another file, which sentencepiece cannot parse
        loaded = None
    pieces = processor.id_to_piece(list(range(processor.get_piece_size())))
    if loaded != [piece.replace(_SENTENCEPIECE_SPACE, " ") for piece in pieces]:
        raise CheckpointError(
            f"tokenizer {path} is shadowed by a different {path.name} in gemma's tokenizer cache "
            "($GEMMA_CACHE_DIR/tokenizer, default ~/.gemma/tokenizer); remove that file or set GEMMA_CACHE_DIR"
        )
    return tokenizer


def pad_sentencepiece(path: Path, pieces: int) -> Path:
    """Appends filler pieces `<synthetic-N>` (user-defined symbols, never produced from ordinary text) to the
    sentencepiece model at `path` until it has `pieces` pieces, as Gemma's 256,000-piece tokenizer has far more
    pieces than any text bundled here could train; rewrites the file atomically."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(Path(path).read_bytes())
    lowest = min((piece.score for piece in model.pieces), default=0.0)
    for index in range(len(model.pieces), pieces):
        piece = model.pieces.add()
        piece.piece = f"<synthetic-{index}>"
        piece.score = lowest - 1.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    write_bytes_atomically(Path(path), model.SerializeToString())
    return Path(path)


def encode_prompt(tokenizer: gm.text.Tokenizer, text: str) -> list[int]:
    """Token ids of `text` with BOS first, as plain Python ints."""
    return [int(token) for token in tokenizer.encode(text, add_bos=True)]


def unknown_token_text(token_id: int) -> str:
    """What a token id without a piece reads as in decoded text: `<unk-id:256100>`."""
    return f"<unk-id:{int(token_id)}>"


def is_unknown(tokenizer: gm.text.Tokenizer, token_id: int) -> bool:
    """Whether `token_id` has no piece in the tokenizer (a padded embedding row, e.g. 256,000-256,127 of Gemma2's
    Kaggle checkpoints, or any id a larger model samples)."""
    return not 0 <= int(token_id) < tokenizer.vocab_size


def decode_tokens(tokenizer: gm.text.Tokenizer, ids: Sequence[int]) -> str:
    """Text of `ids`; special tokens (pad, bos, eos) decode to nothing. Never fails: an id without a piece shows
    as `unknown_token_text` (`<unk-id:N>`) between the decoded runs of known ids."""
    ids = [int(token) for token in ids]
    parts: list[str] = []
    run: list[int] = []
    for token in ids:
        if is_unknown(tokenizer, token):
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(unknown_token_text(token))
        else:
            run.append(token)
    if run:
        parts.append(tokenizer.decode(run))
    return "".join(parts)
