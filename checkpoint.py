"""Checkpoints: a tiny safetensors reader and writer, SDAR/Qwen3 folders loaded and saved, the
tiktoken tokenizer built from a folder's vocab.json, and the check that a draft can propose to a target.

A model reader can skip this file: it is plumbing. Loading is a plain load_state_dict because
model.py's module tree mirrors the checkpoint's tensor names.
"""
import json
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


def read_safetensors(path, device="cpu", dtype=None):
    """{name: tensor} from a .safetensors file, each tensor copied once onto `device`."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise ValueError(f"{path} is truncated (its header does not fit in {size} bytes); "
                             "download or write it again.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the header is not JSON ({e}); point at a .safetensors "
                             "file.") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
    header.pop("__metadata__", None)
    out, data = {}, size - 8 - n
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which this loader "
                             "does "
                             f"not support ({', '.join(DTYPES)}); convert the checkpoint to bf16.")
        t_dtype, (b, e) = DTYPES[info["dtype"]], info["data_offsets"]
        numel = torch.Size(info["shape"]).numel()
        if not 0 <= b <= e <= data or e - b != numel * t_dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} claims bytes [{b}, {e}) of {data} data bytes "
                             f"for shape {info['shape']}; the offsets fall outside the file "
                             "(truncated or corrupt).")
        t = torch.frombuffer(buf, dtype=t_dtype, count=numel, offset=8 + n + b) if numel else \
            torch.empty(0, dtype=t_dtype)
        out[name] = t.reshape(info["shape"]).to(device=device, dtype=dtype or t_dtype, copy=True)
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
    if (path / "model.safetensors.index.json").is_file():
        weight_map = read_json(path / "model.safetensors.index.json")["weight_map"]
        files = sorted(set(weight_map.values()))
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


def load(path, device="cpu", dtype=None) -> Transformer:
    """Load an SDAR/Qwen3 checkpoint folder (config.json + model.safetensors or a sharded
    model.safetensors.index.json) straight onto `device`, in eval mode."""
    path = Path(path)
    config, files = load_config(path), weight_files(path)
    with torch.device("meta"):
        model = Transformer(config)  # no memory: the checkpoint's tensors are assigned below
    state = {}
    for f in files:
        state.update(read_safetensors(path / f, device, dtype))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding serves as the head
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shared = set(state) & set(expected)
    bad = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in shared
                 if state[k].shape != expected[k])
    if missing or unexpected or bad:
        raise ValueError(f"checkpoint {path} does not match its config.json: missing {missing}, "
                         f"unexpected {unexpected}, mis-shaped {bad}.")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


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


def load_tokenizer(path):
    """Build a Tokenizer from an HF folder (vocab.json + tokenizer_config.json).
    Ranks are ids: Qwen's merge i creates id 256 + i, so merges.txt need not be read."""
    path = Path(path)
    if not (path / "vocab.json").is_file():
        raise FileNotFoundError(f"{path / 'vocab.json'} not found; pass a model folder holding "
                                "the HF tokenizer files (vocab.json, tokenizer_config.json).")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab = read_json(path / "vocab.json")
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in vocab.items()}

    # added_tokens_decoder is the authoritative list; added_tokens.json is the older spelling.
    config = {}
    if (path / "tokenizer_config.json").is_file():
        config = read_json(path / "tokenizer_config.json")
    specials = {t["content"]: int(i) for i, t in (config.get("added_tokens_decoder") or {}).items()}
    if not specials and (path / "added_tokens.json").is_file():
        specials = read_json(path / "added_tokens.json")
    # spelled <|MASK|> in tokenizer_config.json, <MASK> in added_tokens.json; Qwen3's has none
    mask = next((specials[n] for n in ("<|MASK|>", "<MASK>") if n in specials), None)

    gen = path / "generation_config.json"
    eos = read_json(gen).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = [specials[n] for n in ("<|im_end|>", "<|endoftext|>") if n in specials]
    stop_ids = [eos] if isinstance(eos, int) else eos
    if not stop_ids:
        raise ValueError(f"{path} defines no stop token; set eos_token_id in its "
                         "generation_config.json.")
    enc = tiktoken.Encoding(path.name or "tokenizer", pat_str=QWEN2_PATTERN,
                            mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, specials, mask, stop_ids, ranks)


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
