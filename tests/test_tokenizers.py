"""Word-level tokenizer (procedural world) and the transformers CLIPTokenizer wrapper share one interface."""

import json
import string

import numpy as np
import pytest

from metalora.models import tokenizers
from metalora.models.tokenizers import BOS_TOKEN, EOS_TOKEN, HFCLIPTokenizer, UnknownWordError, WordTokenizer

WORDS = ["a", "photo", "of", "person", "with", "red", "hat", "smiling", "t-shirt", ",", "background", "blue"]


def test_layout_matches_clip_convention():
    tok = WordTokenizer(WORDS, max_length=10)
    ids = tok.tokenize(["a photo of sks person", "A  PHOTO, smiling"])
    assert ids.dtype == np.int32 and ids.shape == (2, 10)
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1 and tok.pad_token_id == 1  # CLIP pads with EOS
    word = tok.token_to_id
    np.testing.assert_array_equal(
        ids[0], [0, word("a"), word("photo"), word("of"), word("sks"), word("person"), 1, 1, 1, 1])
    np.testing.assert_array_equal(ids[1], [0, word("a"), word("photo"), word(","), word("smiling"), 1, 1, 1, 1, 1])
    assert tok.tokens[:2] == (BOS_TOKEN, EOS_TOKEN)
    # "," is both a vocabulary word here and default punctuation: it is counted once.
    assert tok.vocab_size == 2 + len(tokenizers.DEFAULT_RARE_TOKENS) + len(tokenizers.DEFAULT_PUNCTUATION) + len(
        WORDS) - 1
    assert WordTokenizer(WORDS, punctuation=()).vocab_size == tok.vocab_size - 1  # only "." is gone


def test_round_trip_and_hyphenated_words():
    tok = WordTokenizer(WORDS, max_length=13)
    text = "a photo of sks person with red t-shirt , blue background"
    assert tok.decode(tok.tokenize([text])[0]) == text


def test_unknown_word_names_the_word_or_maps_to_unk():
    tok = WordTokenizer(WORDS, max_length=10)
    with pytest.raises(UnknownWordError, match="'green'") as err:
        tok.tokenize(["a photo of green hat"])
    assert "a photo of green hat" in str(err.value)
    lenient = WordTokenizer(WORDS, max_length=10, unk_token="<|unk|>")
    ids = lenient.tokenize(["a green hat"])[0]
    assert ids[2] == lenient.unk_token_id != lenient.token_to_id("hat")


def test_separate_pad_token_and_custom_rare_tokens():
    tok = WordTokenizer(WORDS, max_length=8, pad_token="<|pad|>", rare_tokens=("sks", "qzx"))
    ids = tok.tokenize(["qzx person"])[0]
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    np.testing.assert_array_equal(ids[3:], [tok.eos_token_id] + [tok.pad_token_id] * 4)
    assert tok.decode(ids) == "qzx person"
    with pytest.raises(UnknownWordError, match="ohwx"):
        tok.tokenize(["ohwx person"])


def test_too_long_raises_or_truncates_like_sd():
    strict = WordTokenizer(WORDS, max_length=5)
    with pytest.raises(ValueError, match="max_length=5"):
        strict.tokenize(["a photo of a person"])
    cut = WordTokenizer(WORDS, max_length=5, truncate=True).tokenize(["a photo of a person"])[0]
    assert cut[0] == 0 and cut[-1] == 1 and len(cut) == 5  # EOS is kept, as in SD's tokenizer


def test_bad_construction_and_inputs():
    with pytest.raises(ValueError, match="sks"):
        WordTokenizer([*WORDS, "sks"])
    with pytest.raises(ValueError, match="'two words'"):
        WordTokenizer(["two words"])
    with pytest.raises(TypeError, match="list"):
        WordTokenizer(WORDS).tokenize("a photo")


def test_save_load_round_trip(tmp_path):
    tok = WordTokenizer(WORDS, max_length=9, rare_tokens=("sks", "zwx"), unk_token="<|unk|>")
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = WordTokenizer.load(path)
    assert loaded.tokens == tok.tokens and loaded.max_length == 9 and loaded.unk_token_id == tok.unk_token_id
    texts = ["a photo of zwx person", "blue hat"]
    np.testing.assert_array_equal(loaded.tokenize(texts), tok.tokenize(texts))


def test_load_rejects_foreign_or_tampered_files(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text(json.dumps({"vocab": {"a": 0}}))
    with pytest.raises(ValueError, match="format"):
        WordTokenizer.load(path)
    data = WordTokenizer(WORDS).to_dict()
    data["tokens"] = data["tokens"][::-1]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="inconsistent"):
        WordTokenizer.load(path)


@pytest.fixture
def clip_tokenizer_folder(tmp_path):
    """A tiny byte-level BPE vocabulary in SD's layout: <model>/tokenizer/{vocab,merges}.json/txt."""
    vocab = {}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    merges = ["p h", "ph o", "t o</w>", "pho to</w>", "s k", "sk s</w>"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab[BOS_TOKEN], vocab[EOS_TOKEN] = len(vocab), len(vocab) + 1
    folder = tmp_path / "model" / "tokenizer"
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    return tmp_path / "model", vocab


def test_hf_clip_tokenizer_wrapper(clip_tokenizer_folder):
    model_folder, vocab = clip_tokenizer_folder
    tok = HFCLIPTokenizer.from_folder(model_folder)
    assert tok.max_length == 8
    ids = tok.tokenize(["a photo of sks", "Photo"])
    assert ids.dtype == np.int32 and ids.shape == (2, 8)
    bos, eos = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
    np.testing.assert_array_equal(ids[0], [bos, vocab["a</w>"], vocab["photo</w>"], vocab["o"], vocab["f</w>"],
                                           vocab["sks</w>"], eos, eos])
    np.testing.assert_array_equal(ids[1], [bos, vocab["photo</w>"]] + [eos] * 6)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (bos, eos, eos)
    assert tok.decode(ids[0]) == "a photo of sks"
    long = tok.tokenize(["a a a a a a a a a a"])[0]
    assert long[-1] == eos and len(long) == 8  # truncated like diffusers' pipelines


def test_single_token_ids_for_textual_inversion(clip_tokenizer_folder):
    model_folder, vocab = clip_tokenizer_folder
    clip = HFCLIPTokenizer.from_folder(model_folder)
    assert clip.single_token_id("sks") == vocab["sks</w>"] and clip.single_token_id("photo") == vocab["photo</w>"]
    with pytest.raises(ValueError, match="'of' is 2 tokens"):
        clip.single_token_id("of")
    lenient = WordTokenizer(WORDS, max_length=10, unk_token="<|unk|>", rare_tokens=("sks",))
    assert lenient.single_token_id("hat") == lenient.token_to_id("hat")
    assert lenient.single_token_id("sks") == lenient.token_to_id("sks")
    with pytest.raises(ValueError, match="'green' is not a token"):  # not unk, which token_to_id would give
        lenient.single_token_id("green")


def test_hf_clip_tokenizer_errors(tmp_path, clip_tokenizer_folder):
    with pytest.raises(FileNotFoundError, match=r"vocab\.json"):
        HFCLIPTokenizer.from_folder(tmp_path / "nowhere")
    model_folder, _ = clip_tokenizer_folder
    (model_folder / "tokenizer" / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="max_length"):
        HFCLIPTokenizer.from_folder(model_folder)
    assert HFCLIPTokenizer.from_folder(model_folder, max_length=6).tokenize(["a"]).shape == (1, 6)


def test_both_tokenizers_satisfy_the_interface(clip_tokenizer_folder):
    model_folder, _ = clip_tokenizer_folder
    for tok in (WordTokenizer(WORDS, max_length=8), HFCLIPTokenizer.from_folder(model_folder)):
        assert isinstance(tok, tokenizers.Tokenizer)
        out = tok(["a photo"])
        assert out.shape == (1, tok.max_length) and out.dtype == np.int32
        assert int(out.max()) < tok.vocab_size


def test_procedural_world_captions_tokenize():
    """The data module's caption grammar, including its comma-separated phrases and the identifier token."""
    world = pytest.importorskip("metalora.data.world")
    tok = WordTokenizer(world.CAPTION_VOCABULARY, max_length=40)
    longest = world.make_caption({"glasses": "red", "hat": "orange", "expression": "neutral", "pose": "frontal",
                                  "lighting": "front", "background": "orange"}, identifier="sks")
    ids = tok.tokenize([longest])[0]
    assert tok.decode(ids) == longest.replace(",", " ,")
    n_tokens = int((ids != tok.pad_token_id).sum()) + 1  # + the EOS, which equals the pad id
    assert n_tokens <= 40
