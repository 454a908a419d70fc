"""Checkpoints: a tiny safetensors reader and writer, SDAR/Qwen3 folders loaded and saved, the
tiktoken tokenizer built from a folder's vocab.json, and the check that a draft can propose to a target.

A model reader can skip this file: it is plumbing. Loading is a plain load_state_dict because
model.py's module tree mirrors the checkpoint's tensor names.
"""
import json
import math
import mmap
import os
import sys
import tempfile
import unicodedata
from dataclasses import asdict
from pathlib import Path

import tiktoken
import torch

from model import ARCHITECTURES, Config, Transformer, read_json

# ----------------------------------------------------------------------------- safetensors

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
assert sys.byteorder == "little", "safetensors data is little-endian, and so must this host be"


MAX_HEADER = 100_000_000  # bytes: the format's own limit, so a corrupt length is not read as one


def read_header(path):
    """{name: (dtype, shape, begin, end)} of a .safetensors file, every entry checked against the
    file, and where its data starts; reads the header alone."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise ValueError(f"{path} is truncated (its header does not fit in {size} bytes); "
                             "download or write it again.")
        if n > MAX_HEADER:
            raise ValueError(f"{path} claims a header of {n} bytes, more than the {MAX_HEADER} the "
                             "safetensors format allows; point at a .safetensors file.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the header is not JSON ({e}); point at a .safetensors "
                             "file.") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object; point at a .safetensors file.")
    header.pop("__metadata__", None)
    return {name: entry(path, name, info, size - 8 - n) for name, info in header.items()}, 8 + n


def entry(path, name, info, data):
    """(dtype, shape, begin, end) of one tensor's header entry, within the file's `data` bytes; a
    sentence naming the tensor and the field otherwise."""
    if not isinstance(info, dict):
        raise ValueError(f"{path}: the header's entry of tensor {name} is not an object; the file "
                         "is corrupt, download or write it again.")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    wants = {"dtype": "a name such as BF16", "shape": "a list of sizes, each an integer >= 0",
             "data_offsets": "two integers, where its data begins and ends"}
    valid = {"dtype": isinstance(dtype, str),
             "shape": isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape),
             "data_offsets": isinstance(offsets, list) and len(offsets) == 2 and all(
                 type(o) is int for o in offsets)}
    for field, ok in valid.items():
        if not ok:
            got = f"a {field} that is not {wants[field]}" if field in info else f"no {field}"
            raise ValueError(f"{path}: the header gives tensor {name} {got}; the file is corrupt, "
                             "download or write it again.")
    if dtype not in DTYPES:
        raise ValueError(f"{path}: tensor {name} has dtype {dtype}, which this loader does not "
                         f"support ({', '.join(DTYPES)}); convert the checkpoint to bf16.")
    (b, e), numel = offsets, math.prod(shape)  # Python's integers: a huge shape cannot overflow
    if not 0 <= b <= e <= data or e - b != numel * DTYPES[dtype].itemsize:
        raise ValueError(f"{path}: tensor {name} claims bytes [{b}, {e}) of {data} data bytes "
                         f"for shape {shape}; the offsets fall outside the file "
                         "(truncated or corrupt).")
    return DTYPES[dtype], shape, b, e


def read_safetensors(path, device="cpu", dtype=None):
    """{name: tensor} from a .safetensors file, each tensor copied once onto `device`."""
    header, start = read_header(path)
    out = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > start else b""
    for name, (t_dtype, shape, b, e) in header.items():
        numel = torch.Size(shape).numel()
        t = torch.frombuffer(buf, dtype=t_dtype, count=numel, offset=start + b) if numel else \
            torch.empty(0, dtype=t_dtype)
        out[name] = t.reshape(shape).to(device=device, dtype=dtype or t_dtype, copy=True)
    return out


def write_safetensors(tensors, path):
    """Write {name: tensor} in the standard format, atomically (temporary file, then rename)."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    names = {v: k for k, v in DTYPES.items()}
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned
    _atomic_write(path, [len(head).to_bytes(8, "little"), head, *blobs])


def _atomic_write(path, chunks):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; a checkpoint is an ordinary readable file
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise



# ----------------------------------------------------------------------------- load / save

def load_config(path) -> Config:
    """The Config of a checkpoint folder, from its config.json."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: point at an SDAR or Qwen3 checkpoint "
                                "folder (config.json + model.safetensors or "
                                "model.safetensors.index.json).")
    return Config.from_json(path / "config.json")


def weight_files(path):
    """The safetensors files of a checkpoint folder, each checked to be there."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            got = "no weight_map" if weight_map is None else "a weight_map that lists no tensor"
            raise ValueError(f"{index} has {got}; it must map each tensor name to its .safetensors "
                             "file, as the Hugging Face tools write it.")
        files = list(weight_map.values())
        if not all(isinstance(f, str) and f and Path(f).name == f for f in files):
            raise ValueError(f"{index}: each weight_map value must be the name of a .safetensors "
                             "file in the same folder.")
        files = sorted(set(files))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has config.json but no model.safetensors or "
                                "model.safetensors.index.json; the weights are missing.")
    for f in files:
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} is listed in model.safetensors.index.json but "
                                    "missing.")
    return files


def check_weights(path, config):
    """The safetensors files of a checkpoint folder, checked against its config from their headers
    alone, before any weight is read: exactly the model's tensors, each of its shape, in a floating
    point dtype."""
    path = Path(path)
    files = weight_files(path)
    found = {name: info[:2] for f in files for name, info in read_header(path / f)[0].items()}
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    if config.tie_word_embeddings:  # tied: the embedding serves as the head
        found.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    wrong = {"missing": sorted(set(expected) - set(found)),
             "unexpected": sorted(set(found) - set(expected)),
             "mis-shaped": sorted(f"{k} {tuple(found[k][1])} != {tuple(expected[k])}"
                                  for k in set(found) & set(expected)
                                  if tuple(found[k][1]) != expected[k]),
             "not floating point": sorted(f"{k} {found[k][0]}" for k in found
                                          if not found[k][0].is_floating_point)}
    listed = [f"{kind} {few(names)}" for kind, names in wrong.items() if names]
    if listed:
        raise ValueError(f"checkpoint {path} does not match its config.json: {', '.join(listed)}; "
                         "its weights and config.json must come from one model.")
    return files


def few(names, n=3):
    """A list short enough for a readable sentence: up to n names, else the count and n of them."""
    return str(names) if len(names) <= n else f"{len(names)} tensors, first {names[:n]}"


def load(path, device="cpu", dtype=None) -> Transformer:
    """Load an SDAR/Qwen3 checkpoint folder (config.json + model.safetensors or a sharded
    model.safetensors.index.json) straight onto `device`, in eval mode."""
    path = Path(path)
    config = load_config(path)
    files = check_weights(path, config)
    with torch.device("meta"):
        model = Transformer(config)  # no memory: the checkpoint's tensors are assigned below
    state = {}
    for f in files:
        state.update(read_safetensors(path / f, device, dtype))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding serves as the head
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().fuse()


def save(model: Transformer, path):
    """Write config.json + model.safetensors (tied head left out, as the standard tools do)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config = {"architectures": [ARCHITECTURES[model.config.model_type]], "torch_dtype": dtype,
              **{k: v for k, v in asdict(model.config).items() if v is not None}}
    write_safetensors(state, path / "model.safetensors")
    _write_json(path / "config.json", config)



def check_pair(target, draft, target_tok, draft_tok):
    """Raise ValueError unless a draft checkpoint can propose to a target checkpoint (speculative
    decoding): an SDAR model with a mask token, giving every token of the target the same id,
    trained with a diffusion target's block length and mask token."""
    if draft.config.model_type != "sdar" or draft_tok.mask_id is None:
        raise ValueError("the draft is not an SDAR model with a mask token; this project drafts "
                         "with diffusion models")
    if not draft_tok.covers(target_tok) or draft.config.vocab_size != target.config.vocab_size:
        raise ValueError("the draft does not give every token of the target the same id; "
                         "speculation needs one vocabulary")
    if target.config.model_type != "sdar":
        return
    if draft.config.block_size != target.config.block_size:
        raise ValueError(f"the draft was trained with {describe(draft.config.block_size)} and the "
                         f"target with {describe(target.config.block_size)}; they must match")
    if draft.config.mask_token_id != target.config.mask_token_id:
        raise ValueError("the draft and the target use different mask token ids")


def describe(block_size):
    return "no block_size in its config.json" if block_size is None else f"block {block_size}"


# ----------------------------------------------------------------------------- tokenizer

# Qwen2's pre-tokenizer split (also used by Qwen3/SDAR); note \p{N} takes one digit at a time.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def bytes_to_unicode():
    """GPT-2's byte -> printable character table that vocab.json is written in:
    printable bytes stand for themselves, the other 68 become chr(256 + k) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(others)}}


class Tokenizer:
    """A tiktoken Encoding and the SDAR facts around it: the mask id (None for Qwen3's), stop ids,
    the chat prompt."""

    def __init__(self, enc, specials, mask_id, stop_ids, ranks):
        self.enc = enc
        self.specials = dict(specials)  # name -> id for every added token
        self.mask_id = mask_id
        self.stop_ids = tuple(stop_ids)
        self.ranks = ranks  # byte string -> id of the base vocabulary, the Encoding's own dict

    @property
    def vocab_size(self):
        return self.enc.n_vocab  # ids the tokenizer knows; a model's embedding may be larger

    def id_of(self, name):
        return self.specials[name]

    def encode(self, text):
        # NFC first, as Qwen2Tokenizer does; then added tokens in the text become
        # single ids (HF splits them out of user text too) and the rest is BPE.
        return self.enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def decode(self, ids):
        # A token may hold half a UTF-8 character; a lone half decodes to U+FFFD.
        return self.enc.decode(list(ids), errors="replace")

    def chat(self, user, system=None, enable_thinking=True):
        """The Qwen3/SDAR chat template, add_generation_prompt=True (no BOS); thinking off adds the
        empty think block."""
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        text += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        return self.encode(text if enable_thinking else text + "<think>\n\n</think>\n\n")

    def covers(self, other):
        """True when each token of `other` has the same id here; extra specials here (SDAR's
        <|MASK|>) are fine."""
        same_specials = all(self.specials.get(name) == i for name, i in other.specials.items())
        return self.ranks == other.ranks and same_specials


MAX_ID = 2 ** 32 - 1  # tiktoken keeps ids as unsigned 32-bit integers


def is_id(value):
    return type(value) is int and 0 <= value <= MAX_ID


def load_tokenizer(path):
    """Build a Tokenizer from an HF folder (vocab.json + tokenizer_config.json).
    Ranks are ids: Qwen's merge i creates id 256 + i, so merges.txt need not be read."""
    path = Path(path)
    if not (path / "vocab.json").is_file():
        raise FileNotFoundError(f"{path / 'vocab.json'} not found; pass a model folder holding "
                                "the HF tokenizer files (vocab.json, tokenizer_config.json).")
    ranks = read_vocab(path / "vocab.json")
    specials, source = read_specials(path)
    taken = set(ranks.values())
    for name, i in specials.items():
        if i in taken:  # tiktoken would encode the name as this id and decode the other token
            raise ValueError(f"{source}: the added token {name!r} has id {i}, which vocab.json "
                             "gives to another token; each token needs an id of its own.")
    # spelled <|MASK|> in tokenizer_config.json, <MASK> in added_tokens.json; Qwen3's has none
    mask = next((specials[n] for n in ("<|MASK|>", "<MASK>") if n in specials), None)
    stop_ids = read_stop_ids(path, specials, taken | set(specials.values()))
    if not stop_ids:
        raise ValueError(f"{path} defines no stop token; set eos_token_id in its "
                         "generation_config.json.")
    enc = tiktoken.Encoding(path.name or "tokenizer", pat_str=QWEN2_PATTERN,
                            mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, specials, mask, stop_ids, ranks)


def read_vocab(file):
    """vocab.json as tiktoken's ranks, {token bytes: id}: each token in GPT-2's byte alphabet, each
    id its own (tiktoken panics on a shared one), and all 256 single bytes there (tiktoken panics
    on text that needs a missing one)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks, owner = {}, {}
    for token, i in read_json(file).items():
        if not token or not all(c in byte_of for c in token):
            raise ValueError(f"{file}: the token {token!r} is not written in the byte-level "
                             "alphabet (GPT-2's bytes_to_unicode) of Qwen's vocab.json; download "
                             "or write it again.")
        if not is_id(i):
            raise ValueError(f"{file}: the token {token!r} has id {i!r}, not an integer from 0 to "
                             f"{MAX_ID}.")
        if i in owner:
            raise ValueError(f"{file} gives id {i} to both {owner[i]!r} and {token!r}; each token "
                             "needs an id of its own.")
        owner[i] = token
        ranks[bytes(byte_of[c] for c in token)] = i
    lacking = [b for b in range(256) if bytes([b]) not in ranks]
    if lacking:
        raise ValueError(f"{file} lacks {len(lacking)} of the 256 single bytes (the first is "
                         f"{lacking[0]:#04x}); a byte-level vocabulary holds them all, so that any "
                         "text can be encoded.")
    return ranks


def read_specials(path):
    """({name: id} of the added tokens, the file they come from): tokenizer_config.json's
    added_tokens_decoder, the authoritative list, else added_tokens.json, its older spelling."""
    source = path / "tokenizer_config.json"
    decoder = read_json(source).get("added_tokens_decoder") if source.is_file() else None
    if decoder:
        if not isinstance(decoder, dict):
            raise ValueError(f"{source}: added_tokens_decoder must be an object from ids to "
                             "tokens.")
        pairs = [(t.get("content") if isinstance(t, dict) else None, i) for i, t in decoder.items()]
        for name, i in pairs:
            if not (i.isascii() and i.isdigit() and len(i) <= 10 and is_id(int(i))
                    and isinstance(name, str)):
                raise ValueError(f"{source}: the added_tokens_decoder entry {i!r} is not an id "
                                 "that maps to an object with a content string, as in "
                                 '"151643": {"content": "<|endoftext|>"}.')
        pairs = [(name, int(i)) for name, i in pairs]
    else:
        source = path / "added_tokens.json"
        pairs = list(read_json(source).items()) if source.is_file() else []
        for name, i in pairs:
            if not is_id(i):
                raise ValueError(f"{source}: the token {name!r} has id {i!r}, not an integer "
                                 f"from 0 to {MAX_ID}.")
    specials, names = {}, {}
    for name, i in pairs:
        if not name:  # tiktoken never returns from encoding text with an empty special
            raise ValueError(f"{source}: the added token {i} is empty; give it its text.")
        if name in specials:
            raise ValueError(f"{source} lists the added token {name!r} twice, as ids "
                             f"{specials[name]} and {i}; give it one.")
        if i in names:
            raise ValueError(f"{source} gives id {i} to both {names[i]!r} and {name!r}; each "
                             "token needs an id of its own.")
        specials[name], names[i] = i, name
    return specials, source


def read_stop_ids(path, specials, known):
    """generation_config.json's eos_token_id (an id or a list of them), each a token of the
    tokenizer (`known` ids); without one the chat's end of turn and end of text."""
    source = path / "generation_config.json"
    eos = read_json(source).get("eos_token_id") if source.is_file() else None
    if eos is None:
        return [specials[n] for n in ("<|im_end|>", "<|endoftext|>") if n in specials]
    stop_ids = [eos] if type(eos) is int else eos
    if not (isinstance(stop_ids, list) and all(type(i) is int for i in stop_ids)):
        raise ValueError(f"{source}: eos_token_id must be a token id or a list of them; got "
                         f"{eos!r}.")
    unknown = [i for i in stop_ids if i not in known]
    if unknown:
        raise ValueError(f"{source}: eos_token_id {unknown[0]} is no token of this tokenizer "
                         "(vocab.json and its added tokens); set the ids of its stop tokens.")
    return stop_ids


def check_tokenizer(config, tok):
    """Raise ValueError unless a folder's tokenizer fits its config.json: every id inside the
    model's vocab_size, and an SDAR model's mask_token_id the tokenizer's <|MASK|> (decoding with
    another id reads garbage)."""
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"its tokenizer has ids up to {tok.vocab_size - 1} but its config.json's "
                         f"vocab_size is {config.vocab_size}; the two come from different models.")
    if config.model_type != "sdar":
        return
    if tok.mask_id is None:
        raise ValueError("its config.json says model_type 'sdar' but its tokenizer defines no mask "
                         "token (<|MASK|>); a diffusion model cannot decode without one.")
    if config.mask_token_id != tok.mask_id:
        got = "has no mask_token_id" if config.mask_token_id is None else \
            f"gives mask_token_id {config.mask_token_id}"
        raise ValueError(f"its config.json {got} but the tokenizer's <|MASK|> is id {tok.mask_id}; "
                         f"set mask_token_id to {tok.mask_id}.")


def _write_json(path, obj):
    _atomic_write(path, [json.dumps(obj, ensure_ascii=False, indent=1).encode()])


def write_byte_tokenizer(path, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"),
                         stop=("<|im_end|>", "<|endoftext|>")):
    """Write a byte-level tokenizer folder (id = byte value, no merges, specials from 256)
    in the HF layout, so toy models load through load_tokenizer like SDAR does."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids = {name: 256 + i for i, name in enumerate(specials)}
    _write_json(path / "vocab.json", {c: b for b, c in bytes_to_unicode().items()})
    _atomic_write(path / "merges.txt", [b"#version: 0.2\n"])
    decoder = {str(i): {"content": name, "special": True} for name, i in ids.items()}
    _write_json(path / "tokenizer_config.json", {"added_tokens_decoder": decoder})
    _write_json(path / "generation_config.json", {"eos_token_id": [ids[name] for name in stop]})
    return path
