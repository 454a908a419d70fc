import ast
import json
import random
import re
import unicodedata

import pytest

import checkpoint
from checkpoint import bytes_to_unicode, load_tokenizer, write_byte_tokenizer
from model import Config


MULTILINGUAL = [
    "Café naïve façade, Ångström, Œuvre, straße, İstanbul",
    "深度学习模型的推测解码。你好，世界！",
    "日本語のテキスト、カタカナとひらがな。",
    "مرحبا بالعالم، هذا اختبار.",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "Привет, мир! Ёжик в тумане.",
    "Emoji: 😀👍🏽 👩‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇫🇷 ❤️",
    "def f(x):\n\treturn x ** 2  # square\r\n\n\n    if x:\n\t\tpass\n",
    "spaces   and\t\ttabs \u00a0nbsp\u3000ideographic   \n  \n",
    "numbers 3.14159 1,000,000 -42 0x1F 2024-01-01 ½ ²",
    "combining: e\u0301 a\u0308 n\u0303 o\u0302\u0323 Z\u0335\u0327",
    "I'm, you're, he'll, they've, she'd, it's DON'T",
]


@pytest.fixture(scope="module")
def sdar(sdar_files):
    return load_tokenizer(sdar_files)


@pytest.fixture
def toy(tmp_path):
    write_byte_tokenizer(tmp_path)
    return load_tokenizer(tmp_path)


def test_known_encoding(sdar):
    assert sdar.encode("Hello world!") == [9707, 1879, 0]


def test_chat_prompt(sdar):
    ids = sdar.chat("hi")
    assert ids[:3] == [151644, 872, 198]  # <|im_start|>user\n
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|>assistant\n
    assert sdar.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with_system = sdar.chat("hi", system="Be brief.")
    assert with_system[:3] == sdar.encode("<|im_start|>system\n")
    assert with_system[-len(ids):] == ids


def test_added_tokens_in_text_are_single_ids(sdar):
    assert 151669 in sdar.encode("a<|MASK|>b")
    assert sdar.encode("<think>") == [151667]
    assert sdar.encode("x<|im_end|>y") == [sdar.encode("x")[0], 151645, sdar.encode("y")[0]]


def test_nfc(sdar):
    assert sdar.encode("e\u0301") == sdar.encode("\u00e9")


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_round_trip(sdar, text):
    assert sdar.decode(sdar.encode(text)) == unicodedata.normalize("NFC", text)


def test_specials_stop_and_mask(sdar):
    assert sdar.stop_ids == (151645, 151643)
    assert sdar.mask_id == 151669
    # added_tokens_decoder wins over added_tokens.json, which spells the mask <MASK>
    assert "<MASK>" not in sdar.specials
    assert sorted(sdar.specials.values()) == list(range(151643, 151670))
    assert sdar.vocab_size == 151670
    # the inverse byte table turns ids 0..255 into exactly the 256 single bytes
    assert sorted(sdar.enc.decode_single_token_bytes(i) for i in range(256)) == [bytes([b]) for b in range(256)]
    assert sdar.decode([151669]) == "<|MASK|>"
    assert sdar.decode([151667, 151645]) == "<think><|im_end|>"


def test_pattern_splits(sdar):
    pieces = lambda text: [sdar.decode([i]) for i in sdar.encode(text)]
    assert pieces("12345") == ["1", "2", "3", "4", "5"]  # \p{N} is one digit
    assert pieces("   x") == ["  ", " x"]  # \s+(?!\S) leaves the last space to the word
    assert pieces("a\n\n\nb") == ["a", "\n\n\n", "b"]  # \s*[\r\n]+
    assert pieces("DON'T") == ["DON", "'T"]  # contractions are case-insensitive


def test_invalid_utf8_decodes_to_replacement(sdar):
    ids = sdar.encode("\U00013000")  # a hieroglyph: 4 UTF-8 bytes over 3 tokens
    assert len(ids) == 3 and sdar.decode(ids) == "\U00013000"
    assert sdar.decode(ids[:1]) == "\ufffd"


def test_added_tokens_json_fallback(tmp_path):
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    vocab["ab"] = 256  # merge 0
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    added = {"<|endoftext|>": 257, "<|im_end|>": 258, "<MASK>": 259}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.mask_id == 259
    assert tok.stop_ids == (258, 257)  # no generation_config.json: <|im_end|>, <|endoftext|>
    assert tok.encode("ab<MASK>a") == [256, 259, ord("a")]


def test_byte_round_trip(toy):
    rng = random.Random(0)
    for _ in range(200):
        # any code point but surrogates, which cannot be UTF-8 encoded
        text = "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD800),
                                       rng.randrange(0xE000, 0x110000)]))
                       for _ in range(rng.randrange(1, 30)))
        ids = toy.encode(text)
        nfc = unicodedata.normalize("NFC", text)
        assert ids == list(nfc.encode("utf-8"))  # each byte is one token, id = byte value
        assert toy.decode(ids) == nfc


def test_byte_specials(toy):
    assert toy.encode("<|im_start|>hi<|im_end|>") == [257, ord("h"), ord("i"), 258]
    assert toy.stop_ids == (258, 256)
    assert toy.mask_id == 259
    assert toy.vocab_size == 260
    assert toy.decode([259, 256]) == "<|MASK|><|endoftext|>"
    assert toy.decode([0xC3]) == "\ufffd"


def test_missing_vocab_raises(tmp_path, refuses):
    with refuses(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path)


def test_tokenizer_without_mask_loads(tmp_path):
    """An autoregressive tokenizer (Qwen3's kind) has no mask token: mask_id is None, the rest works."""
    write_byte_tokenizer(tmp_path, specials=("<|endoftext|>", "<|im_end|>"))
    tok = load_tokenizer(tmp_path)
    assert tok.mask_id is None and tok.stop_ids == (257, 256)
    assert tok.encode("a<|im_end|>") == [ord("a"), 257]


def test_missing_stop_raises(tmp_path, refuses):
    write_byte_tokenizer(tmp_path, specials=("<|MASK|>",), stop=())
    with refuses(ValueError, match="no stop token.*generation_config.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["vocab.json", "tokenizer_config.json", "generation_config.json"])
def test_file_that_is_not_json_is_named(tmp_path, name, refuses):
    write_byte_tokenizer(tmp_path)
    (tmp_path / name).write_text('{"eos_token_id": ')
    with refuses(ValueError, match=re.escape(str(tmp_path / name)) + " is not valid JSON"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- vocabulary cover

def test_byte_tokenizers_cover(tmp_path):
    """A mask on top of the same bytes and specials still covers; a vocabulary with two bytes traded does not."""
    draft = load_tokenizer(write_byte_tokenizer(tmp_path / "draft"))  # <|MASK|> after the three below
    target = load_tokenizer(write_byte_tokenizer(tmp_path / "target", ("<|endoftext|>", "<|im_start|>",
                                                                      "<|im_end|>")))
    assert draft.covers(target) and draft.covers(draft) and not target.covers(draft)
    write_byte_tokenizer(tmp_path / "traded")
    vocab = json.loads((tmp_path / "traded" / "vocab.json").read_text(encoding="utf-8"))
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (tmp_path / "traded" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    traded = load_tokenizer(tmp_path / "traded")
    assert traded.specials == draft.specials
    assert not draft.covers(traded) and not traded.covers(draft)


def sdar_folder_with(sdar_files, path, edit):
    """The SDAR tokenizer folder with its tokenizer_config.json edited (the large files linked, not copied)."""
    path.mkdir()
    config = json.loads((sdar_files / "tokenizer_config.json").read_text(encoding="utf-8"))
    edit(config)
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for name in ("vocab.json", "generation_config.json"):
        (path / name).symlink_to(sdar_files / name)
    return path


def drop_mask(config):
    """Qwen3's tokenizer_config.json is SDAR's without <|MASK|>."""
    del config["added_tokens_decoder"]["151669"]
    del config["mask_token"]
    config["additional_special_tokens"].remove("<|MASK|>")


@pytest.fixture(scope="module")
def qwen3(sdar_files, tmp_path_factory):
    return load_tokenizer(sdar_folder_with(sdar_files, tmp_path_factory.mktemp("q") / "qwen3", drop_mask))


def test_sdar_covers_qwen3_not_the_reverse(sdar, qwen3):
    """SDAR's tokens are Qwen3's (specials 151643..151668) plus <|MASK|> = 151669."""
    assert qwen3.mask_id is None and sorted(qwen3.specials.values()) == list(range(151643, 151669))
    assert sdar.covers(qwen3) and sdar.covers(sdar) and qwen3.covers(qwen3)
    assert not qwen3.covers(sdar)  # <|MASK|> is not a Qwen3 token


def test_a_moved_special_breaks_cover(sdar, qwen3, tmp_path, sdar_files):
    """One special at another id is enough to refuse, whichever side has it."""
    def move_think(config):
        drop_mask(config)
        config["added_tokens_decoder"]["151670"] = config["added_tokens_decoder"].pop("151667")
    moved = load_tokenizer(sdar_folder_with(sdar_files, tmp_path / "moved", move_think))
    assert moved.id_of("<think>") == 151670
    assert not sdar.covers(moved) and not moved.covers(qwen3) and not qwen3.covers(moved)


def test_byte_tokenizer_and_sdar_do_not_cover(sdar, toy):
    assert not sdar.covers(toy) and not toy.covers(sdar)


# ----------------------------------------------------------------------------- chat template

# The pieces chat() emits, as the SDAR/Qwen3 chat template spells them (jinja expressions).
SYSTEM = r"'<|im_start|>system\n' + messages[0].content + '<|im_end|>\n'"
TURN = r"'<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n'"
PROMPT = r"'<|im_start|>assistant\n'"
NO_THINK = r"'<think>\n\n</think>\n\n'"


def render(expr, names):
    """Evaluate a template expression of quoted literals and names joined by ' + '."""
    return "".join(names[p] if p in names else ast.literal_eval(p) for p in expr.split(" + "))


@pytest.fixture(scope="module")
def template(sdar_files):
    return json.loads((sdar_files / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]


def test_template_has_the_pieces(template):
    """The template writes these pieces as given, and the empty think block right after the prompt."""
    assert "{{- " + SYSTEM + " }}" in template and "{{- " + TURN + " }}" in template
    generation = ["{%- if add_generation_prompt %}", "{{- " + PROMPT + " }}",
                  "{%- if enable_thinking is defined and enable_thinking is false %}", "{{- " + NO_THINK + " }}"]
    assert re.search(r"\s*".join(map(re.escape, generation)), template)


@pytest.mark.parametrize("system", [None, "Be brief."])
@pytest.mark.parametrize("thinking", [True, False])
def test_chat_follows_the_template(sdar, system, thinking):
    """chat() is the template's text for one user turn, with or without a system message and thinking."""
    text = render(SYSTEM, {"messages[0].content": system}) if system is not None else ""
    text += render(TURN, {"message.role": "user", "message.content": "hi"}) + render(PROMPT, {})
    text += "" if thinking else render(NO_THINK, {})
    ids = sdar.chat("hi", system=system, enable_thinking=thinking)
    assert ids == sdar.encode(text) and sdar.decode(ids) == text
    tail = [151644, 77091, 198] + ([] if thinking else [151667, 271, 151668, 271])  # <think> \n\n </think> \n\n
    assert ids[-len(tail):] == tail


# ----------------------------------------------------------------------------- fields checked

def edit_json(path, edit):
    obj = json.loads(path.read_text(encoding="utf-8"))
    edit(obj)
    path.write_text(json.dumps(obj), encoding="utf-8")


def added(key, value):
    return lambda d: d["added_tokens_decoder"].update({key: value})


@pytest.mark.parametrize("name,edit,message", [
    ("vocab.json", lambda d: d.update({"a\u4e00": 300}),
     "the token 'a\u4e00' is not written in the byte-level alphabet .* of Qwen's vocab.json"),
    ("vocab.json", lambda d: d.update({"": 300}), "the token '' is not written in the byte-level"),
    ("vocab.json", lambda d: d.update(ab="300"), r"the token 'ab' has id '300', not an integer from 0 to 4294967295\."),
    ("vocab.json", lambda d: d.update(ab=-1), r"the token 'ab' has id -1, not an integer"),
    ("vocab.json", lambda d: d.update(ab=97), r"gives id 97 to both 'a' and 'ab'; each token needs an id of its own\."),
    ("vocab.json", lambda d: d.pop("a"), r"lacks 1 of the 256 single bytes \(the first is 0x61\); a byte-level"),
    ("tokenizer_config.json", lambda d: d.update(added_tokens_decoder=["<|im_end|>"]),
     r"added_tokens_decoder must be an object from ids to tokens\."),
    ("tokenizer_config.json", added("x", {"content": "<y>"}), "the added_tokens_decoder entry 'x' is not an id"),
    ("tokenizer_config.json", added("-3", {"content": "<y>"}), "the added_tokens_decoder entry '-3' is not an id"),
    ("tokenizer_config.json", added("300", "<y>"), "the added_tokens_decoder entry '300' is not an id that maps"),
    ("tokenizer_config.json", added("300", {"content": 5}), "the added_tokens_decoder entry '300' is not an id"),
    ("tokenizer_config.json", added("300", {"content": ""}), r"the added token 300 is empty; give it its text\."),
    ("tokenizer_config.json", added("300", {"content": "<|im_end|>"}),
     r"lists the added token '<\|im_end\|>' twice, as ids 258 and 300; give it one\."),
    ("tokenizer_config.json", added("65", {"content": "<y>"}),
     r"the added token '<y>' has id 65, which vocab.json gives to another token"),
    ("generation_config.json", lambda d: d.update(eos_token_id="258"),
     r"eos_token_id must be a token id or a list of them; got '258'\."),
    ("generation_config.json", lambda d: d.update(eos_token_id=True), "eos_token_id must be a token id .*; got True"),
    ("generation_config.json", lambda d: d.update(eos_token_id=[258, "256"]), "eos_token_id must be a token id"),
    ("generation_config.json", lambda d: d.update(eos_token_id=5000),
     r"eos_token_id 5000 is no token of this tokenizer \(vocab.json and its added tokens\)"),
    ("generation_config.json", lambda d: d.update(eos_token_id=[258, -1]), "eos_token_id -1 is no token"),
])
def test_each_field_read_is_checked_and_named(tmp_path, name, edit, message, refuses):
    """A field of the wrong type or out of range is one sentence naming its file, not a KeyError, a
    tiktoken panic, a hang or a tokenizer that never stops."""
    write_byte_tokenizer(tmp_path)
    edit_json(tmp_path / name, edit)
    with refuses(ValueError, match=re.escape(str(tmp_path / name)) + ".*" + message):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("added,message", [
    ({"<|im_end|>": "258"}, r"the token '<\|im_end\|>' has id '258', not an integer"),
    ({"<|im_end|>": 258, "<MASK>": 258}, r"gives id 258 to both '<\|im_end\|>' and '<MASK>'"),
    ({"": 258}, "the added token 258 is empty")])
def test_added_tokens_json_is_checked_too(tmp_path, added, message, refuses):
    """The older added_tokens.json, read when tokenizer_config.json has no added_tokens_decoder."""
    write_byte_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    with refuses(ValueError, match=re.escape(str(tmp_path / "added_tokens.json")) + ".*" + message):
        load_tokenizer(tmp_path)


def config(**kw):
    return Config(**{"vocab_size": 260, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "mask_token_id": 259, **kw})


def test_a_tokenizer_must_fit_its_config(toy, tmp_path, refuses):
    """check_tokenizer: every id inside vocab_size, and an SDAR model's mask_token_id the tokenizer's
    <|MASK|> (a wrong one decodes garbage, a missing one cannot decode); a Qwen3 model needs no mask."""
    checkpoint.check_tokenizer(config(), toy)
    checkpoint.check_tokenizer(config(vocab_size=300, model_type="qwen3", mask_token_id=None), toy)
    cases = [(config(vocab_size=259, mask_token_id=None), r"its tokenizer has ids up to 259 but its config.json's "
              r"vocab_size is 259; the two come from different models\."),
             (config(mask_token_id=258), r"its config.json gives mask_token_id 258 but the tokenizer's <\|MASK\|> is "
              r"id 259; set mask_token_id to 259\."),
             (config(mask_token_id=None), r"its config.json has no mask_token_id but the tokenizer's <\|MASK\|> is "
              r"id 259")]
    for c, message in cases:
        with refuses(ValueError, match="^" + message):
            checkpoint.check_tokenizer(c, toy)
    no_mask = load_tokenizer(write_byte_tokenizer(tmp_path, specials=("<|endoftext|>", "<|im_end|>")))
    with refuses(ValueError, match=r"says model_type 'sdar' but its tokenizer defines no mask token \(<\|MASK\|>\)"):
        checkpoint.check_tokenizer(config(vocab_size=300, mask_token_id=None), no_mask)
