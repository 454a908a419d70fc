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
    """Denoised blocks (R rows): tokens (R, B), step (R, B) (0 = known, s = revealed at step s of
    this call), and per row the forwards it used and the steps it took; recorded, for each step s
    the pick at every position of the state before it, picks (S, R, B), and their distributions,
    probs (S, R, B, V; None when greedy). A single block, x (B,), has no row dimension."""
    tokens: torch.Tensor
    step: torch.Tensor
    forwards: list | int
    steps: list | int
    picks: torch.Tensor | None = None
    probs: torch.Tensor | None = None


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


def denoise(model, x, known, start, quotas, *, cache=None, pending=None, strategy="static",
            threshold=0.9, sampling=GREEDY, generator=None, record=False, probs=None,
            refresh=True):
    """Fill blocks' unknown positions: the one denoiser, of the target alone and of the draft.

    x (R, B): row r's block, its tokens at positions start[r]..start[r]+B-1 (x (B,) and an int
    start: one block); known (R, B) bool says which are known (anywhere in the block); the others
    are fed as mask tokens and filled. quotas[r]: the reveals of row r's steps (schedule(); one
    list: every row's); a static block takes them all, a dynamic one stops once it is full. The
    rows step together, one forward for all; a row whose block is full waits.
    pending[r]: the tokens just before row r's block that the model has not cached. With a
    cache they are the blocks completed last, and the first forward stores them (commits them);
    without one (the oracle), the whole sequence so far, recomputed at every step.
    record=True keeps each step's picks (and distributions when sampling) for verification.
    probs (R, B, V): distributions to take the first step from instead of a forward;
    refresh=False takes every later step from the first step's distributions too, with fresh
    picks at each state: a chain proposed from one forward (or from none, given probs).
    Host syncs: none, except one per step of dynamic decoding (which blocks are full?).
    """
    single = x.dim() == 1
    x, known = (x[None], known[None]) if single else (x, known)
    probs = probs[None] if single and probs is not None else probs
    R, mask_id = len(x), model.config.mask_token_id
    start = [start] * R if isinstance(start, int) else list(start)
    quotas = quotas if quotas and isinstance(quotas[0], list) else [quotas] * R
    pending = [x[r, :0] for r in range(R)] if pending is None else list(
        pending[None] if single else pending)
    todo = ~known
    x = x.masked_fill(todo, mask_id)
    step = torch.zeros_like(x)
    picks, dists, taken, forwards, tokens = [], [], [0] * R, 0, None
    for s in range(1, max(map(len, quotas)) + 1):
        going = [s <= len(q) for q in quotas]
        if strategy == "dynamic" and s > 1:  # a dynamic block may be full before its schedule
            going = todo.any(-1).tolist()
        if not any(going):
            break
        taken = [t + g for t, g in zip(taken, going)]
        if probs is None or s > 1 and refresh:
            logits = forward_block(model, pending, x, start, cache)
            forwards += 1
            if cache is not None:  # pending is stored; the blocks' own keys are scratch
                cache.commit([len(p) for p in pending])
                pending = [p[:0] for p in pending]
            probs, tokens = sampling.distribution(logits, suppress=mask_id), None  # (R, B, V)
        if tokens is None or not sampling.greedy:  # argmax once per forward; draws at every state
            tokens = sampling.pick(probs, generator)
        k = torch.tensor([q[s - 1] if s <= len(q) else 0 for q in quotas], device=x.device)
        revealed = reveal(probs, tokens, todo, k[:, None], strategy, threshold)
        x = torch.where(revealed, tokens, x)
        step = torch.where(revealed, s, step)
        todo = todo & ~revealed
        picks.append(tokens)
        dists.append(probs)
    used = [t if refresh else min(t, forwards) for t in taken]  # forwards each row took part in
    picks = torch.stack(picks) if record and picks else None
    dists = torch.stack(dists) if record and dists and not sampling.greedy else None
    if single:
        return Denoised(x[0], step[0], used[0], taken[0], None if picks is None else picks[:, 0],
                        None if dists is None else dists[:, 0])
    return Denoised(x, step, used, taken, picks, dists)


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


def as_batch(prompts, device):
    """(whether prompts is a batch, its prompts as tensors): one prompt is a sequence of ids, a
    batch a list of them (of any lengths)."""
    batch = isinstance(prompts, (list, tuple)) and len(prompts) > 0 and not isinstance(
        prompts[0], int)
    if batch and any(isinstance(p, int) for p in prompts):
        raise ValueError("a batch is a list of prompts, each a list of token ids")
    return batch, [as_prompt(p, device) for p in (prompts if batch else [prompts])]


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


@dataclass
class Rows:
    """A batch's decoding state, an entry per row still decoding: `index`, the prompt's place in
    the batch; its block's first position (`start`), first new position (`first`: past the
    prompt's tail), steps taken and schedule (`quotas`); `pending`, the tokens its model has not
    cached (cached: the block filled last; the oracle: all of them); its tokens so far (`out`)
    and Stats. x (R, B) and todo (R, B) hold every row's block: its tokens, its masked places."""
    index: list
    start: list
    first: list
    steps: list
    quotas: list
    pending: list
    out: list
    stats: list
    x: torch.Tensor
    todo: torch.Tensor

    def keep(self, rows, cache):
        """Only these rows go on; the cache's other rows leave with them."""
        for name in ("index", "start", "first", "steps", "quotas", "pending", "out", "stats"):
            setattr(self, name, [getattr(self, name)[r] for r in rows])
        self.x, self.todo = self.x[rows], self.todo[rows]
        if cache is not None:
            cache.keep_rows(rows)


def start_rows(prompts, block, steps, mask_id, cached, stats):
    """The Rows of a batch after its prefill: each prompt's whole blocks are cached (the oracle:
    pending), its tail is its first block's known part."""
    aligned = [len(p) - len(p) % block for p in prompts]  # blocks sit at [kB, (k+1)B)
    tails = [p[a:] for p, a in zip(prompts, aligned)]
    x = [torch.cat([t, t.new_full((block - len(t),), mask_id)]) for t in tails]
    todo = [torch.arange(block, device=t.device) >= len(t) for t in tails]
    return Rows(list(range(len(prompts))), aligned, [len(t) for t in tails], [0] * len(prompts),
                [schedule(block - len(t), block, steps) for t in tails],
                [p[:0] if cached else p[:a] for p, a in zip(prompts, aligned)],
                [[] for _ in prompts], stats, torch.stack(x), torch.stack(todo))


def fill(rows, full, mask_id, max_new_tokens, stop_ids, callback, cached, steps):
    """Rows whose block is full return its new tokens (callback(i, tokens)) and start their next
    block, the full one pending (cached) or appended (the oracle). Returns, per row, whether it
    goes on (no stop token, room left)."""
    B, going = rows.x.shape[-1], [True] * len(full)
    filled = [r for r, f in enumerate(full) if f]
    for r, tokens in zip(filled, rows.x[filled].tolist() if filled else []):  # one host sync
        stats, block = rows.stats[r], rows.x[r].clone()  # x is refilled below
        new, done = trim(tokens[rows.first[r]:], stop_ids, max_new_tokens - len(rows.out[r]))
        rows.out[r] += new
        stats.forwards += rows.steps[r]
        if callback:
            callback(rows.index[r], new)
        going[r] = not done
        rows.pending[r] = block if cached else torch.cat([rows.pending[r], block])
        rows.start[r], rows.first[r], rows.steps[r] = rows.start[r] + B, 0, 0
        rows.quotas[r] = schedule(B, B, steps)
    if filled:
        rows.x[filled], rows.todo[filled] = mask_id, True
    return going


def final(results, i, out, stats, seconds, on_row):
    """Prompt i's output is final: its Stats completed, its result kept, on_row told."""
    stats.tokens, stats.seconds = len(out), seconds
    results[i] = (out, stats)
    if on_row:
        on_row(i, out, stats)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, *, block=4, steps=None, strategy="static",
             threshold=0.9, sampling=GREEDY, stop_ids=(), generator=None, callback=None,
             on_row=None, cached=True):
    """Vanilla block-diffusion decoding of one prompt (a list of ids) or a batch (a list of
    prompts of any lengths). Returns (new tokens, Stats): at most max_new_tokens, trimmed before the
    first stop token; a batch returns a list of each. steps: denoising steps per block (default:
    block, one position per step). callback(tokens) sees each block's new tokens, exactly those
    returned (a batch: callback(i, tokens), i the prompt's place); on_row(i, tokens, stats) sees
    each prompt's output once it is final. cached=False is the oracle: the same decisions,
    recomputing the whole sequence at every step.
    The rows of a batch advance on their own (a row whose block is full starts its next at the
    next step), in one forward per step; a finished row leaves the batch and costs nothing more.
    Host syncs: one per step where a block fills (its tokens), and with dynamic decoding one per
    step (which blocks are full?)."""
    steps = block if steps is None else steps
    check(max_new_tokens=max_new_tokens, block=block, strategy=strategy, threshold=threshold)
    check_steps(steps, block)
    mask_id, dev = diffusion_mask_id(model), device_of(model)
    batch, prompts = as_batch(prompts, dev)
    longest = max(len(p) - len(p) % block for p in prompts)
    cache = model.new_cache(longest + max_new_tokens + 3 * block, len(prompts)) if cached else None
    t0 = sync(dev)
    if cached:
        prefill(model, [p[:len(p) - len(p) % block] for p in prompts], cache, block)
    t1 = sync(dev)
    rows = start_rows(prompts, block, steps, mask_id, cached,
                      [Stats(prefill_seconds=t1 - t0) for _ in prompts])
    stream = callback if batch or callback is None else lambda i, new: callback(new)
    results = [None] * len(prompts)
    while rows.index:
        logits = forward_block(model, rows.pending, rows.x, rows.start, cache)
        if cached:  # the pending blocks are stored; the blocks' own keys are scratch
            cache.commit([len(p) for p in rows.pending])
            rows.pending = [p[:0] for p in rows.pending]
        probs = sampling.distribution(logits, suppress=mask_id)  # (R, B, V)
        tokens = sampling.pick(probs, generator)
        k = torch.tensor([quota(s, block, steps) for s in rows.steps], device=dev)[:, None]
        revealed = reveal(probs, tokens, rows.todo, k, strategy, threshold)
        rows.x, rows.todo = torch.where(revealed, tokens, rows.x), rows.todo & ~revealed
        rows.steps = [s + 1 for s in rows.steps]
        full = [s == len(q) for s, q in zip(rows.steps, rows.quotas)]
        if strategy == "dynamic":  # a dynamic block may be full before its schedule
            full = (~rows.todo.any(-1)).tolist()
        going = fill(rows, full, mask_id, max_new_tokens, stop_ids, stream, cached, steps)
        for r in (r for r, g in enumerate(going) if not g):
            rows.stats[r].steps = rows.stats[r].forwards
            final(results, rows.index[r], rows.out[r], rows.stats[r], sync(dev) - t1, on_row)
        if not all(going):
            rows.keep([r for r, g in enumerate(going) if g], cache)
    return tuple(map(list, zip(*results))) if batch else results[0]


@torch.inference_mode()
def generate_ar(model, prompts, max_new_tokens, *, sampling=GREEDY, stop_ids=(), generator=None,
                callback=None, on_row=None, cached=True):
    """Plain autoregressive decoding, the baseline of an AR (Qwen3) target, of one prompt or a
    batch: a causal prefill of each prompt but its last token, then one forward per token on each
    row's newest token. The AR shift: the logits at position i predict the token at i + 1.
    cached=False is the oracle, recomputing the whole sequence for every token. Returns as
    generate does; callback sees each new token (a batch: callback(i, [token])), on_row each
    prompt's final output. Host syncs: one per token."""
    check(max_new_tokens=max_new_tokens)
    dev = device_of(model)
    batch, seqs = as_batch(prompts, dev)
    cache = model.new_cache(max(map(len, seqs)) + max_new_tokens, len(seqs)) if cached else None
    t0 = sync(dev)
    if cached:
        prefill(model, [p[:-1] for p in seqs], cache, 1)
    t1 = sync(dev)
    index, outs = list(range(len(seqs))), [[] for _ in seqs]
    stats, results = [Stats(prefill_seconds=t1 - t0) for _ in seqs], [None] * len(seqs)
    while index:
        last = torch.tensor([len(s) - 1 for s in seqs], device=dev)
        if cached:  # each row's newest token, which sees its cached slots
            logits = model(torch.stack([s[-1:] for s in seqs]), last[:, None], None, cache)[:, -1]
            cache.commit(1)
        else:
            rows = [(s, torch.arange(len(s), device=dev), masks.block_causal(len(s), 1, device=dev))
                    for s in seqs]
            logits = model(*masks.pack(rows, 0))[torch.arange(len(seqs), device=dev), last]
        tokens = sampling.pick(sampling.distribution(logits), generator)  # (R,)
        going = []
        for r, token in enumerate(tokens.tolist()):  # the step's host sync
            new, done = trim([token], stop_ids, max_new_tokens - len(outs[r]))
            outs[r] += new
            stats[r].forwards += 1
            if callback and new:
                callback(*((index[r], new) if batch else (new,)))
            going.append(not done)
            if done:
                stats[r].steps = stats[r].forwards
                final(results, index[r], outs[r], stats[r], sync(dev) - t1, on_row)
        seqs = [torch.cat([s, tokens[r:r + 1]]) for r, s in enumerate(seqs)]
        if not all(going):
            keep = [r for r, g in enumerate(going) if g]
            index, outs, stats = ([x[r] for r in keep] for x in (index, outs, stats))
            seqs = [seqs[r] for r in keep]
            if cache is not None:
                cache.keep_rows(keep)
    return tuple(map(list, zip(*results))) if batch else results[0]


if __name__ == "__main__":
    import cli  # the command line sits above the library; the library never imports it

    cli.run(cli.decode_main)
