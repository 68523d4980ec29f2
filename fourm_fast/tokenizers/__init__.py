"""Tokenizers: WordPiece text with 4M's special-token layout (the VQ image tokenizer comes next)."""
from .text import TextTokenizer, special_tokens, train_wordpiece

__all__ = ["TextTokenizer", "special_tokens", "train_wordpiece"]
