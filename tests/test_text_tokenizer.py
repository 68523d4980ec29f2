"""WordPiece text tokenizer: 4M's special-token layout, round trips of captions and box text."""
import pytest

pytest.importorskip("tokenizers", reason="the tokenizers package is in requirements.txt")

from fourm_fast.data import make_sample, text_to_boxes  # noqa: E402
from fourm_fast.data.synthetic import SHAPES  # noqa: E402
from fourm_fast.tokenizers import TextTokenizer, train_wordpiece  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    texts = [make_sample(0, i, 8)["caption"] for i in range(300)]
    return train_wordpiece(texts, vocab_size=4400, num_sentinels=200, class_names=SHAPES)


def test_special_token_layout(tok):
    t = tok.tk
    assert [t.token_to_id(s) for s in ("[PAD]", "[UNK]", "[SOS]", "[EOS]")] == [0, 1, 2, 3]
    assert tok.sentinel_ids[:3] == [4, 5, 6] and tok.sentinel_ids[-1] == 203
    assert t.token_to_id("v0=0") == 204 and t.token_to_id("v3=999") == 204 + 3999
    assert t.token_to_id("circle") == 4204
    # class names and coordinates match whole words only: inside a longer word the pieces after
    # the first continue it (##), where "circles" was cut into the words "circle" and "s"
    for word in ("circles", "semicircle", "xv0=12"):
        pieces = tok.tk.encode(word).tokens
        assert all(p.startswith("##") for p in pieces[1:]), (word, pieces)
    assert tok.tk.encode("v0=12 circle").tokens == ["v0=12", "circle"]


def test_sentinels_match_inside_words_and_classes_do_not(tok):
    """Span masking writes sentinels next to text (4M's "a[S_1] red"): they match anywhere, while
    class names and coordinates match whole words only (test_special_token_layout)."""
    s1, s2 = tok.sentinel_ids[1], tok.sentinel_ids[2]
    ids = tok.encode("a[S_1] red[S_2]", add_eos=False)
    assert s1 in ids and s2 in ids and 1 not in ids  # no [UNK]
    assert tok.decode(ids).replace(" ", "") == "a[S_1]red[S_2]"


def test_captions_and_boxes_round_trip(tok, tmp_path):
    for i in range(300, 320):
        s = make_sample(0, i, 8)
        ids = tok.encode(s["caption"])
        assert ids[-1] == tok.eos_id and 1 not in ids  # no [UNK] for the world's words
        assert tok.decode(ids) == s["caption"]
        box_ids = tok.encode(s["det"], add_eos=False)
        assert len(box_ids) == 5 * len(text_to_boxes(s["det"])), "each corner and class is one token"
        assert tok.decode(box_ids) == s["det"]
        sos = tok.tk.token_to_id("[SOS]")
        assert tok.decode([sos] + ids + [tok.pad_id, tok.pad_id]) == s["caption"]  # [SOS], [EOS], [PAD] dropped
    tok.save(tmp_path / "text.json")
    again = TextTokenizer.load(tmp_path / "text.json")
    assert again.encode("a small red circle") == tok.encode("a small red circle")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="junk.json cannot be read"):  # not the package's bare Exception
        TextTokenizer.load(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="must exceed"):
        train_wordpiece(["a"], vocab_size=100)


def test_load_counts_the_sentinels_the_file_has(tmp_path):
    # a tokenizer trained with 50 sentinels loaded with the old default of 200 gave None ids
    small = train_wordpiece(["a red circle", "a blue square"] * 10, vocab_size=4200, num_sentinels=50)
    small.save(tmp_path / "text.json")
    again = TextTokenizer.load(tmp_path / "text.json")
    assert again.num_sentinels == 50 and again.sentinel_ids == small.sentinel_ids == list(range(4, 54))
    assert TextTokenizer.load(tmp_path / "text.json", num_sentinels=20).sentinel_ids == list(range(4, 24))
    with pytest.raises(ValueError, match=r"text.json: the text tokenizer lacks \[S_50\], \[S_51\], \[S_52\], \[S_53\] "
                                         r"and 6 more \(num_sentinels 60\)"):
        TextTokenizer.load(tmp_path / "text.json", num_sentinels=60)
