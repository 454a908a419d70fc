"""Decoding with one model: SDAR's block diffusion and plain AR decoding, and the settings that every
decoder of this project shares.

An SDAR model writes B positions at a time. A block at absolute positions [kB, (k+1)B) starts as
its known tokens (the prompt's tail) and mask tokens. Each step forwards the block, picks a token at
every masked position (argmax, or a draw) with a confidence (the pick's probability), and SDAR's
rule reveals some: static reveals the step's quota of most confident positions, dynamic also every
one above a threshold. A finished block is stored in the KV cache by putting it in front of the
next block's first forward ("pending" tokens), so a block costs `steps` forwards, not steps + 1.
"""
import math
from collections import namedtuple
from dataclasses import dataclass, replace

import torch
from torch.profiler import record_function as phase

import mask as masks
from batch import Batch, Row, as_batch

# ----------------------------------------------------------------------------- settings

MIN_TEMPERATURE = 1e-4  # the logits over a smaller one reach 1e4 and more: argmax, or overflow
# Each setting's allowed values, as (test, words).
RANGES = {
    "max_new_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "block": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "lookahead": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: v == 0 or MIN_TEMPERATURE <= v < math.inf,
                    f"0 (argmax) or a finite number >= {MIN_TEMPERATURE:g} (smaller ones are argmax "
                    "in effect and can overflow float32; use 0)"),
    "top_k": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
    "threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "eos_min_prob": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
    "strategy": (lambda v: v in ("static", "dynamic"), "'static' or 'dynamic'"),
    "verify": (lambda v: v in ("lossless", "exact", "simsd"), "'lossless', 'exact' or 'simsd'"),
    "accept": (lambda v: v in ("step", "position"), "'step' or 'position'"),
    "proposer": (lambda v: v in ("draft", "self", "hybrid"), "'draft', 'self' or 'hybrid'"),
    "drafting": (lambda v: v in ("step", "block"), "'step' or 'block'"),
}
# How a sentence spells a setting and its value: as Python does, or as the command line does.
Words = namedtuple("Words", "name value")
PYTHON = Words(str, repr)
FLAGS = Words(lambda name: "--" + name.replace("_", "-"), str)


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check(words=PYTHON, **values):
    """Raise ValueError naming the first value outside its range (RANGES); None = not given."""
    for name, value in values.items():
        valid, allowed = RANGES[name]
        if value is not None and not valid(value):  # a NaN fails every comparison
            raise ValueError(f"{words.name(name)} must be {allowed}; got {words.value(value)}")


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
            drop[..., 0] = False  # the most likely token stays, however small top_p is
            logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
        return logits.softmax(-1)

    def pick(self, probs, generator=None):
        """One token per row of probs (..., V): argmax, or a draw."""
        if self.greedy:
            return probs.argmax(-1)
        draws = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        return draws.view(probs.shape[:-1])


GREEDY = Sampling()

LOOKAHEAD = 2  # blocks one target forward reaches by default (the README says why)
# Who proposes to a lossless target with a draft, by strategy (the README says why): the target's
# own chain helps static decoding; dynamic decoding has revealed every confident position already.
PROPOSER = {"static": "hybrid", "dynamic": "draft"}
DRAFTING = "block"  # a draft's forwards: one per block, or one per step (the README says why)

# The ways to decode, as a refusal names them.
MODES = {"vanilla": "decoding without a draft",
         "ar": "an autoregressive target decoding alone",
         "lossless": "lossless verification, which follows the target's own order and output",
         "self": "the target proposing for itself, without a draft model",
         "paper": "the paper's verification, which judges a draft's tokens",
         "specdiff": "an autoregressive target, which verifies causally, in position order"}
# The modes each speculative setting acts in: given in another, it is refused, not ignored.
ACTS = {"verify": ("lossless", "self", "paper"), "accept": ("paper",),
        "eos_min_prob": ("paper",), "proposer": ("lossless",),
        "drafting": ("lossless", "paper", "specdiff"),
        "lookahead": ("lossless", "self", "paper", "specdiff")}


def mode_of(target, draft, verify):
    """The mode of a target model (its config's model_type), a draft (a model, "self" or None: no
    speculation) and verify."""
    ar = target.config.model_type == "qwen3"
    if draft is None:
        return "ar" if ar else "vanilla"
    if ar:
        if draft == "self":
            raise ValueError("an autoregressive target needs a draft to propose to it")
        return "specdiff"
    if draft == "self":
        return "self"
    return "paper" if verify in ("exact", "simsd") else "lossless"


@dataclass(frozen=True)
class Settings:
    """Every setting of a decode, checked in one place (check) and completed with the mode's
    defaults in one place (resolve). None: the mode's default."""
    max_new_tokens: int = 256
    block: int = 4
    steps: int | None = None  # denoising steps per block (default: the block length)
    strategy: str = "static"  # static: the step's quota; dynamic: also all above the threshold
    threshold: float = 0.9
    sampling: Sampling = GREEDY
    stop_ids: tuple = ()
    verify: str | None = None  # a diffusion target's: lossless, or the paper's exact or simsd
    accept: str | None = None  # exact and simsd's order: step (default) or position
    lookahead: int = LOOKAHEAD  # blocks one target forward reaches
    eos_min_prob: float = 0.0  # exact and simsd: the target probability a stop token needs
    proposer: str | None = None  # lossless: draft, self or hybrid (both)
    drafting: str | None = None  # a draft's forwards: step (one per step) or block (one)
    mask_id: int | None = None  # the mask token's id: the decoder takes it from the models

    def given(self):
        """The speculative settings that differ from their defaults (proposer "draft" names what
        every mode with a draft does)."""
        defaults, chosen = Settings(), [p for p in ACTS if p != "proposer" or self.proposer != "draft"]
        return [name for name in chosen if getattr(self, name) != getattr(defaults, name)]

    def check(self, mode, given=None, words=PYTHON):
        """Raise ValueError, one sentence, at the first setting out of range or out of place in
        `mode`. given: the settings the caller chose (default: those not at their defaults)."""
        check(words, max_new_tokens=self.max_new_tokens, block=self.block,
              strategy=self.strategy, threshold=self.threshold, lookahead=self.lookahead,
              eos_min_prob=self.eos_min_prob, verify=self.verify, accept=self.accept,
              proposer=self.proposer, drafting=self.drafting)
        if self.steps is not None and not (is_int(self.steps) and 1 <= self.steps <= self.block):
            raise ValueError(f"{words.name('steps')} must be an integer from 1 to the block "
                             f"length ({self.block}); got {words.value(self.steps)}")
        for name in self.given() if given is None else given:
            if mode not in ACTS.get(name, (mode,)):
                raise ValueError(f"{words.name(name)} does not apply to {MODES[mode]}")
        refused = [
            (mode == "self" and self.lookahead > 2,
             f"{words.name('lookahead')} {words.value(self.lookahead)} does not apply to "
             f"{MODES['self']}: it proposes the rest of its block and the next block's first "
             "step (lookahead 1 or 2)"),
            (mode == "self" and self.verify not in (None, "lossless"),
             f"{words.name('verify')} {words.value(self.verify)} judges a draft's tokens; the "
             "target proposing for itself is verified losslessly"),
            (mode == "lossless" and self.proposer == "self",
             f"{words.name('proposer')} {words.value('self')} proposes with the target alone; "
             "give no draft"),
            (mode == "specdiff" and self.strategy == "dynamic" and not self.sampling.greedy,
             f"{words.name('strategy')} {words.value('dynamic')} drafts by the confidence of "
             "sampled tokens, which biases an autoregressive target's rejection sampling; use "
             "static (the draft then reveals from the left)")]
        for when, why in refused:
            if when:
                raise ValueError(why)

    def resolve(self, mode):
        """These settings checked, with the mode's defaults in place of None."""
        self.check(mode)
        steps = self.block if self.steps is None else self.steps
        verify = self.verify or ("lossless" if mode in ("lossless", "self") else None)
        proposer = {"self": "self", "lossless": self.proposer or PROPOSER[self.strategy]}.get(
            mode, "draft")
        drafting = self.drafting or ("step" if mode == "paper" else DRAFTING)
        return replace(self, steps=steps, verify=verify, accept=self.accept or "step",
                       proposer=proposer, drafting=drafting, stop_ids=tuple(self.stop_ids))

    def room(self, prompt, widest):
        """KV cache slots a row needs: its prompt, its new tokens, a block past them (the last
        block may end past max_new_tokens), and the widest forward's new tokens (written after
        the committed slots before a commit keeps some)."""
        return prompt + self.max_new_tokens + self.block + widest


# ----------------------------------------------------------------------------- SDAR's rule

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
    The target alone, the proposers and lossless verification decide with this one function."""
    conf = probs.gather(-1, tokens[..., None])[..., 0]
    if strategy == "left":
        conf = -torch.arange(todo.shape[-1], device=todo.device).float().expand_as(conf)
    conf = conf.masked_fill(~todo, -math.inf)
    rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = most confident
    chosen = rank < k
    if strategy == "dynamic":
        chosen = chosen | (conf > threshold)
    return todo & chosen


def step(probs, x, todo, k, rule, generator=None, picks=None):
    """One denoising step of blocks x (R, B), the one step of every decoder: a pick at every
    position from probs (R, B, V) (argmax, or a draw; given `picks`, those), SDAR's rule on the
    masked ones (todo) with quotas k ((R, 1) or an int), the revealed ones set. rule: Settings
    (strategy, threshold, sampling). Returns x, todo, revealed (R, B) and the picks."""
    if picks is None:
        picks = rule.sampling.pick(probs, generator)
    revealed = reveal(probs, picks, todo, k, rule.strategy, rule.threshold)
    return torch.where(revealed, picks, x), todo & ~revealed, revealed, picks


# ----------------------------------------------------------------------------- blocks

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


def forward_block(model, pending, x, start, cache):
    """Logits (R, B, V) of blocks x (R, B), row r at positions start[r].., in one forward on each
    row's [pending[r] | x[r]]: a block sees its row's pending tokens (those just before it that
    the model has not cached, maybe none), its cached slots and itself. Rows of different widths
    are padded (mask.pack)."""
    B, dev = x.shape[-1], x.device
    widths = [len(p) for p in pending]
    if len(set(widths)) == 1:  # one width: one mask for every row
        n = widths[0]
        ids = torch.cat([torch.stack(pending), x], -1)
        pos = torch.tensor(start, device=dev)[:, None] + torch.arange(-n, B, device=dev)
        attend = masks.block_causal(n + B, B, start[0] - n, dev)  # pending is whole blocks
        return model(ids, pos, attend, cache)[:, n:]
    rows = [(torch.cat([p, row]), torch.arange(s - len(p), s + B, device=dev),
             masks.block_causal(len(p) + B, B, s - len(p), dev))
            for p, row, s in zip(pending, x, start)]
    logits = model(*masks.pack(rows, 0), cache)
    first = torch.tensor(widths, device=dev)[:, None] + torch.arange(B, device=dev)
    return logits[torch.arange(len(x), device=dev)[:, None], first]


@dataclass
class Denoised:
    """Denoised blocks (R rows): tokens (R, B), step (R, B) (0 = known, s = revealed at step s of
    this call), and per row the forwards it used and the steps it took; for each step s the pick
    at every position of the state before it, picks (S, R, B), and their distributions, probs
    (S, R, B, V; None when greedy)."""
    tokens: torch.Tensor
    step: torch.Tensor
    forwards: list
    steps: list
    picks: torch.Tensor
    probs: torch.Tensor | None


def denoise(model, x, known, start, quotas, rule, *, cache=None, pending=None, generator=None,
            probs=None, drafting="step"):
    """Fill blocks' unknown positions step after step: the draft proposing, the target replaying
    its own distributions, a target's decodes for distillation.

    x (R, B): row r's block at positions start[r]..start[r]+B-1; known (R, B) bool says which
    tokens are known (anywhere in the block); the others are fed as mask tokens and filled.
    quotas[r]: the reveals of row r's steps (schedule()); a static block takes them all, a dynamic
    one stops once it is full. The rows step together; a row whose block is full waits.
    pending[r]: tokens just before row r's block that the model has not cached; the first forward
    stores them. drafting "step": a forward per step; "block": one forward, and every later step
    from its distributions, with fresh picks at each state; given probs (R, B, V): no forward.
    Host syncs: none, except one per step of dynamic decoding (which blocks are full?)."""
    R, mask_id = len(x), model.config.mask_token_id
    pending = [x[r, :0] for r in range(R)] if pending is None else list(pending)
    todo = ~known
    x = x.masked_fill(todo, mask_id)
    steps = torch.zeros_like(x)
    picks, dists, taken, forwards, tokens = [], [], [0] * R, 0, None
    for s in range(1, max(map(len, quotas)) + 1):
        going = [s <= len(q) for q in quotas]
        if rule.strategy == "dynamic" and s > 1:  # a dynamic block may be full before its schedule
            going = todo.any(-1).tolist()
        if not any(going):
            break
        taken = [t + g for t, g in zip(taken, going)]
        if probs is None or s > 1 and drafting == "step":
            logits = forward_block(model, pending, x, start, cache)
            forwards += 1
            if cache is not None:  # pending is stored; the blocks' own keys are scratch
                cache.commit([len(p) for p in pending])
                pending = [p[:0] for p in pending]
            probs, tokens = rule.sampling.distribution(logits, suppress=mask_id), None  # (R, B, V)
        if not rule.sampling.greedy:  # argmax once per forward; draws at every state
            tokens = None
        k = torch.tensor([q[s - 1] if s <= len(q) else 0 for q in quotas], device=x.device)
        x, todo, revealed, tokens = step(probs, x, todo, k[:, None], rule, generator, tokens)
        steps = torch.where(revealed, s, steps)
        picks.append(tokens)
        dists.append(probs)
    used = [t if drafting == "step" else min(t, forwards) for t in taken]  # forwards each took
    dists = None if rule.sampling.greedy else torch.stack(dists)
    return Denoised(x, steps, used, taken, torch.stack(picks), dists)


def prefill(model, ids, cache, block):
    """Commit ids at positions 0.. to the cache in one block-causal forward (block 1: causal): ids
    (..., T), or a list of each row's ids (of any lengths, whole blocks each)."""
    rows = ids if isinstance(ids, list) else [ids] if ids.dim() == 1 else list(ids)
    widths = [len(r) for r in rows]
    if max(widths):
        dev = rows[0].device
        pad = [(r, torch.arange(len(r), device=dev), None) for r in rows]
        tokens, pos, _ = masks.pack(pad, 0)  # padding after a row's last block: nothing sees it
        attend = masks.block_causal(max(widths), block, device=dev)
        model(tokens, pos[0] if len(set(widths)) == 1 else pos, attend, cache)
        cache.commit(widths)


# ----------------------------------------------------------------------------- decoding

@torch.inference_mode()
def generate(model, prompts, max_new_tokens, *, block=4, steps=None, strategy="static",
             threshold=0.9, sampling=GREEDY, stop_ids=(), generator=None, callback=None,
             on_row=None, cached=True):
    """Block-diffusion decoding of one prompt (a list of ids) or a batch (a list of prompts of any
    lengths). Returns (new tokens, Stats): at most max_new_tokens, trimmed before the first stop
    token; a batch returns a list of each. steps: denoising steps per block (default: block, one
    position per step). callback(tokens) sees each block's new tokens, exactly those returned (a
    batch: callback(i, tokens), i the prompt's place); on_row(i, tokens, stats) each prompt's
    output once it is final. cached=False is the no-cache oracle: the same decisions, the whole
    sequence recomputed at every step.
    A batch's rows take one forward per step together, each on its own block and schedule: a row
    whose block is full starts its next at the next step, and a finished row leaves the batch.
    Host syncs: one per step where a block fills (its tokens), and one per step when dynamic."""
    s = Settings(max_new_tokens, block, steps, strategy, threshold, sampling, stop_ids)
    s = s.resolve("vanilla")
    mask_id, dev = diffusion_mask_id(model), device_of(model)
    batched, prompts = as_batch(prompts, dev)
    stream = callback if batched or callback is None else lambda i, new: callback(new)
    run = Batch([Row(i) for i in range(len(prompts))], s, dev, stream, on_row)
    aligned = [len(p) - len(p) % block for p in prompts]  # blocks sit at [kB, (k+1)B)
    cache = None
    if cached:
        cache = model.new_cache(s.room(max(aligned), 2 * block), len(prompts))
        prefill(model, [p[:a] for p, a in zip(prompts, aligned)], cache, block)
    run.begin()
    tails = [p[a:] for p, a in zip(prompts, aligned)]
    x = torch.stack([torch.cat([t, t.new_full((block - len(t),), mask_id)]) for t in tails])
    todo = torch.stack([torch.arange(block, device=dev) >= len(t) for t in tails])  # (R, B)
    start, first, taken = aligned, [len(t) for t in tails], [0] * len(prompts)
    needs = [len(schedule(block - f, block, s.steps)) for f in first]  # steps to fill, static
    needs_full = len(schedule(block, block, s.steps))
    pending = [p[:0] if cached else p[:a] for p, a in zip(prompts, aligned)]
    while run.rows:
        with phase("target forward"):
            logits = forward_block(model, pending, x, start, cache)
            if cached:  # the pending blocks are stored; the blocks' own keys are scratch
                cache.commit([len(p) for p in pending])
                pending = [p[:0] for p in pending]
            probs = s.sampling.distribution(logits, suppress=mask_id)  # (R, B, V)
        with phase("step"):
            k = torch.tensor([quota(t, block, s.steps) for t in taken], device=dev)[:, None]
            x, todo, _, _ = step(probs, x, todo, k, s, generator)
        taken = [t + 1 for t in taken]
        full = [t == n for t, n in zip(taken, needs)]
        if strategy == "dynamic":  # a dynamic block may be full before its schedule
            full = (~todo.any(-1)).tolist()
        filled = [r for r, f in enumerate(full) if f]
        for r, tokens in zip(filled, x[filled].tolist() if filled else []):  # one host sync
            row = run.rows[r]
            row.stats.forwards += taken[r]
            row.stats.steps = row.stats.forwards
            run.take(row, tokens[first[r]:])
            pending[r] = x[r].clone() if cached else torch.cat([pending[r], x[r]])
            start[r], first[r], taken[r], needs[r] = start[r] + block, 0, 0, needs_full
        if filled:
            x[filled], todo[filled] = mask_id, True
        going = run.retire([cache])
        if going is not None:
            x, todo = x[going], todo[going]
            start, first, taken, needs, pending = ([v[r] for r in going]
                                                   for v in (start, first, taken, needs, pending))
    return run.returned(batched)


@torch.inference_mode()
def generate_ar(model, prompts, max_new_tokens, *, sampling=GREEDY, stop_ids=(), generator=None,
                callback=None, on_row=None, cached=True):
    """Plain autoregressive decoding, the baseline of an AR (Qwen3) target, of one prompt or a
    batch: a causal prefill of each prompt but its last token, then one forward per token on each
    row's newest token. The AR shift: the logits at position i predict the token at i + 1.
    cached=False is the oracle, recomputing the whole sequence for every token. Returns as
    generate does; callback sees each new token (a batch: callback(i, [token])), on_row each
    prompt's final output. Host syncs: one per token."""
    s = Settings(max_new_tokens, block=1, sampling=sampling, stop_ids=stop_ids).resolve("ar")
    dev = device_of(model)
    batched, seqs = as_batch(prompts, dev)
    stream = callback if batched or callback is None else lambda i, new: callback(new)
    run = Batch([Row(i) for i in range(len(seqs))], s, dev, stream, on_row)
    cache = None
    if cached:
        cache = model.new_cache(s.room(max(map(len, seqs)), 1), len(seqs))
        prefill(model, [p[:-1] for p in seqs], cache, 1)
    run.begin()
    while run.rows:
        last = torch.tensor([len(seq) - 1 for seq in seqs], device=dev)
        if cached:  # each row's newest token, which sees its cached slots
            logits = model(torch.stack([seq[-1:] for seq in seqs]), last[:, None], None, cache)
            logits = logits[:, -1]
            cache.commit(1)
        else:
            rows = [(seq, torch.arange(len(seq), device=dev),
                     masks.block_causal(len(seq), 1, device=dev)) for seq in seqs]
            logits = model(*masks.pack(rows, 0))[torch.arange(len(seqs), device=dev), last]
        tokens = s.sampling.pick(s.sampling.distribution(logits), generator)  # (R,)
        for row, token in zip(run.rows, tokens.tolist()):  # the step's host sync
            row.stats.forwards += 1
            row.stats.steps = row.stats.forwards
            run.take(row, [token])
        seqs = [torch.cat([seq, tokens[r:r + 1]]) for r, seq in enumerate(seqs)]
        going = run.retire([cache])
        if going is not None:
            seqs = [seqs[r] for r in going]
    return run.returned(batched)
