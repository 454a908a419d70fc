"""Decoding with one model: SDAR's block diffusion and plain AR decoding, and the settings that every
decoder of this project shares.

An SDAR model writes B positions at a time. A block at absolute positions [kB, (k+1)B) starts as
its known tokens (the prompt's tail) and mask tokens. Each step forwards the block, picks a token at
every masked position (argmax, or a draw) with a confidence (the pick's probability), and SDAR's
rule reveals some: static reveals the step's quota of most confident positions, dynamic also every
one above a threshold. A finished block is stored in the KV cache by putting it in front of the
next block's first forward ("pending" tokens), so a block costs `steps` forwards, not steps + 1.
"""
import contextlib
import functools
import math
from collections import namedtuple
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.profiler import record_function

import mask as masks
from batch import Batch, Row, as_batch, finishes

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
            logits[..., suppress] = -math.inf  # a new tensor: no copy of the caller's is changed
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
        """One token per row of probs (..., V): argmax, or a draw (draw())."""
        return probs.argmax(-1) if self.greedy else draw(probs, generator)


def draw(probs, generator=None):
    """One draw per row of probs (..., V) by an exponential race: argmax of p / E with E ~ Exp(1),
    uniforms from the generator's own device. Unlike torch.multinomial it checks nothing on the
    host, so drawing needs no host sync."""
    source = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape, generator=generator, device=source).to(probs.device)
    return (probs / -torch.log1p(-u.clamp(max=1 - 1e-7))).argmax(-1)


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


def mode_of(target, draft, verify, drafting=None, words=PYTHON):
    """The mode of a target model (its config's model_type), a draft (a model, a head (head.py),
    "self" or None: no speculation), verify and drafting (as given: None, the default)."""
    ar = target.config.model_type == "qwen3"
    head = getattr(getattr(draft, "config", None), "model_type", None) == "simsd-head"
    if draft is None:
        return "ar" if ar else "vanilla"
    if head and (ar or verify in ("exact", "simsd")):
        raise ValueError("a head proposes to an SDAR target's lossless verification only")
    if head and drafting is not None:
        raise ValueError(f"a head proposes with one pass per step; {words.name('drafting')} "
                         "chooses a draft model's forwards")
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


def phase(name):
    """A label for the profiler around a part of the loop (split.py reads them); nothing at all
    when no profiler runs."""
    return record_function(name) if torch.autograd.profiler._is_profiler_enabled else NULL


NULL = contextlib.nullcontext()


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
    The target alone, the proposers and lossless verification decide with this one function
    (and replay, its closed form for many steps on fixed picks)."""
    conf, rank = confidence(probs, tokens, todo, strategy)
    chosen = rank < k
    if strategy == "dynamic":
        chosen = chosen | (conf > threshold)
    return todo & chosen


def confidence(probs, tokens, todo, strategy):
    """Each masked position's confidence (-inf elsewhere) and its rank among them (0: the most
    confident; ties: the lower position first)."""
    conf = probs.gather(-1, tokens[..., None])[..., 0]
    if strategy == "left":
        conf = -torch.arange(todo.shape[-1], device=todo.device).float().expand_as(conf)
    conf = conf.masked_fill(~todo, -math.inf)
    return conf, conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)


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
    return next(model.parameters()).device


def compiled(model):
    """The model compiled for decoding by torch.compile: opt-in (eager is the default and the
    reference). Its layers are compiled for static shapes: query widths padded to a few buckets
    (model.bucket) and every KV cache it makes read whole over its preallocated length with a
    validity mask, so a decode meets a few graphs; CUDA graphs on CUDA."""
    model.static = True
    torch._dynamo.config.recompile_limit = 256  # a graph per width, mask kind and batch size
    mode = "reduce-overhead" if device_of(model).type == "cuda" else None
    model.body = torch.compile(model.body, dynamic=False, mode=mode)
    return model


def diffusion_mask_id(model):
    """The mask token id of a model that can decode diffusion-style, or a ValueError."""
    config = model.config
    if config.model_type != "sdar" or config.mask_token_id is None:
        raise ValueError(f"a {config.model_type} model without a mask token cannot decode "
                         "diffusion-style; use an SDAR checkpoint (mask_token_id in its "
                         "config.json) or decode it autoregressively")
    return config.mask_token_id


@dataclass
class Pending:
    """Tokens a model has not cached yet, a row each, stored by folding them into its next forward:
    tokens (R, P), of which row r's first n[r] (whole blocks, just before its block) are real;
    whole: the host knows that every row's P are (n is P)."""
    tokens: torch.Tensor
    n: torch.Tensor
    whole: bool = False

    @classmethod
    def none(cls, rows, device):
        return cls(torch.zeros(rows, 0, dtype=torch.long, device=device),
                   torch.zeros(rows, dtype=torch.long, device=device), True)


@functools.lru_cache(maxsize=64)
def pending_layout(P, B, device):
    """[P pending tokens | a block of B]: each token's offset from the block's start, and which
    tokens each sees when every pending token is real (block-causal: pending is whole blocks)."""
    order = torch.arange(P + B, device=device) // B
    return torch.arange(-P, B, device=device), order[:, None] >= order[None, :]


def forward_block(model, x, start, pending, cache):
    """Logits (R, B, V) of blocks x (R, B), row r at positions start[r].., in one forward on each
    row's [pending | x]: a block sees its row's real pending tokens, its cached slots and itself;
    pending tokens see each other block-causally; padding (a row's pending slots past its n) sees
    only itself and nothing sees it. The cache keeps the real pending tokens (commit), so every
    shape here is known to the host without reading anything back."""
    B, P = x.shape[1], pending.tokens.shape[1]
    offsets, attend = pending_layout(P, B, x.device)
    pos = start[:, None] + offsets  # (R, P + B)
    if not pending.whole:  # row r's real pending tokens end at its block
        short = P - pending.n[:, None]  # (R, 1): padding slots
        pos = pos + short * (offsets < 0)
        keys = (offsets >= 0) | (offsets + short < 0)  # (R, P + B): real tokens
        attend = attend & keys[:, None, :] | torch.eye(P + B, dtype=torch.bool, device=x.device)
    logits = model(torch.cat([pending.tokens, x], 1), pos, attend if P else None, cache)[:, P:]
    if cache is not None:  # pending is stored; x's keys are scratch
        cache.commit(P if pending.whole else pending.n, most=P)
    return logits


@dataclass
class Denoised:
    """Denoised blocks (R rows): tokens (R, B), step (R, B) (0 = known, s = revealed at step s of
    this call); for each step s the block before it, states (S, R, B), its masked positions,
    masked (S, R, B), the pick at every position of it, picks (S, R, B), and their distributions,
    probs (S, R, B, V; None when greedy); the model's forwards, and the host syncs it made."""
    tokens: torch.Tensor
    step: torch.Tensor
    states: torch.Tensor
    masked: torch.Tensor
    picks: torch.Tensor
    probs: torch.Tensor | None
    forwards: int
    reads: int = 0


def denoise(model, x, start, done, rule, *, known=None, cache=None, pending=None, generator=None,
            probs=None, drafting="step"):
    """Fill blocks' masked positions step after step: the draft proposing, the target replaying
    its own distributions, a target's decodes for distillation.

    x (R, B): row r's block at positions start[r].. (the mask id where unknown; known (R, B), when a
    known token may be the mask id: an AR target's), `done` (R,) steps of SDAR's schedule taken on
    it. Every row takes rule.steps steps (the most a block needs); a row whose block is full
    reveals nothing more. pending: what the model has not cached, stored by the first forward.
    drafting "block": one forward, and every later step from its distributions, with fresh picks
    at each state (given probs (R, B, V): no forward), and no host sync; "step": a forward per
    step, with a cache (a draft's) until every row's block is full: one host sync a step, which
    costs less than the forwards it saves (the states after the last step taken repeat it,
    revealing nothing); without (a head, head.Bound): every step, no sync."""
    mask_id = model.config.mask_token_id
    todo = x == mask_id if known is None else ~known
    S = rule.steps
    quotas = quota(done[:, None] + torch.arange(S, device=x.device), x.shape[1], S)  # (R, S)
    forwards = 0
    if probs is None:
        pending = pending or Pending.none(len(x), x.device)
        logits, forwards = forward_block(model, x, start, pending, cache), 1
        probs = rule.sampling.distribution(logits, suppress=mask_id)  # (R, B, V)
    if drafting == "block" and rule.sampling.greedy:  # the same picks at every state
        return replay(x, todo, probs, quotas, rule, forwards)
    steps, states, masked, picks, dists, reads = torch.zeros_like(x), [], [], [], [], 0
    for s in range(S):
        if s and drafting == "step":
            reads += cache is not None
            if cache is not None and not todo.any():  # a host sync: it saves draft forwards
                states += [x] * (S - s)  # the steps not taken: nothing changes
                masked += [todo] * (S - s)
                picks += picks[-1:] * (S - s)
                dists += dists[-1:] * (S - s)
                break
            logits, forwards = forward_block(model, x, start, Pending.none(len(x), x.device),
                                             cache), forwards + 1
            probs = rule.sampling.distribution(logits, suppress=mask_id)
        states.append(x)
        masked.append(todo)
        x, todo, revealed, tokens = step(probs, x, todo, quotas[:, s:s + 1], rule, generator)
        steps = torch.where(revealed, s + 1, steps)
        picks.append(tokens)
        dists.append(probs)
    dists = None if rule.sampling.greedy else torch.stack(dists)
    return Denoised(x, steps, torch.stack(states), torch.stack(masked), torch.stack(picks), dists,
                    forwards, reads)


def replay(x, todo, probs, quotas, rule, forwards):
    """denoise's steps on fixed distributions with greedy picks, in closed form: the picks and
    their confidences never change, so the steps reveal the masked positions in one order (the
    most confident first), each step as many as its quota (a dynamic first step also every one
    above the threshold, and no later one finds any): position i, ranked r among the masked, is
    revealed by the first step s whose reveals so far exceed r. One sort for every step."""
    picks = probs.argmax(-1)  # (R, B)
    conf, rank = confidence(probs, picks, todo, rule.strategy)
    reveals = quotas.cumsum(1)  # (R, S): revealed after each step
    if rule.strategy == "dynamic":
        above = (conf > rule.threshold).sum(-1, keepdim=True)
        reveals = reveals + (above - quotas[:, :1]).clamp(min=0)
    S = quotas.shape[1]
    steps = todo * (1 + (reveals[:, None, :] <= rank[..., None]).sum(-1))  # (R, B)
    steps = steps * (steps <= S)  # 0: known, or still masked after the S steps
    earlier = (steps > 0) & (steps < torch.arange(1, S + 1, device=x.device)[:, None, None])
    return Denoised(torch.where(steps > 0, picks, x), steps, torch.where(earlier, picks, x),
                    todo & ~earlier, picks.expand(S, -1, -1), None, forwards)  # (S, R, B) each


PREFILL_TOKENS = 8192  # a prefill forward's tokens over every row: it bounds attention's memory


def prefill(model, ids, cache, block, chunk=PREFILL_TOKENS):
    """Commit ids at positions 0.. to the cache, block-causally (block 1: causal): ids (..., T),
    or a list of each row's ids (of any lengths, whole blocks each). In forwards of whole blocks,
    at most `chunk` tokens over all rows each, so that attention's memory stays bounded whatever
    the prompts' length; no logits (nothing reads them). A row's padding after its last block is
    never committed, and no real token sees it."""
    rows = ids if isinstance(ids, list) else [ids] if ids.dim() == 1 else list(ids)
    widths = [len(r) for r in rows]
    width, dev = max(widths), rows[0].device
    tokens = torch.stack([F.pad(r, (0, width - len(r))) for r in rows])  # (R, width)
    step = max(1, chunk // len(rows) // block) * block
    for a in range(0, width, step):
        b = min(a + step, width)
        model.hidden(tokens[:, a:b], torch.arange(a, b, device=dev),
                     masks.block_causal(b - a, block, device=dev), cache)
        new = [min(max(w - a, 0), b - a) for w in widths]  # each row's real tokens in the chunk
        cache.commit(new[0] if len(set(new)) == 1 else new)
        done = [min(w, b) for w in widths]
        cache.tighten(max(done), even=len(set(done)) == 1)


def stop_tensor(stop_ids, device):
    """The stop ids on the device, once per decode (a stop token is looked for there)."""
    return torch.tensor(sorted(stop_ids) or [-1], device=device)


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
    whose block is full starts its next at the next step. Host syncs: one per step where a block
    may fill (static: the host knows when; dynamic: every step): it reads the full blocks."""
    s = Settings(max_new_tokens, block, steps, strategy, threshold, sampling, stop_ids)
    s = replace(s.resolve("vanilla"), mask_id=diffusion_mask_id(model))
    dev = device_of(model)
    batched, prompts = as_batch(prompts, dev)
    stream = callback if batched or callback is None else lambda i, new: callback(new)
    run = Batch([Row(i) for i in range(len(prompts))], s, dev, stream, on_row)
    rows = Blocks(model, prompts, s, cached)
    run.begin()
    while run.live:
        with phase("target forward"):
            probs = rows.forward()
        with phase("step"):
            filled = rows.step(probs, generator)
        for row in run.live:
            row.stats.forwards += 1
            row.stats.steps += 1
            row.stats.readbacks += filled is not None
        for row, (full, tokens) in zip(run.rows, filled or ()):
            if full and not row.finished:
                run.take(row, tokens)
        rows.keep(*run.compact(rows.dead))
    return run.returned(batched)


class Blocks:
    """The rows' blocks in block-diffusion decoding, on the device, a row each: x (R, B) (the mask
    id where masked), start (R,), first (R,): the block's first new position (past the prompt's
    tail), taken (R,): its steps, returned (R,): its tokens returned, dead (R,): its output is
    final; and what the model has not cached (the block filled last; the oracle: everything).
    The host knows every row's static schedule and its cache's lengths, and reads the rest back
    only where a block may fill."""

    def __init__(self, model, prompts, s, cached):
        B, dev = s.block, device_of(model)
        self.model, self.s, self.cached = model, s, cached
        aligned = [len(p) - len(p) % B for p in prompts]  # blocks sit at [kB, (k+1)B)
        tails = [p[a:] for p, a in zip(prompts, aligned)]
        self.x = torch.stack([torch.cat([t, t.new_full((B - len(t),), s.mask_id)]) for t in tails])
        self.start = torch.tensor(aligned, device=dev)
        self.first = torch.tensor([len(t) for t in tails], device=dev)
        self.taken, self.returned = self.first * 0, self.first * 0
        self.dead = self.first < 0
        self.stops = stop_tensor(s.stop_ids, dev)
        self.needs = [len(schedule(B - len(t), B, s.steps)) for t in tails]  # static: to fill
        self.host_taken, self.lens = [0] * len(prompts), aligned  # host copies
        self.cache = model.new_cache(s.room(max(aligned), 2 * B), len(prompts)) if cached else None
        if cached:
            prefill(model, [p[:a] for p, a in zip(prompts, aligned)], self.cache, B)
            self.pending = Pending.none(len(prompts), dev)
        else:  # the oracle's pending: everything before the block, recomputed at every step
            width = max(aligned)
            self.pending = Pending(torch.stack([torch.cat([p[:a], p.new_zeros(width - a)])
                                                for p, a in zip(prompts, aligned)]), self.start)

    def forward(self):
        """The rows' distributions (R, B, V) at their blocks, in one forward."""
        logits = forward_block(self.model, self.x, self.start, self.pending, self.cache)
        if self.cached:
            self.pending = Pending.none(len(self.x), self.x.device)
            self.cache.tighten(max(self.lens), even=len(set(self.lens)) == 1)
        return self.s.sampling.distribution(logits, suppress=self.s.mask_id)

    def step(self, probs, generator):
        """One step of every row; then each full block's tokens become pending and a fresh block
        starts after it. Returns None when no block can be full (static), else per row (whether
        its block filled, its new tokens), read back in the step's one host sync."""
        s, B = self.s, self.s.block
        k = quota(self.taken, B, s.steps)[:, None]
        self.x, todo, _, _ = step(probs, self.x, self.x == s.mask_id, k, s, generator)
        self.taken = self.taken + 1
        self.host_taken = [t + 1 for t in self.host_taken]
        if s.strategy == "static" and all(t < n for t, n in zip(self.host_taken, self.needs)):
            return None
        full = ~todo.any(-1) & ~self.dead  # (R,): a dynamic block may be full before its schedule
        # the block's new tokens (from `first`, past the prompt's tail) moved to the front
        new = self.x.gather(1, (torch.arange(B, device=self.x.device) + self.first[:, None]) % B)
        seen = torch.cat([full[:, None].long(), self.first[:, None], new], 1).tolist()
        out = [(bool(f), row[:B - first]) for f, first, *row in seen]
        filled = [f for f, _ in out]
        self.advance(full, new, filled)
        self.host_taken = [0 if f else t for f, t in zip(filled, self.host_taken)]
        self.needs = [len(schedule(B, B, s.steps)) if f else n for f, n in zip(filled, self.needs)]
        self.lens = [n + B * f if self.cached else n for n, f in zip(self.lens, filled)]
        return out

    def advance(self, full, new, filled):
        """Full blocks become pending (the oracle's: appended to it) and their rows may finish;
        fresh blocks start after them. filled: `full` as read back."""
        B, n = self.s.block, full.long() * self.s.block
        count = (B - self.first) * full.long()  # new tokens returned
        self.dead = self.dead | full & finishes(new, count, self.returned, self.s.max_new_tokens,
                                                self.stops)
        self.returned = self.returned + count
        if self.cached and any(filled):
            self.pending = Pending(self.x.clone(), n, whole=all(filled))
        elif not self.cached:  # the oracle recomputes everything: pending grows by the full block
            tokens = torch.cat([self.pending.tokens, torch.zeros_like(self.x)], 1)
            at = self.pending.n[:, None] + torch.arange(B, device=self.x.device)  # (R, B)
            kept = torch.where(full[:, None], self.x, tokens.gather(1, at))
            self.pending = Pending(tokens.scatter(1, at, kept), self.pending.n + n)
        self.x = torch.where(full[:, None], self.s.mask_id, self.x)
        self.start, self.first = self.start + n, torch.where(full, 0, self.first)
        self.taken = torch.where(full, 0, self.taken)

    def keep(self, index, places):
        """Only the rows at `index` (on the device; `places` on the host) go on (None: all)."""
        if index is None:
            return
        for name in ("x", "start", "first", "taken", "returned", "dead"):
            setattr(self, name, getattr(self, name)[index])
        p = self.pending
        self.pending = Pending(p.tokens[index], p.n[index], p.whole)
        self.needs, self.host_taken, self.lens = ([v[r] for r in places] for v in
                                                  (self.needs, self.host_taken, self.lens))
        if self.cache is not None:
            self.cache.keep_rows(index)


@torch.inference_mode()
def generate_ar(model, prompts, max_new_tokens, *, sampling=GREEDY, stop_ids=(), generator=None,
                callback=None, on_row=None, cached=True):
    """Plain autoregressive decoding, the baseline of an AR (Qwen3) target, of one prompt or a
    batch: a causal prefill of each prompt but its last token, then one forward per token on each
    row's newest token. The AR shift: the logits at position i predict the token at i + 1.
    cached=False is the oracle, recomputing the whole sequence for every token. Returns as
    generate does; callback sees each new token (a batch: callback(i, [token])), on_row each
    prompt's final output. Host syncs: one per token (it reads the tokens)."""
    s = Settings(max_new_tokens, block=1, sampling=sampling, stop_ids=stop_ids).resolve("ar")
    dev = device_of(model)
    batched, seqs = as_batch(prompts, dev)
    stream = callback if batched or callback is None else lambda i, new: callback(new)
    run = Batch([Row(i) for i in range(len(seqs))], s, dev, stream, on_row)
    width, stops = max(map(len, seqs)) + max_new_tokens, stop_tensor(stop_ids, dev)
    ids = torch.stack([torch.cat([p, p.new_zeros(width - len(p))]) for p in seqs])  # (R, W)
    last = torch.tensor([len(p) - 1 for p in seqs], device=dev)  # (R,): each row's newest token
    returned, dead, cache = last * 0, last < 0, None
    if cached:
        cache = model.new_cache(s.room(max(map(len, seqs)), 1), len(seqs))
        prefill(model, [p[:-1] for p in seqs], cache, 1)
    run.begin()
    while run.live:
        rows = torch.arange(len(last), device=dev)
        if cached:  # each row's newest token, which sees its cached slots
            logits = model(ids[rows, last][:, None], last[:, None], None, cache)[:, -1]
            cache.commit(1)
        else:
            attend = masks.block_causal(width, 1, device=dev)
            logits = model(ids, torch.arange(width, device=dev), attend)[rows, last]
        tokens = s.sampling.pick(s.sampling.distribution(logits), generator)  # (R,)
        last = (last + 1).clamp(max=width - 1)
        ids[rows, last] = tokens
        dead = dead | finishes(tokens[:, None], (~dead).long(), returned, max_new_tokens, stops)
        returned = returned + 1
        for row, token in zip(run.rows, tokens.tolist()):  # the step's host sync
            if not row.finished:
                row.stats.forwards += 1
                row.stats.steps, row.stats.readbacks = row.stats.forwards, row.stats.forwards
                run.take(row, [token])
        index, _ = run.compact(dead)
        if index is not None:
            ids, last, returned, dead = ids[index], last[index], returned[index], dead[index]
            if cache is not None:
                cache.keep_rows(index)
    return run.returned(batched)
