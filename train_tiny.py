"""Toy models trained on a CPU in minutes, on two chat tasks; bytes are tokens.

sort: one right answer, scored by exact match (answers of 24-36 bytes: 6-9 blocks of 4).
    user: sort 31415926                               assistant: [1, 1, 2, 3, 4, 5, 6, 9]
walk: many right answers, scored by validity: n steps of +-1 from a to b that never leave lo-hi.
    user: walk 3 to 5 in 10 steps within 2-6          assistant: 3+4-3+4-3+4-3+4-3+4+5
A confident model writes a sort in parallel for free. Like chat text, a walk has many plausible
continuations (a sign and the digit after it are uncertain jointly, sharp given each other), so
parallel decoding has a price.

Per task an SDAR target (6 layers) and two 1-layer drafts, "data" (trained on the task, sdar_loss)
and "distilled" (on its target's decodes of training prompts, trajectory_loss); one AR (Qwen3)
target for both tasks. `python train_tiny.py` writes them as checkpoint folders, out/tiny-<preset>.
"""
import argparse
import fcntl
import functools
import math
import multiprocessing
import os
import random
import re
import signal
import sys
import tempfile
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple


def quit_at_once(signum, frame):
    """Ctrl-C while torch imports: one line and exit status 130 at once, not a traceback."""
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, quit_at_once)  # from here, not after torch's second or more

import torch
import torch.nn.functional as F

import head
import mask as masks
import sdar
from checkpoint import load, load_tokenizer, save, write_byte_tokenizer
from model import Config, Transformer

ROOT = Path(__file__).parent
OUT = ROOT / "out"  # the toy folders: OUT/tiny-<preset>
BLOCKS = (4, 8)  # drawn per batch; config.json leaves block_size unset, so decode accepts both
MAX_NEW_TOKENS = 48  # room for the longest answer (36 bytes) and its stop token
MAX_EVAL = 300  # held-out prompts per task at most: walk has ~380
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

# ----------------------------------------------------------------------------- the tasks

TASKS = ("sort", "walk")
WALK_PROMPT = re.compile(r"walk (\d) to (\d) in (\d+) steps within (\d)-(\d)")


@functools.cache
def _walks(x, k, b, lo, hi):
    """How many walks of k steps of +-1 go from x to b without leaving lo..hi."""
    if not lo <= x <= hi:
        return 0
    if k == 0:
        return int(x == b)
    return _walks(x - 1, k - 1, b, lo, hi) + _walks(x + 1, k - 1, b, lo, hi)


def _draw(task, rng):
    """One (prompt, answer): 8-12 digits to sort, or a walk drawn uniformly among the valid ones
    (each step goes down with the share of valid walks that do), so that all are learned."""
    if task == "sort":
        xs = [rng.randrange(10) for _ in range(rng.randint(8, 12))]
        return f"sort {''.join(map(str, xs))}", str(sorted(xs))
    while True:
        lo, hi = sorted(rng.sample(range(10), 2))
        a, b, n = rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(10, 14)
        if _walks(a, n, b, lo, hi):  # parity can make (a, b, n) impossible
            break
    xs = [a]
    for k in range(n, 0, -1):
        down, up = _walks(xs[-1] - 1, k - 1, b, lo, hi), _walks(xs[-1] + 1, k - 1, b, lo, hi)
        xs.append(xs[-1] - 1 if rng.random() * (down + up) < down else xs[-1] + 1)
    moves = "".join(("+" if y > x else "-") + str(y) for x, y in zip(xs, xs[1:]))
    return f"walk {a} to {b} in {n} steps within {lo}-{hi}", f"{a}{moves}"


def _is_heldout(prompt):
    """A fixed eighth of all prompts, chosen by hash: the splits never share a prompt."""
    return zlib.crc32(prompt.encode()) % 8 == 0


def examples(n, split="heldout", seed=0, task="sort"):
    """n (prompt, answer) pairs, the same for the same arguments; the splits share no prompt.
    Held-out prompts are distinct (a repeat would count twice); training repeats walk prompts
    with fresh answers. A walk's answer is one valid answer of many: score with score(), not ==."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {TASKS}")
    # A str seed is hashed with sha512: stable across runs. sort keeps its original stream.
    rng = random.Random(f"{split}:{seed}" if task == "sort" else f"{task}:{split}:{seed}")
    heldout = split == "heldout"
    out, seen = [], set()
    for _ in range(100 * n + 10_000):  # bounded: there are only ~380 held-out walk prompts
        if len(out) == n:
            break
        prompt, answer = _draw(task, rng)
        if _is_heldout(prompt) == heldout and not (heldout and prompt in seen):
            seen.add(prompt)
            out.append((prompt, answer))
    if len(out) < n:
        raise ValueError(f"asked for {n} distinct held-out {task} prompts; found only {len(out)}")
    return out


def task_of(prompt):
    """The task a prompt belongs to: its first word, whatever its case and the spaces around it
    ("  Walk 3 to 5 ..."), else sort."""
    return "walk" if prompt.casefold().split()[:1] == ["walk"] else "sort"


def learned(prompt):
    """Whether a prompt is of the kinds the toys learned, exactly as they saw it (ASCII digits)."""
    if not prompt.isascii():
        return False
    sort = re.fullmatch(r"sort (\d+)", prompt)
    walk = WALK_PROMPT.fullmatch(prompt)
    if sort:
        return 8 <= len(sort[1]) <= 12
    if walk:
        a, b, n, lo, hi = map(int, walk.groups())
        return 10 <= n <= 14 and lo < hi and _walks(a, n, b, lo, hi) > 0
    return False


def outside_training(prompt):
    """None for a prompt of the kinds the toys learned; else a sentence saying what they learned."""
    if learned(prompt):
        return None
    kinds = ("the toys learned 'sort' with 8-12 digits and 'walk A to B in N steps within LO-HI' "
             "with 10-14 steps that can be walked")
    if learned(" ".join(prompt.casefold().split())):
        return (f"{kinds}, in lowercase with single spaces and none around; this prompt is written "
                "otherwise, so expect a poor answer")
    return f"{kinds}; this prompt is neither, so expect a poor answer"


def score(prompt, prediction, answer):
    """sort: exact match but for surrounding whitespace. walk: any valid walk, whatever the
    reference: n moves from a to b, each sign agreeing with its step of 1, all within lo..hi."""
    s = prediction.strip()
    if task_of(prompt) == "sort":
        return s == answer.strip()
    a, b, n, lo, hi = map(int, WALK_PROMPT.fullmatch(prompt).groups())
    if not re.fullmatch(r"\d([+-]\d)*", s):
        return False
    xs = [int(c) for c in s[::2]]
    steps_ok = all(y - x == (1 if sign == "+" else -1) for sign, x, y in zip(s[1::2], xs, xs[1:]))
    ends_ok = len(xs) == n + 1 and xs[0] == a and xs[-1] == b
    return ends_ok and steps_ok and all(lo <= x <= hi for x in xs)


# ----------------------------------------------------------------------------- models

class Preset(NamedTuple):
    """A toy model's shape, steps, peak learning rate, tasks, and teacher (None: the data)."""
    shape: dict
    steps: int
    lr: float
    tasks: tuple
    teacher: str | None = None


# Heads 4 (kv 2), head_dim = width / 4. "ar" is the target's shape trained as a Qwen3. Listed in
# the order workers take them up: the 6-layer models first (distilled drafts wait for theirs).
TARGET = dict(num_hidden_layers=6, hidden_size=48, intermediate_size=144)
DRAFT = dict(num_hidden_layers=1, hidden_size=40, intermediate_size=120)
HEAD = dict(head=True, width=64, layers=2, heads=4)  # head.py: on its teacher's hidden states
PRESETS = {
    "walk-target": Preset(TARGET, 900, 5e-3, ("walk",)),
    "target": Preset(TARGET, 600, 5e-3, ("sort",)),
    "walk-distilled": Preset(DRAFT, 1100, 1e-2, ("walk",), teacher="walk-target"),
    "distilled": Preset(DRAFT, 650, 1e-2, ("sort",), teacher="target"),
    "walk-draft": Preset(DRAFT, 2600, 1e-2, ("walk",)),
    "ar": Preset({**TARGET, "model_type": "qwen3"}, 600, 5e-3, TASKS),
    "draft": Preset(DRAFT, 1300, 1e-2, ("sort",)),
    "walk-head": Preset(HEAD, 1500, 3e-3, ("walk",), teacher="walk-target"),
    "head": Preset(HEAD, 1500, 3e-3, ("sort",), teacher="target"),
}
DRAFTS = ("data", "distilled")  # each task's drafts, by role in folders()
DEFAULT_DRAFT = "distilled"  # the one `python decode.py` uses (the README's results say why)
AR_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # a Qwen3 tokenizer has no <|MASK|>


def folders(task):
    """A task's toy folders by role: its SDAR "target", drafts "data" and "distilled", its
    target's "head", and "ar"."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {TASKS}")
    prefix = "" if task == "sort" else f"{task}-"
    names = {"target": f"{prefix}target", "data": f"{prefix}draft",
             "distilled": f"{prefix}distilled", "head": f"{prefix}head", "ar": "ar"}
    return {role: OUT / f"tiny-{name}" for role, name in names.items()}


def tasks_of(folder):
    """The tasks a toy folder was trained on, or None for any other folder."""
    trained = {(OUT / f"tiny-{name}").resolve(): p.tasks for name, p in PRESETS.items()}
    return trained.get(Path(folder).resolve())


def complete(folder):
    """Whether a folder holds a finished checkpoint: write() and head.save write config.json
    last."""
    files = ("model.safetensors", "config.json") if head.is_head(folder) else (
        "vocab.json", "tokenizer_config.json", "model.safetensors", "config.json")
    return all((Path(folder) / f).is_file() for f in files)


def config(name, tok):
    """A preset's Config, block_size None (trained on 4 and 8). The AR model keeps all 260
    embedding rows (as Qwen3 pads its embedding past its tokenizer): one id space for all."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: use one of {list(PRESETS)}")
    shape = PRESETS[name].shape
    mask_id = None if shape.get("model_type") == "qwen3" else tok.mask_id
    return Config(vocab_size=tok.vocab_size, num_attention_heads=4, num_key_value_heads=2,
                  rope_theta=1e4, max_position_embeddings=1024, mask_token_id=mask_id,
                  block_size=None, **shape)


def init_model(config, seed=0):
    """PyTorch's default init, with the projections into the residual stream scaled by
    1/sqrt(2 * layers) as in GPT-2 (Qwen's std 0.02 starves the signal at width 48)."""
    torch.manual_seed(seed)
    m = Transformer(config)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_((2 * config.num_hidden_layers) ** -0.5)
    return m


# ----------------------------------------------------------------------------- data

class Row(NamedTuple):
    """A training sequence: the chat prompt's ids and the response's (the answer and its stop
    token; a target's decode keeps the rest of that block as it wrote it). A decode also has step
    (R,), the step of its block that revealed each position, and picks (S, R), the target's pick
    at each position in the state before each step."""
    prompt: list
    response: list
    step: torch.Tensor | None = None
    picks: torch.Tensor | None = None


def rows(pairs, tok):
    stop = tok.id_of("<|im_end|>")
    return [Row(tok.chat(p), tok.encode(a) + [stop]) for p, a in pairs]


def mixed(tasks, n, seed):
    """n training pairs (rounded up to a multiple of len(tasks)), the tasks taking turns."""
    streams = [examples(-(-n // len(tasks)), "train", seed, task) for task in tasks]
    return [pair for group in zip(*streams) for pair in group]


def batch(rows, tok, device="cpu"):
    """x0 (N, n) and is_resp (N, n): each row's prompt and response, then <|endoftext|> pads that
    count as response, as in SDAR: the model learns what follows a stop token in its block."""
    pad = tok.id_of("<|endoftext|>")
    n = max(len(r.prompt) + len(r.response) for r in rows)
    ids = [r.prompt + r.response + [pad] * (n - len(r.prompt) - len(r.response)) for r in rows]
    starts = torch.tensor([len(r.prompt) for r in rows], device=device)
    return torch.tensor(ids, device=device), torch.arange(n, device=device)[None] >= starts[:, None]


def trajectories(rows, n, device="cpu"):
    """step (N, n) and picks (N, S, n) of decoded rows, where batch() puts their tokens; step 0
    (known) outside the responses."""
    step = torch.zeros(len(rows), n, dtype=torch.long)
    picks = torch.zeros(len(rows), DISTILL["block"], n, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(len(r.prompt), len(r.prompt) + len(r.response))
        step[i, span], picks[i, :, span] = r.step, r.picks
    return step.to(device), picks.to(device)


# ----------------------------------------------------------------------------- the target's decodes

# The decoding a distilled draft learns: its target's strongest alone that keeps its accuracy on
# both tasks (greedy; the most confident position per step, and every other above the threshold).
DISTILL = dict(block=4, strategy="dynamic", threshold=0.9)
RULE = sdar.Settings(MAX_NEW_TOKENS, DISTILL["block"], strategy=DISTILL["strategy"],
                     threshold=DISTILL["threshold"]).resolve("vanilla")
DISTILL_PROMPTS = 4096  # the most distinct training prompts a target decodes for its draft
UNSURE = 0.5  # a trajectory label's weight on the target's pick where the target did not reveal it


@torch.inference_mode()
def decode_batch(target, ids, stop_ids, rule=RULE, on_block=None):
    """sdar.generate's decoding (rule: DISTILL's) of prompts of one length, ids (N, T), in one
    batched cache (a row whose block is full takes no more reveals) until every row has a stop
    token or MAX_NEW_TOKENS are written: the responses' tokens (N, R), step (N, R), picks
    (N, S, R). on_block(d, start, cache) sees each block's Denoised while the cache holds what
    comes before it."""
    (N, T), B = ids.shape, DISTILL["block"]
    aligned = T - T % B
    cache = target.new_cache(RULE.room(T, 2 * B), batch_size=N)  # a pending block and one
    sdar.prefill(target, ids[:, :aligned], cache, B)
    tail, stops = ids[:, aligned:], torch.tensor(stop_ids)
    pending = sdar.Pending.none(N, ids.device)
    done, out = torch.zeros(N, dtype=torch.bool), []
    for start in range(aligned, T + MAX_NEW_TOKENS, B):
        n_known = tail.shape[1]
        x = torch.cat([tail, tail.new_full((N, B - n_known), target.config.mask_token_id)], 1)
        d = sdar.denoise(target, x, torch.full((N,), start), torch.zeros(N, dtype=torch.long),
                         rule, cache=cache, pending=pending)
        if on_block is not None:
            on_block(d, start, cache)
        out.append((d.tokens, d.step, d.picks.transpose(0, 1)))  # picks past a block's steps: unused
        done |= torch.isin(d.tokens[:, n_known:], stops).any(1)
        if done.all():
            break
        tail, pending = tail[:, :0], sdar.Pending(d.tokens, torch.full((N,), B), whole=True)
    tokens, step, picks = (torch.cat(parts, -1) for parts in zip(*out))
    return tokens[:, T % B:], step[:, T % B:], picks[:, :, T % B:]  # the prompt's tail cut off


def target_rows(target, tok, prompts, batch_size=512):
    """The target's decodes of prompts as Rows, each response up to the end of the block of its
    first stop token (all of it if none). Prompts of one token length are decoded together."""
    by_length, out, B = {}, [], DISTILL["block"]
    for prompt in prompts:
        ids = tok.chat(prompt)
        by_length.setdefault(len(ids), []).append(ids)
    for T, group in sorted(by_length.items()):
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            tokens, step, picks = decode_batch(target, torch.tensor(chunk), tok.stop_ids)
            is_stop = torch.isin(tokens, torch.tensor(tok.stop_ids))  # (N, R)
            first_stop = is_stop.float().argmax(1).masked_fill(~is_stop.any(1), tokens.shape[1] - 1)
            ends = ((T + first_stop) // B + 1) * B - T  # the end of that token's block
            for r, (prompt, end) in enumerate(zip(chunk, ends.tolist())):
                out.append(Row(prompt, tokens[r, :end].tolist(), step[r, :end], picks[r, :, :end]))
    return out


# ----------------------------------------------------------------------------- objectives

# ----------------------------------------------------------------------------- heads (head.py)

HEAD_RULES = (RULE, replace(RULE, strategy="static"))  # the target's decodings a head learns
HEAD_PROMPTS = 1000  # distinct training prompts per rule


@torch.inference_mode()
def head_blocks(target, tok, prompts, rules=HEAD_RULES):
    """The target's own decoding of prompts by each rule, block by block (tensors over blocks):
    states (N, S, B), the block before each step, masked (N, S, B), tokens (N, B), the block
    after its last step, and at each state the target's final hidden states hidden (N, S, B, d)
    and its distributions probs (N, S, B, V; float16), from a forward on that state."""
    parts, mask_id = [], target.config.mask_token_id

    def record(d, start, cache):  # the cache holds what comes before the block
        pos = start + torch.arange(d.states.shape[-1])
        hidden = torch.stack([target.hidden(x, pos, None, cache) for x in d.states], 1)
        probs = RULE.sampling.distribution(target.lm_head(hidden), suppress=mask_id)
        parts.append(dict(states=d.states.transpose(0, 1), masked=d.masked.transpose(0, 1),
                          tokens=d.tokens, hidden=hidden, probs=probs.half()))
    by_length = {}
    for prompt in prompts:
        ids = tok.chat(prompt)
        by_length.setdefault(len(ids), []).append(ids)
    for rule in rules:
        for group in by_length.values():
            for i in range(0, len(group), 256):
                decode_batch(target, torch.tensor(group[i:i + 256]), tok.stop_ids, rule, record)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def train_head(h, blocks, steps, lr, batch_size=256, seed=0):
    """AdamW on pairs of states (s, t) of one block, s no later than t: from the target's hidden
    states at s and the block at t, the head learns the target's distribution at t's masked
    positions (soft targets: cross-entropy against them)."""
    real = blocks["masked"].any(-1)  # (N, S)
    S = real.shape[1]
    later = torch.ones(S, S, dtype=torch.bool).triu()  # s <= t
    pairs = (real[:, :, None] & real[:, None, :] & later).nonzero()  # (P, 3): block, s, t
    opt = torch.optim.AdamW(h.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    h.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / (0.05 * steps)) * (
                0.55 + 0.45 * math.cos(math.pi * step / steps))
        b, s, t = pairs[torch.randint(len(pairs), (batch_size,), generator=gen)].T
        logits = h(blocks["hidden"][b, s], blocks["states"][b, t])
        q, m = blocks["probs"][b, t].float(), blocks["masked"][b, t]
        loss = -(q * F.log_softmax(logits.float(), -1)).sum(-1)[m].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return h.eval()


@torch.inference_mode()
def matched_steps(blocks, rule, h=None):
    """From every state s of every block with steps after the next: the share of the target's
    following steps that a proposer's chain matches in a row, started at the state after the
    target's step from s with what the target computed at s (as lossless speculation proposes):
    the head's (a pass per step; h) or the target's own chain (its distributions at s,
    replayed)."""
    states, tokens, n = blocks["states"], blocks["tokens"], blocks["masked"].any(-1).sum(1)
    N, S, B = states.shape
    path = torch.cat([states, tokens[:, None]], 1)  # (N, S + 1, B): past a block's last step,
    matched = total = 0  # its final tokens
    for s in range(S - 1):
        x, alive = path[:, s + 1], s + 1 < n
        fixed = blocks["probs"][:, s].float()
        for k in range(s + 2, S + 1):
            probs = fixed if h is None else rule.sampling.distribution(
                h(blocks["hidden"][:, s], x), suppress=rule.mask_id)
            x, _, _, _ = sdar.step(probs, x, x == rule.mask_id,
                                   sdar.quota(torch.full((N, 1), k - 1), B, S), rule)
            alive = alive & (k <= n) & (x == path[:, k]).all(-1)
            matched += int(alive.sum())
            total += int(((s + 1 < n) & (k <= n)).sum())
    return matched / max(total, 1)


def run_head(name, args):
    """Train a head for its preset's target on the target's own decoding of training prompts
    and write its folder: the line that reports it (held out: its matched steps, and the
    target's own chain's)."""
    tok, preset = byte_tokenizer(), PRESETS[name]
    steps, lr = args.steps or preset.steps, args.lr or preset.lr
    t0 = time.perf_counter()
    target = load(args.out / f"tiny-{preset.teacher}")
    prompts = list(dict.fromkeys(p for p, _ in mixed(preset.tasks, 4 * HEAD_PROMPTS, args.seed)))
    blocks = head_blocks(target, tok, prompts[:HEAD_PROMPTS])
    torch.manual_seed(args.seed)
    h = head.new(target, DISTILL["block"], **{k: v for k, v in preset.shape.items()
                                             if k != "head"})
    h = train_head(h, blocks, steps, lr, seed=args.seed)
    head.save(h, args.out / f"tiny-{name}")
    report = f"{name}: trained in {time.perf_counter() - t0:.0f}s"
    if args.eval:
        for task in preset.tasks:
            held = [p for p, _ in examples(args.eval, "heldout", task=task)]
            rule = replace(RULE, mask_id=tok.mask_id)
            test = head_blocks(target, tok, held, (RULE,))
            report += (f"; held-out {task}, {DISTILL['strategy']} {DISTILL['threshold']}: the "
                       f"target's following steps matched in a row from each state: head "
                       f"{matched_steps(test, rule, h):.1%}, the target's own chain "
                       f"{matched_steps(test, rule):.1%}")
    return report


def noise(x0, is_resp, mask_id, generator=None):
    """x_t (B, n), masked (B, n) and p (B, 1): each response token masked with probability
    p ~ U(1e-3, 1), one p per row; a row left with none masked gets one at random."""
    B, n = x0.shape
    rand = functools.partial(torch.rand, generator=generator, device=x0.device)
    p = 1e-3 + (1 - 1e-3) * rand(B, 1)
    masked = (rand(B, n) < p) & is_resp
    fallback = rand(B, n).masked_fill(~is_resp, -1.0).argmax(1)  # a random response position
    masked[torch.arange(B, device=x0.device), fallback] |= ~masked.any(1)
    return torch.where(masked, mask_id, x0), masked, p


def denoising_logits(model, xt, x0, is_resp, block):
    """(logits (B, n - cut, V) of x_t from position cut on, cut) in one forward of [x_t ; x_0]
    (mask.training): x_t block b sees x_t block b and x_0 blocks < b, the context it is decoded
    in. x_t blocks holding only prompt tokens (in every row) carry no loss and no other x_t
    block sees them: dropping them changes nothing but saves a quarter of the work."""
    n = x0.shape[1]
    cut = int(is_resp.float().argmax(1).min()) // block * block
    pos = torch.cat([torch.arange(cut, n), torch.arange(n)]).to(x0.device)  # shared positions
    attn = masks.training(n, block, x0.device)[cut:, cut:]
    return model(torch.cat([xt[:, cut:], x0], 1), pos, attn)[:, :n - cut], cut


def sdar_loss(model, x0, is_resp, block, mask_id, generator=None):
    """SDAR's: the sum over masked positions of cross-entropy / p, divided by the number of
    response tokens (pads included). No shift: the logits at i predict x0[i]."""
    xt, masked, p = noise(x0, is_resp, mask_id, generator)
    logits, cut = denoising_logits(model, xt, x0, is_resp, block)
    sel = masked[:, cut:]
    ce = F.cross_entropy(logits[sel].float(), x0[:, cut:][sel], reduction="none")  # (masked,)
    return (ce / p.expand_as(masked)[:, cut:][sel]).sum() / is_resp.sum()


def trajectory_loss(model, x0, is_resp, step, picks, mask_id, generator=None):
    """The target's own steps: in each block of each row one state its decode passed through,
    drawn uniformly (state s: the positions revealed at steps >= s are masked). Each masked
    position is labelled with the target's pick in that state: all the weight where the target
    revealed it at step s, UNSURE where it left it masked (the rest spread evenly), since that
    position was less sure than the threshold and the one revealed: the draft learns which
    positions its target reveals, not only what it writes. step (B, n), picks (B, S, n)."""
    (N, n), B = x0.shape, DISTILL["block"]
    per_block = F.pad(step, (0, -n % B)).view(N, -1, B).amax(-1)  # (N, blocks): steps taken
    draw = torch.rand(per_block.shape, generator=generator, device=x0.device)
    s = ((draw * per_block).long() + 1).repeat_interleave(B, 1)[:, :n]  # (N, n), 1..taken
    masked = step >= s  # a known position (step 0) never is
    labels = picks.gather(1, (s - 1).clamp(max=picks.shape[1] - 1)[:, None])[:, 0]
    logits, cut = denoising_logits(model, x0.masked_fill(masked, mask_id), x0, is_resp, B)
    sel = masked[:, cut:]
    logp = logits[sel].float().log_softmax(-1)  # (masked, V)
    weight = torch.where(step[:, cut:][sel] == s[:, cut:][sel], 1.0, UNSURE)
    on_pick = -logp.gather(-1, labels[:, cut:][sel][:, None])[:, 0]
    return (weight * on_pick - (1 - weight) * logp.mean(-1)).mean()


def ar_loss(model, x0, is_resp, pad_id):
    """Next-token cross-entropy, averaged over the answer tokens and the stop token: the logits
    at i predict x0[i + 1] under a causal mask. Pads after the stop are left out: AR decoding
    ends at the stop token, so nothing is ever generated after it."""
    n = x0.shape[1]
    causal = masks.block_causal(n - 1, 1, device=x0.device)
    logits = model(x0[:, :-1], torch.arange(n - 1, device=x0.device), causal)  # (B, n - 1, V)
    sel = (is_resp & (x0 != pad_id))[:, 1:]
    return F.cross_entropy(logits[sel].float(), x0[:, 1:][sel])


# ----------------------------------------------------------------------------- training

def train(model, tok, data, *, steps, batch_size, lr, seed=0, device="cpu"):
    """AdamW, 5% warmup then cosine decay to lr/10, on batches of data (Rows, in order, cycled):
    ar_loss for an AR model, trajectory_loss on a target's decodes, else sdar_loss (one block
    length per batch). Returns the model in eval mode."""
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    gen, rng = torch.Generator(device).manual_seed(seed), random.Random(seed)
    ar, pad = model.config.model_type == "qwen3", tok.id_of("<|endoftext|>")
    for step in range(steps):
        warmup = min(1.0, (step + 1) / (0.05 * steps))
        for g in opt.param_groups:
            g["lr"] = lr * warmup * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        chosen = [data[(step * batch_size + i) % len(data)] for i in range(batch_size)]
        x0, is_resp = batch(chosen, tok, device)
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            if ar:
                loss = ar_loss(model, x0, is_resp, pad)
            elif chosen[0].step is not None:  # a target's decodes
                step_map, picks = trajectories(chosen, x0.shape[1], device)
                loss = trajectory_loss(model, x0, is_resp, step_map, picks, tok.mask_id, gen)
            else:
                loss = sdar_loss(model, x0, is_resp, rng.choice(BLOCKS), tok.mask_id, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # 1/p weights make rare huge steps
        opt.step()
    return model.eval()


def evaluate(model, tok, n=100, block=4, task="sort", strategy="static"):
    """Held-out score of greedy decoding: block diffusion (static or dynamic, as DISTILL) for an
    SDAR model, next-token decoding for an AR one (block and strategy unused)."""
    hits = 0
    for prompt, answer in examples(n, "heldout", task=task):
        if model.config.model_type == "qwen3":
            ids, _ = sdar.generate_ar(model, tok.chat(prompt), MAX_NEW_TOKENS,
                                        stop_ids=tok.stop_ids)
        else:
            ids, _ = sdar.generate(model, tok.chat(prompt), MAX_NEW_TOKENS, block=block,
                                     strategy=strategy, threshold=DISTILL["threshold"],
                                     stop_ids=tok.stop_ids)
        hits += score(prompt, tok.decode(ids), answer)
    return hits / n


def byte_tokenizer():
    """The toys' tokenizer: ids 0-255 are bytes, then <|endoftext|> <|im_start|> <|im_end|>
    <|MASK|> (256-259). Every preset trains with it; the AR folder is written without the mask."""
    with tempfile.TemporaryDirectory() as folder:
        return load_tokenizer(write_byte_tokenizer(folder))


def write(model, folder):
    """A checkpoint folder, config.json last (removed first), so that a folder with config.json
    holds a finished model. An AR model's tokenizer has no <|MASK|>, like a real Qwen3's."""
    (Path(folder) / "config.json").unlink(missing_ok=True)
    specials = AR_SPECIALS if model.config.model_type == "qwen3" else AR_SPECIALS + ("<|MASK|>",)
    write_byte_tokenizer(folder, specials=specials)
    save(model, folder)


# ----------------------------------------------------------------------------- workers

def run_preset(name, args):
    """Train one preset, write its folder and score it: the line that reports it."""
    if PRESETS[name].shape.get("head"):
        return run_head(name, args)
    tok, preset = byte_tokenizer(), PRESETS[name]
    steps, lr = args.steps or preset.steps, args.lr or preset.lr
    t0 = time.perf_counter()
    pairs = mixed(preset.tasks, steps * args.batch_size, args.seed)
    if preset.teacher:  # its decodes of the distinct prompts, shuffled out of length order
        teacher = load(args.out / f"tiny-{preset.teacher}")
        prompts = list(dict.fromkeys(p for p, _ in pairs))[:DISTILL_PROMPTS]
        data = target_rows(teacher, tok, prompts)
        random.Random(args.seed).shuffle(data)
    else:
        data = rows(pairs, tok)
    model = init_model(config(name, tok), args.seed)
    model = train(model, tok, data, steps=steps, lr=lr, batch_size=args.batch_size,
                  seed=args.seed, device=args.device).cpu()
    write(model, args.out / f"tiny-{name}")
    report = f"{name}: trained in {time.perf_counter() - t0:.0f}s"
    if not args.eval:
        return report
    strategy = DISTILL["strategy"] if preset.teacher else "static"  # as a distilled draft learned
    if model.config.model_type == "qwen3":
        block, how = None, "AR, greedy"
    else:
        block = DISTILL["block"]
        how = f"block {block}, greedy, dynamic" if preset.teacher else f"block {block}, greedy"
    for task in preset.tasks:
        acc = evaluate(model, tok, args.eval, block, task=task, strategy=strategy)
        report += f"; held-out {task} {acc:.1%} of {args.eval} ({how})"
    return report


def train_all(names, args):
    """Train presets in args.workers processes, each distilled draft after its teacher; only the
    parent prints. Ctrl-C stops every worker at once, and the models already written stay."""
    ctx = multiprocessing.get_context("spawn")  # fork after torch's threads start can hang
    answer = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the workers inherit it: only we answer
    try:
        pool = ctx.Pool(args.workers, initializer=torch.set_num_threads, initargs=(args.threads,))
    finally:
        signal.signal(signal.SIGINT, answer)
    todo, running = list(names), {}
    try:
        while todo or running:
            waiting = set(todo) | set(running)  # a distilled draft waits for its teacher
            free = args.workers - len(running)
            for name in [n for n in todo if PRESETS[n].teacher not in waiting][:free]:
                running[name] = pool.apply_async(run_preset, (name, args))
                todo.remove(name)
                say(args, f"{name}: {describe(name, args)}...")
            for name in [n for n, job in running.items() if job.ready()]:
                report = running.pop(name).get()  # a worker's exception is raised here
                say(args, report, always=bool(args.eval))
            time.sleep(0.2)
    finally:
        pool.terminate()
        pool.join()


def say(args, line, always=False):
    if always or not args.quiet:
        print(line, flush=True)


def describe(name, args):
    preset = PRESETS[name]
    tasks = "+".join(preset.tasks)
    source = f"tiny-{preset.teacher}'s decodes of {tasks}" if preset.teacher else tasks
    if preset.shape.get("head"):
        return (f"a head of {preset.shape['layers']} layer(s), width {preset.shape['width']}, "
                f"{args.steps or preset.steps} steps on {source} (its hidden states)")
    return (f"{preset.shape['num_hidden_layers']} layer(s), width {preset.shape['hidden_size']}, "
            f"{args.steps or preset.steps} steps of {args.batch_size} on {source}")


# ----------------------------------------------------------------------------- entry points

def missing(out):
    return [name for name in PRESETS if not complete(Path(out) / f"tiny-{name}")]


def ensure_trained(quiet=False):
    """Train the toys that lack a complete folder in OUT, as `python train_tiny.py` does. A lock
    file in OUT makes a second caller wait, then train whatever is still missing. quiet: print
    only that it waits and what it trains."""
    if not missing(OUT):
        return
    OUT.mkdir(parents=True, exist_ok=True)
    lock_path = OUT / "train_tiny.lock"
    with open(lock_path, "w") as lock:  # unlocked when the file closes, also if the process dies
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("waiting for another process that is training the toy models "
                  f"(lock {lock_path})...", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        names = missing(OUT)
        if names:
            print(f"training the toy models {', '.join(names)} into {OUT} (minutes on a CPU)...",
                  flush=True)
            quiet_flag = ["--quiet"] if quiet else []
            main(["--eval", "0", "--out", str(OUT), "--preset", *names, *quiet_flag])


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line: the reason, and where to learn more
        fail(f"{message} (python train_tiny.py --help lists the options)")


def fail(message):
    print(f"train_tiny.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(argv):
    steps = ", ".join(f"{name} {p.steps}" for name, p in PRESETS.items())
    lrs = ", ".join(f"{name} {p.lr:g}" for name, p in PRESETS.items())
    ap = Parser(prog="train_tiny.py", description="Train the toy models (per task an SDAR target "
                "and two drafts, one trained on the data and one distilled from the target; one AR "
                "Qwen3 target for both tasks) and write them as checkpoint folders.")
    add = ap.add_argument
    add("--preset", nargs="+", choices=[*PRESETS, "all"], default=["all"],
        help=f"models to train (default: all, i.e. {' '.join(PRESETS)}); a distilled draft needs "
        "its target, trained in the same run or already in --out")
    add("--steps", type=int, help=f"optimizer steps of each chosen preset, >= 1 (default: {steps})")
    add("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    add("--lr", type=float, help=f"peak learning rate, > 0 (default: {lrs})")
    add("--seed", type=int, default=0, help="seed of the weights, data and noise (default 0)")
    add("--device", choices=["cpu", "cuda"], default="cpu", help="cuda trains under bf16 autocast")
    add("--out", type=Path, default=OUT, help="writes OUT/tiny-<preset> (default: out/ beside "
        "this script)")
    add("--workers", type=int, help=f"models trained at once, one process each, 1 to {CORES} "
        "(default: one per core, at most one per model)")
    add("--threads", type=int, default=1, help=f"torch threads per worker, 1 to {CORES} (default "
        "1: at the toys' sizes one single-threaded worker per core is fastest)")
    add("--eval", type=int, default=100, metavar="N", help="held-out prompts per task to score "
        f"after training, 0 to {MAX_EVAL} (default 100; 0: skip)")
    add("--quiet", action="store_true", help="print only the held-out scores")
    args = ap.parse_args(argv)
    check(args)
    return args


def check(args):
    """Exit with one sentence (status 2) at the first option out of range."""
    ranges = {"--workers": (args.workers, 1, CORES), "--threads": (args.threads, 1, CORES),
              "--steps": (args.steps, 1, math.inf), "--batch-size": (args.batch_size, 1, math.inf),
              "--eval": (args.eval, 0, MAX_EVAL)}
    for flag, (value, low, high) in ranges.items():
        if value is not None and not low <= value <= high:
            allowed = f">= {low}" if high == math.inf else f"from {low} to {high}"
            fail(f"{flag} must be an integer {allowed}; got {value}")
    if args.lr is not None and not 0 < args.lr < math.inf:
        fail(f"--lr must be a finite number > 0; got {args.lr}")
    if args.out.exists() and not args.out.is_dir():
        fail(f"--out {args.out} is a file; give a folder to write tiny-<preset> folders into")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: torch sees no CUDA device here; use --device cpu")


def main(argv=None):
    args = parse(argv)
    names = [name for name in PRESETS if "all" in args.preset or name in args.preset]
    for name in names:
        teacher = PRESETS[name].teacher
        if teacher and teacher not in names and not complete(args.out / f"tiny-{teacher}"):
            fail(f"--preset {name} learns from tiny-{teacher}, which {args.out} lacks; "
                 f"train both: --preset {teacher} {name}")
    args.workers = args.workers or min(CORES, len(names))
    t0 = time.perf_counter()
    try:
        train_all(names, args)
    except KeyboardInterrupt:
        kept = [name for name in names if complete(args.out / f"tiny-{name}")]
        rest = " ".join(name for name in names if name not in kept)
        print(f"\ninterrupted: kept {', '.join(kept) or 'no model'}; train the rest with "
              f"python train_tiny.py --preset {rest} (a toy's next use does it too)",
              file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    say(args, f"wrote {', '.join(f'tiny-{n}' for n in names)} into {args.out} "
        f"in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is quit_at_once:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt from here
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:  # done: a Ctrl-C while Python exits (it then resets the handler) changes nothing
        signal.signal(signal.SIGINT, signal.SIG_IGN)
