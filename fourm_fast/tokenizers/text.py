"""WordPiece text tokenizer with 4M's special-token layout, trained with the `tokenizers` library.

Ids, in order: [PAD]=0, [UNK]=1, [SOS]=2, [EOS]=3, the sentinels [S_0] ... [S_{n-1}] (4M's span
masking writes [S_1], [S_2], ...), the box coordinate tokens v0=0 ... v3=999 (one token per
quantised corner value, as 4M's det text uses them), then the class names given, then the learned
WordPiece vocabulary. Coordinates and class names are single tokens, so box text round-trips.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL = ["[PAD]", "[UNK]", "[SOS]", "[EOS]"]


def special_tokens(num_sentinels: int = 200, class_names: Iterable[str] = ()) -> list[str]:
    coords = [f"v{k}={v}" for k in range(4) for v in range(1000)]
    return SPECIAL + [f"[S_{i}]" for i in range(num_sentinels)] + coords + list(class_names)


class TextTokenizer:
    """Thin wrapper: encode/decode, the sentinel ids in 4M's order, pad/eos ids, save/load."""

    def __init__(self, tokenizer, num_sentinels: int):
        missing = [t for t in SPECIAL + [f"[S_{i}]" for i in range(num_sentinels)] if tokenizer.token_to_id(t) is None]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ValueError(f"the text tokenizer lacks {shown} (num_sentinels {num_sentinels})")
        self.tk = tokenizer
        self.num_sentinels = num_sentinels
        self.pad_id = tokenizer.token_to_id("[PAD]")
        self.eos_id = tokenizer.token_to_id("[EOS]")
        self.sentinel_ids = [tokenizer.token_to_id(f"[S_{i}]") for i in range(num_sentinels)]

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        ids = self.tk.encode(text).ids
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: list[int]) -> str:
        """Text of the ids; [PAD], [SOS] and [EOS] dropped, sentinels shown as [S_i]."""
        drop = {self.pad_id, self.eos_id, self.tk.token_to_id("[SOS]")}
        return self.tk.decode([i for i in ids if i not in drop], skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.tk.save(str(path))

    @classmethod
    def load(cls, path: str | Path, num_sentinels: int | None = None) -> "TextTokenizer":
        """num_sentinels: None counts the file's [S_0], [S_1], ... tokens; a number is checked."""
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"text tokenizer {path} does not exist")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the tokenizers package raises a bare Exception
            raise ValueError(f"text tokenizer {path} cannot be read: {e}") from None
        if num_sentinels is None:
            num_sentinels = 0
            while tok.token_to_id(f"[S_{num_sentinels}]") is not None:
                num_sentinels += 1
        try:
            return cls(tok, num_sentinels)
        except ValueError as e:
            raise ValueError(f"text tokenizer {path}: {e}") from None


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8000, num_sentinels: int = 200,
                    class_names: Iterable[str] = ()) -> TextTokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = special_tokens(num_sentinels, class_names)
    if vocab_size <= len(specials):
        raise ValueError(f"vocab_size {vocab_size} must exceed the {len(specials)} special tokens")
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()
    # Coordinates and class names match whole words only: added tokens otherwise match anywhere,
    # and "circles" became the class token "circle" and "s".
    words = len(SPECIAL) + num_sentinels
    specials = specials[:words] + [AddedToken(t, single_word=True, special=True) for t in specials[words:]]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    tk.train_from_iterator(texts, trainer)
    return TextTokenizer(tk, num_sentinels)
