"""kiln.tokenizer: Tokenizer (encode/decode/chat template/eos) and the streaming IncrementalDetokenizer."""

from __future__ import annotations

import json
import random

import pytest

from kiln.tokenizer import NO_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Unicode: café naïve Straße Ελληνικά русский العربية",
    "CJK 你好世界，こんにちは、안녕하세요。漢字かな交じり文",
    "Emoji 😀👍🏽🇫🇷 👨‍👩‍👧‍👦 ✨🔥 end",
    "Mixed: 12345 + 0.5 = ? 🤔 \t tabs\n\nnewlines  double  spaces",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
]


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


def stream(tok, ids, **kw):
    """Feed ids one at a time; return (deltas, detokenizer)."""
    d = IncrementalDetokenizer(tok, [1, 2, 3], **kw)
    deltas = [d.add([i]) for i in ids]
    deltas.append(d.flush())
    return deltas, d


# ----------------------------------------------------------------------------------------------- Tokenizer


def test_basics(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    im_end = tok.encode("<|im_end|>", add_special_tokens=False)
    assert im_end == [2]
    assert 2 in tok.eos_token_ids
    assert tok.has_chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode(text, add_special_tokens=False) == ids  # SmolLM2 adds no BOS


def test_decode_skips_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nHi!<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "assistant\nHi!"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nHi!<|im_end|>"


def test_chat_template_chatml(tok):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "2+2?"}]
    ids = tok.apply_chat_template(messages)
    expected = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tok.decode(ids, skip_special_tokens=False) == expected
    assert ids == tok.encode(expected, add_special_tokens=False)
    assert ids[0] == 1 and ids[:2] != [1, 1]  # template's <|im_start|> is the first token, no extra BOS
    assert ids.count(1) == 5

    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.decode(no_prompt, skip_special_tokens=False) == expected[: -len("<|im_start|>assistant\n")]


def test_chat_template_default_system_prompt(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_no_chat_template(tmp_path, default_model_dir):
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        (tmp_path / name).write_bytes((default_model_dir / name).read_bytes())
    cfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(tmp_path)
    assert not t.has_chat_template
    with pytest.raises(ValueError, match="This model does not support chat_template."):
        t.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert NO_CHAT_TEMPLATE == "This model does not support chat_template."


@pytest.mark.parametrize("tokenizer_class", ["TokenizersBackend", "PreTrainedTokenizerFast", "GPT2Tokenizer",
                                             "NoSuchTokenizer", None])
def test_the_named_class_loads_what_autotokenizer_loads(tmp_path, default_model_dir, tokenizer_class):
    """load_hf_tokenizer takes tokenizer_config.json's class (AutoTokenizer where it names none, or one transformers
    lacks): the same ids, specials and chat prompt as AutoTokenizer."""
    from transformers import AutoTokenizer

    from kiln.tokenizer import load_hf_tokenizer
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((default_model_dir / name).read_bytes())
    cfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    cfg.pop("tokenizer_class", None)
    if tokenizer_class:
        cfg["tokenizer_class"] = tokenizer_class
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, auto = load_hf_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for text in TEXTS:
        assert ours(text)["input_ids"] == auto(text)["input_ids"], text
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == \
        (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id)
    chat = [{"role": "user", "content": TEXTS[1]}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_eos_ids_union(tmp_path, default_model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((default_model_dir / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == [0, 7, 2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == [2]


def test_chat_template_adds_missing_bos_once(tok):
    """A tokenizer that adds BOS itself gets exactly one BOS, whether or not the template wrote one."""
    tok2 = Tokenizer(tok.hf, {})
    tok2._adds_bos = True
    plain = tok2.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert plain[0] == 1 and plain[1] != 1
    tok2.bos_token_id = 0  # pretend <|endoftext|> is BOS and the template does not write it
    ids = tok2.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids[:2] == [0, 1] and ids[1:] == plain


# ----------------------------------------------------------------------------------------------- detokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode(tok, text):
    ids = tok.encode(text)
    for skip in (True, False):
        deltas, d = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert d.text == "".join(deltas)
        assert d.token_ids == ids
        assert not any("\ufffd" in x for x in deltas)
        assert not d.stopped and d.stop_reason is None


def test_multibyte_characters_are_held_until_complete(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # a byte-level BPE splits the emoji over several tokens
    d = IncrementalDetokenizer(tok, [])
    deltas = [d.add([i]) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "😀"


def test_random_token_sequences(tok):
    """Random mixes of pieces of emoji / CJK / ASCII, fed in random chunk sizes."""
    rng = random.Random(1234)
    pieces = ["a", " the", "😀", "👍🏽", "你好", "世界", "é", "ß", " ", "\n", "🇫🇷", "한국어", "…", "—", "x1", "<|im_end|>"]
    for _ in range(30):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
        ids = tok.encode(text, add_special_tokens=False)
        d = IncrementalDetokenizer(tok, [])
        deltas, pos = [], 0
        while pos < len(ids):
            n = rng.randint(1, 3)
            deltas.append(d.add(ids[pos:pos + n]))
            pos += n
        deltas.append(d.flush())
        assert "".join(deltas) == tok.decode(ids), text
        assert not any("\ufffd" in x for x in deltas), text


def test_random_ids_never_emit_partial_chars_before_flush(tok):
    """Arbitrary token ids (bytes that may never form valid UTF-8): joined output still equals decode()."""
    rng = random.Random(7)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        deltas, _ = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids)
        for x in deltas[:-1]:
            assert not x.endswith("\ufffd")


def test_window_stays_small(tok):
    ids = tok.encode("word " * 300)
    d = IncrementalDetokenizer(tok, [])
    for i in ids:
        d.add([i])
        assert len(d._ids) - d._prefix_offset <= 2
    assert d.text == tok.decode(ids)


# ----------------------------------------------------------------------------------------------- stop strings


def test_stop_string_cuts_text(tok):
    ids = tok.encode("The answer is 42. Done. More text here.")
    deltas, d = stream(tok, ids, stop=[" Done"])
    assert d.stopped and d.stop_reason == " Done"
    assert "".join(deltas) == d.text == "The answer is 42."
    assert len(d.token_ids) < len(ids)  # stopped at the token completing the stop string
    assert d.add(ids[-3:]) == "" and d.flush() == ""


def test_stop_string_included(tok):
    ids = tok.encode("The answer is 42. Done. More text here.")
    deltas, d = stream(tok, ids, stop=["Done."], include_stop_str_in_output=True)
    assert "".join(deltas) == d.text == "The answer is 42. Done."
    assert d.stop_reason == "Done."


def test_stop_string_split_over_tokens(tok):
    text = "alpha beta<STOP>gamma"
    ids = tok.encode(text)
    stop = "<STOP>"
    assert len([t for t in tok.convert_ids_to_tokens(ids) if any(c in t for c in "<STOP>")]) > 1
    deltas, d = stream(tok, ids, stop=[stop])
    assert "".join(deltas) == "alpha beta" and d.stop_reason == stop
    assert all(stop[:2] not in x for x in deltas)


def test_partial_stop_match_is_released(tok):
    ids = tok.encode("one <ST two <STO three")
    deltas, d = stream(tok, ids, stop=["<STOP>"])
    assert not d.stopped
    assert "".join(deltas) == tok.decode(ids)
    # the partial match was held back and then released once it could no longer become "<STOP>"
    joined = ""
    held = False
    for x, upto in zip(deltas, range(1, len(ids) + 1)):
        joined += x
        full = tok.decode(ids[:upto])
        if len(joined) < len(full):
            held = True
            assert full.startswith(joined)
    assert held


def test_partial_stop_released_by_flush(tok):
    ids = tok.encode("the end <ST")
    d = IncrementalDetokenizer(tok, [], stop=["<STOP>"])
    text = "".join(d.add([i]) for i in ids)
    assert text == "the end "
    assert d.flush() == "<ST"
    assert d.text == "the end <ST" and not d.stopped


def test_earliest_of_several_stop_strings(tok):
    ids = tok.encode("a b c d e f")
    # the stop string completed first wins
    deltas, d = stream(tok, ids, stop=["e f", " c", "b c d"])
    assert d.text == "a b" and d.stop_reason == " c"
    # two completed by the same token: the one starting earlier wins
    deltas, d = stream(tok, ids, stop=[" c", "b c"])
    assert d.text == "a " and d.stop_reason == "b c"


def test_stop_string_at_start_and_unicode(tok):
    ids = tok.encode("你好世界😀 again")
    deltas, d = stream(tok, ids, stop=["世界"])
    assert d.text == "你好" and d.stopped
    deltas, d = stream(tok, ids, stop=["你"])
    assert d.text == "" and "".join(deltas) == "" and d.stop_reason == "你"


def test_stop_with_all_at_once(tok):
    ids = tok.encode("Hello there. STOP here")
    d = IncrementalDetokenizer(tok, [], stop=["STOP"])
    assert d.add(ids) == "Hello there. "
    assert d.stopped and d.text == "Hello there. "


def test_chat_template_errors_are_value_errors(tok):
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user"}])  # no content
