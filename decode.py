"""Vanilla decoding: SDAR block diffusion with a KV cache, its no-cache oracle, and AR decoding.

An SDAR model writes B positions at a time: a block at absolute positions [kB, (k+1)B) starts as its
known tokens (the prompt's tail) and mask tokens. Each of `steps` forwards predicts every masked
position; each gets a pick (argmax, or a draw) and a confidence (the pick's probability), and SDAR's
rule reveals some: static reveals the step's quota of most confident positions, dynamic also every
one above a threshold. A finished block is stored in the KV cache by putting it in front of the
next block's first forward ("pending" tokens), so a block costs `steps` forwards, not steps + 1.

`python decode.py` is the command line (cli.py): vanilla and speculative decoding of checkpoints
and of the toy models.
"""
import math
import time
from dataclasses import dataclass

import torch

import mask as masks

# Each option's allowed values, as (test, words). The library names the parameter as Python spells
# it; the command line uses the same words with the flag's name.
RANGES = {
    "max_new_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "block": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "lookahead": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: 0 <= v < math.inf, "a finite number >= 0 (0 = argmax)"),
    "top_k": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
    "threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "eos_min_prob": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
    "strategy": (lambda v: v in ("static", "dynamic"), "'static' or 'dynamic'"),
}


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check(**options):
    """Raise ValueError naming the first option outside its range (RANGES); None = not given."""
    for name, value in options.items():
        valid, allowed = RANGES[name]
        if value is not None and not valid(value):  # a NaN fails every comparison
            raise ValueError(f"{name} must be {allowed}; got {value!r}")


def check_steps(steps, block):
    if not (is_int(steps) and 1 <= steps <= block):
        raise ValueError(f"steps must be an integer from 1 to the block length ({block}); "
                         f"got {steps!r}")


@dataclass(frozen=True)
class Sampling:
    """How a decoder picks each token: argmax at temperature 0, else a draw after temperature,
    top-k (0 = off) and top-p (1 = off)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    @property
    def greedy(self):
        return self.temperature == 0

    def distribution(self, logits, suppress=None):
        """(..., V) logits -> the probabilities a token is picked from: `suppress` (a diffusion
        model's mask id, never an output) gets zero, then temperature (1 for argmax), top-k, and
        top-p (the smallest set of most likely tokens whose mass reaches top_p)."""
        logits = logits.float() / (self.temperature or 1.0)
        if suppress is not None:
            never = torch.tensor([suppress], device=logits.device)
            logits = logits.index_fill(-1, never, -math.inf)
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            p = sorted_logits.softmax(-1)
            drop = p.cumsum(-1) - p >= self.top_p  # the mass before this token reaches top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
        return logits.softmax(-1)

    def pick(self, probs, generator=None):
        """One token per row of probs (..., V): argmax, or a draw."""
        if self.greedy:
            return probs.argmax(-1)
        draws = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        return draws.view(probs.shape[:-1])


GREEDY = Sampling()


@dataclass
class Stats:
    """What one decode did; the same fields for every decoder. Forwards count decoding only (the
    prefill apart); a step is one denoising step of a block (AR decoding: one token)."""
    tokens: int = 0  # tokens returned
    forwards: int = 0  # target forwards
    steps: int = 0  # target steps committed (the target alone: one per forward)
    draft_forwards: int = 0
    drafted: int = 0  # tokens the draft proposed
    accepted: int = 0  # drafted tokens committed as drafted
    matched: int = 0  # proposed steps the target committed exactly as proposed
    draft_matched: int = 0  # of them, the draft's
    width: int = 0  # query tokens of the target forwards
    seconds: float = 0.0  # decoding, prefill excluded
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0  # of `seconds`, drafting


def trim(tokens, stop_ids, room):
    """(tokens before the first stop token, at most `room` of them; True when decoding is done)."""
    for i, token in enumerate(tokens[:room]):
        if token in stop_ids:
            return tokens[:i], True
    return tokens[:room], len(tokens) >= room


def quota(step, block, steps):
    """SDAR's quota of a block's step (0-based; an int or a tensor of them): the block spread over
    the steps as evenly as possible, block // steps each and one more for the first block % steps.
    A step reveals min(quota, masks left) positions (more when dynamic)."""
    base, extra = divmod(block, steps)
    return base + (step < extra)


def schedule(masks_left, block, steps, done=0):
    """The quotas of the steps a block needs to reveal its `masks_left` masks statically, its first
    `done` steps taken. A block that starts with known tokens finishes early (block 4, steps 2, two
    masks: one step); a block continued after `done` steps keeps its schedule: schedule(6, 8, 5,
    done=1) is [2, 2, 1, 1], where a fresh start would be [2, 2, 2]. Dynamic decoding reveals at
    least as much per step, so it needs these steps at most."""
    out = []
    while sum(out) < masks_left:
        out.append(quota(done + len(out), block, steps))
    return out


def reveal(probs, tokens, todo, k, strategy="static", threshold=0.9):
    """SDAR's rule: which masked positions a step reveals, from the distributions probs (..., B, V)
    and each position's pick tokens (..., B). A position's confidence is its pick's probability;
    static reveals the k most confident (ties: the lower position first), dynamic also every one
    above the threshold, and "left" (a draft proposing to an AR target) the k leftmost. todo
    (..., B) marks the masked positions; k, the step's quota, is an int or a (..., 1) tensor.
    The target alone (denoise) and lossless verification decide with this one function."""
    conf = probs.gather(-1, tokens[..., None])[..., 0]
    if strategy == "left":
        conf = -torch.arange(todo.shape[-1], device=todo.device).float().expand_as(conf)
    conf = conf.masked_fill(~todo, -math.inf)
    rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = most confident
    chosen = rank < k
    if strategy == "dynamic":
        chosen = chosen | (conf > threshold)
    return todo & chosen


@dataclass
class Denoised:
    """A denoised block: tokens (B,), step (B,) (0 = known, s = revealed at step s of this call),
    forwards, and when recorded, for each step s: picks (S, B), the pick at every position of the
    state before it, and probs (S, B, V), their distributions (None when greedy)."""
    tokens: torch.Tensor
    step: torch.Tensor
    forwards: int
    picks: torch.Tensor | None = None
    probs: torch.Tensor | None = None


def forward_block(model, pending, x, start, cache):
    """Logits (..., B, V) of blocks x (..., B) (a batch of one or more), in one forward on
    [pending | x]: x sees pending, the cache and itself."""
    n, B = pending.shape[-1], x.shape[-1]
    ids = torch.cat([pending, x], -1)
    pos = torch.arange(start - n, start + B, device=x.device)
    attend = masks.block_causal(n + B, B, start - n, x.device)
    logits = model(ids.view(-1, n + B), pos, attend, cache)[:, n:]
    return logits.view(*x.shape, -1)


def denoise(model, x, known, start, quotas, *, cache=None, pending=None, strategy="static",
            threshold=0.9, sampling=GREEDY, generator=None, record=False, probs=None,
            refresh=True):
    """Fill a block's unknown positions: the one denoiser, of the target alone and of the draft.

    x (B,): the block's tokens at positions start..start+B-1 (or (N, B): a batch of blocks at the
    same positions); known (B,) bool says which are known (anywhere in the block); the others are
    fed as mask tokens and filled. quotas: the reveals of
    each step (schedule()); a static block takes them all, a dynamic one stops once it is full.
    pending: tokens just before the block that the model has not cached. With a cache they are
    the block completed last, and the first forward stores them (commits them to the cache);
    without one (the oracle), the whole sequence so far, recomputed at every step.
    record=True keeps each step's picks (and distributions when sampling) for verification.
    probs (B, V): distributions to take the first step from instead of a forward; refresh=False
    takes every later step from the first step's distributions too, with fresh picks at each
    state: a chain proposed from one forward (or from none, given probs).
    Host syncs: none, except one per step of dynamic decoding (is the block full?).
    """
    mask_id = model.config.mask_token_id
    todo = ~known
    x = x.masked_fill(todo, mask_id)
    step = torch.zeros_like(x)
    pending = x[..., :0] if pending is None else pending
    picks, dists, forwards, tokens = [], [], 0, None
    for s, k in enumerate(quotas, start=1):
        if strategy == "dynamic" and s > 1 and not todo.any():
            break  # dynamic revealed more than scheduled: the block is full early
        if probs is None or s > 1 and refresh:
            logits = forward_block(model, pending, x, start, cache)
            forwards += 1
            if cache is not None:
                cache.commit(pending.shape[-1])  # pending is stored; the block's keys are scratch
                pending = pending[..., :0]
            probs, tokens = sampling.distribution(logits, suppress=mask_id), None  # (B, V)
        if tokens is None or not sampling.greedy:  # argmax once per forward; draws at every state
            tokens = sampling.pick(probs, generator)
        revealed = reveal(probs, tokens, todo, k, strategy, threshold)
        x = torch.where(revealed, tokens, x)
        step = torch.where(revealed, s, step)
        todo = todo & ~revealed
        picks.append(tokens)
        dists.append(probs)
    if not record:
        return Denoised(x, step, forwards)
    probs = None if sampling.greedy else torch.stack(dists)
    return Denoised(x, step, forwards, torch.stack(picks), probs)


def sync(device):
    """The time, once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def device_of(model):
    return model.model.embed_tokens.weight.device


def diffusion_mask_id(model):
    """The mask token id of a model that can decode diffusion-style, or a ValueError."""
    config = model.config
    if config.model_type != "sdar" or config.mask_token_id is None:
        raise ValueError(f"a {config.model_type} model without a mask token cannot decode "
                         "diffusion-style; use an SDAR checkpoint (mask_token_id in its "
                         "config.json) or decode it autoregressively")
    return config.mask_token_id


def as_prompt(prompt_ids, device):
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=device)
    if not len(prompt):
        raise ValueError("the prompt is empty; decoding starts from at least one token")
    return prompt


def prefill(model, ids, cache, block):
    """Commit ids (..., T) at positions 0..T-1 to the cache in one block-causal forward (block 1:
    causal)."""
    n = ids.shape[-1]
    if n:
        attend = masks.block_causal(n, block, device=ids.device)
        model(ids.view(-1, n), torch.arange(n, device=ids.device), attend, cache)
        cache.commit(n)


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, *, block=4, steps=None, strategy="static",
             threshold=0.9, sampling=GREEDY, stop_ids=(), generator=None, callback=None,
             cached=True):
    """Vanilla block-diffusion decoding. Returns (new tokens, Stats): at most max_new_tokens,
    trimmed before the first stop token. steps: denoising steps per block (default: block, one
    position per step). callback(tokens) sees each block's new tokens, exactly those returned.
    cached=False is the oracle: the same decisions, recomputing the whole sequence at every step.
    Host syncs: one per block, plus one per step of dynamic decoding."""
    steps = block if steps is None else steps
    check(max_new_tokens=max_new_tokens, block=block, strategy=strategy, threshold=threshold)
    check_steps(steps, block)
    mask_id, dev = diffusion_mask_id(model), device_of(model)
    prompt = as_prompt(prompt_ids, dev)
    aligned = len(prompt) - len(prompt) % block  # blocks sit at absolute positions [kB, (k+1)B)
    cache = model.new_cache(aligned + max_new_tokens + 3 * block) if cached else None
    stats, out = Stats(), []
    t0 = sync(dev)
    if cached:
        prefill(model, prompt[:aligned], cache, block)
    t1 = sync(dev)
    seq, tail, pending = prompt[:aligned], prompt[aligned:], prompt[:0]
    while True:
        x = torch.cat([tail, tail.new_full((block - len(tail),), mask_id)])
        known = torch.arange(block, device=dev) < len(tail)
        quotas = schedule(block - len(tail), block, steps)
        result = denoise(model, x, known, len(seq), quotas, cache=cache,
                         pending=pending if cached else seq, strategy=strategy,
                         threshold=threshold, sampling=sampling, generator=generator)
        stats.forwards += result.forwards
        new, done = trim(result.tokens[len(tail):].tolist(), stop_ids, max_new_tokens - len(out))
        out += new
        if callback:
            callback(new)
        if done:
            break
        seq, pending, tail = torch.cat([seq, result.tokens]), result.tokens, tail[:0]
    stats.tokens, stats.steps = len(out), stats.forwards
    stats.seconds, stats.prefill_seconds = sync(dev) - t1, t1 - t0
    return out, stats


@torch.inference_mode()
def generate_ar(model, prompt_ids, max_new_tokens, *, sampling=GREEDY, stop_ids=(), generator=None,
                callback=None, cached=True):
    """Plain autoregressive decoding, the baseline of an AR (Qwen3) target: a causal prefill of
    the prompt but its last token, then one forward per token on the newest token. The AR shift:
    the logits at position i predict the token at i + 1. cached=False is the oracle, recomputing
    the whole sequence for every token. Returns (tokens, Stats) as generate does; callback sees
    each new token. Host syncs: one per token."""
    check(max_new_tokens=max_new_tokens)
    dev = device_of(model)
    seq = as_prompt(prompt_ids, dev)
    cache = model.new_cache(len(seq) + max_new_tokens) if cached else None
    stats, out = Stats(), []
    t0 = sync(dev)
    if cached:
        prefill(model, seq[:-1], cache, 1)
    t1 = sync(dev)
    while True:
        first = len(seq) - 1 if cached else 0  # the first position fed: the newest, or all
        attend = masks.block_causal(len(seq) - first, 1, first, dev)
        positions = torch.arange(first, len(seq), device=dev)
        logits = model(seq[None, first:], positions, attend, cache)[0, -1]
        if cached:
            cache.commit(1)
        stats.forwards += 1
        token = sampling.pick(sampling.distribution(logits), generator)
        new, done = trim([token.item()], stop_ids, max_new_tokens - len(out))
        out += new
        if callback and new:
            callback(new)
        if done:
            break
        seq = torch.cat([seq, token[None]])
    stats.tokens, stats.steps = len(out), stats.forwards
    stats.seconds, stats.prefill_seconds = sync(dev) - t1, t1 - t0
    return out, stats


if __name__ == "__main__":
    import cli  # the command line sits above the library; the library never imports it

    cli.run(cli.decode_main)
