"""Speculative decoding, every mode, for one prompt or a batch: SimSD for an SDAR target (the
paper's verifications, and lossless verification with any proposer), SpecDiff for an autoregressive one.
simsd.py is the paper's method alone, at batch 1: read it first.

One iteration (`speculate`), for every row at once, in tensors on the device:
  1. lay out - every row's proposals laid out for one target forward, by the verifier;
  2. forward - the target's one forward, for every row;
  3. accept  - the verifier's verdict from the target's distributions (verifier.py, lossless.py);
  4. commit  - committed tokens join their blocks, and each cache keeps what was committed;
  5. propose - the next iteration's chains of states for every row's current block and, with
               lookahead, the blocks after it, each made by SDAR's rule: by the draft (here: a
               forward per step, or one per block) and, for lossless verification, by the target
               itself (lossless.py);
  6. read back what the host needs, in one copy: the tokens each row may return, its stats, and
               how wide the next forward is (which is why proposing comes before it).
The host holds only each row's output and stats, and the shapes of the next iteration.
"""
import time
from dataclasses import dataclass, replace

import torch

from batch import Batch, Row, as_batch, finishes
from head import Head
from lossless import Lossless, head_chain, self_chain
from sdar import (GREEDY, LOOKAHEAD, Pending, Settings, denoise, device_of, diffusion_mask_id,
                  mode_of, phase, prefill, stop_tensor)
from verifier import DRAFT, SELF, Causal, Chain, Paper, gather_rows, readback

VERIFIERS = {"lossless": Lossless, "self": Lossless, "paper": Paper, "specdiff": Causal}


@dataclass
class Rows:
    """Every row's state, on the device (R rows): its current block x (R, B) and which positions
    are known (R, B) (elsewhere the mask id), start (R,), done (R,): the target steps taken on
    it, returned (R,): its positions already returned; end (R,): the position after the last token max_new_tokens allows; reach
    (R,): the blocks one forward reaches (lookahead, within end); out (R,): the tokens returned;
    pending / draft_pending: what the target / the draft has not cached (an AR target: its newest
    token); hint (R, B, V) and hidden (R, B, d), where has_hint: the target's distributions and
    final hidden states (what a head reads) at the state its last step
    was taken from; dead (R,): the row's output is final."""
    x: torch.Tensor
    known: torch.Tensor
    start: torch.Tensor
    done: torch.Tensor
    returned: torch.Tensor
    end: torch.Tensor
    reach: torch.Tensor
    out: torch.Tensor
    pending: Pending
    draft_pending: Pending
    hint: torch.Tensor
    hidden: torch.Tensor
    has_hint: torch.Tensor
    dead: torch.Tensor


@dataclass
class Run:
    """One decode: the models and their caches, the settings and the verifier, the rows (on the
    device, and their Rows record in `batch` on the host), the random state (on the draft's
    device); the chains proposed for the next forward and what the host knows of its shape."""
    target: torch.nn.Module
    draft: torch.nn.Module | None
    target_cache: object
    draft_cache: object
    settings: Settings
    verifier: object
    batch: Batch
    rows: Rows
    generator: torch.Generator | None
    draft_rule: Settings
    stops: torch.Tensor
    chains: dict | None = None
    trie: object = None  # the chains as a tree of states (lossless, exact), for the next forward
    keys: tuple = ()  # its rows' shapes, as read back (verifier.Tree.keys)
    blocks: int = 1  # the blocks the draft drafts: an upper bound, as read back
    marks: torch.Tensor | None = None  # the draft cache's lengths before it stored proposals
    tracing: bool = False  # compute what --show reads
    hidden: torch.Tensor | None = None  # the last forward's final hidden states where read


# ----------------------------------------------------------------------------- one iteration

def speculate(run, trace=False):
    """One iteration for every row: lay out -> one target forward -> accept -> commit -> propose
    the next -> read back. Returns what was read back (with trace, what --show reads too)."""
    s, chains = run.settings, run.chains
    with phase("lay out"):  # every row's proposals in one forward; rows padded to one width
        laid = run.verifier.layout(run, chains)
    with phase("target forward"):  # its distributions at each row's verifying tokens
        h = run.target.hidden(laid.ids, laid.pos, laid.mask, run.target_cache)
        run.hidden = gather_rows(h, laid.verifying)  # (R, M, d): what a head reads, and the LM head
        suppress = s.mask_id if run.target.config.model_type == "sdar" else None  # AR: no mask
        q = s.sampling.distribution(run.target.lm_head(run.hidden), suppress)  # (R, M, V)
    with phase("accept"):  # what each row commits (and beside it, what stats and --show read)
        verdict = run.verifier.accept(run, laid, q)
    with phase("commit"):
        starts = run.rows.start
        new, n_new = commit(run, verdict)
    with phase("propose"):
        propose(run)
    seen = read(run, verdict, new, n_new, starts if trace else None)
    seen["width"] = laid.ids.shape[1]  # this forward's
    return seen


def propose(run):
    """Every row's chains for the next forward: the target's own (lossless), then the draft's;
    and each row's width in that forward, which the host learns with the next readback."""
    chains, proposer = {}, run.settings.proposer
    if proposer != "draft":
        chains[SELF] = self_chain(run)
    if proposer != "self" and isinstance(run.draft, Head):  # it proposes in the draft's place
        t0 = time.perf_counter()
        with phase("draft"):  # the head's passes, in the draft's place
            chains[DRAFT] = head_chain(run)
        for row in run.batch.live:
            row.stats.draft_forwards += run.settings.steps
            row.stats.draft_seconds += time.perf_counter() - t0
    elif proposer != "self":
        chains[DRAFT] = draft_chain(run)
    run.chains, run.trie = chains, run.verifier.tree(run, chains)


def draft_chain(run):
    """The draft's chain for every row: the rest of its current block by the target's rule, then
    whole blocks, each after storing the one before in the draft's cache (tentatively: commit()
    rewinds what the target does not commit); run.blocks of them, the most any row reaches (a
    row's blocks past its own reach are not real). drafting "step": a forward per step, "block":
    one per block."""
    s, rows, B = run.settings, run.rows, run.settings.block
    run.marks = run.draft_cache.lens.clone()
    x, known, start, done = rows.x, rows.known, rows.start, rows.done
    pending, parts, t0 = rows.draft_pending, [], time.perf_counter()
    for _ in range(run.blocks):
        with phase("draft"):
            d = denoise(run.draft, x, start, done, run.draft_rule, known=known,
                        cache=run.draft_cache, pending=pending, generator=run.generator,
                        drafting=s.drafting)
        parts.append(d)
        pending = Pending(d.tokens, torch.full_like(start, B), whole=True)
        x, known = torch.full_like(x, s.mask_id), torch.zeros_like(known)
        start, done = start + B, done * 0
    seconds = time.perf_counter() - t0  # no sync: on CUDA, the host's part
    for row in run.batch.live:
        row.stats.draft_forwards += sum(d.forwards for d in parts)
        row.stats.readbacks += sum(d.reads for d in parts)
        row.stats.draft_seconds += seconds
    drafted = run.verifier.drafted(rows.reach) * ~rows.dead  # (R,): a dead row drafts nothing
    tokens = torch.stack([d.tokens for d in parts], 1)  # (R, D, B)
    step = torch.stack([d.step for d in parts], 1)
    states = torch.stack([d.states.transpose(0, 1) for d in parts], 1)  # (R, D, S, B)
    picks = torch.stack([d.picks.transpose(0, 1) for d in parts], 1)
    probs = None if parts[0].probs is None else torch.stack(
        [d.probs.transpose(0, 1) for d in parts], 1)
    reached = torch.arange(len(parts), device=x.device) < drafted[:, None]  # (R, D)
    real = torch.stack([d.masked.transpose(0, 1) for d in parts], 1).any(-1) & reached[..., None]
    tail = run.verifier.tails & (drafted < rows.reach) & ~rows.dead
    return Chain(tokens, step, states, picks, probs, real, tail)


# ----------------------------------------------------------------------------- commit

def commit(run, verdict):
    """Each cache keeps what was committed of what it stored in this iteration: the target the
    tokens its verdict keeps (moved to the front when others lie between them), the draft its
    pending blocks and the leading drafted blocks committed exactly as drafted; the other
    complete blocks become its pending. The first incomplete block is the current one (a fresh
    one after the complete ones when none is). A dead row commits nothing. Returns each row's newly
    returnable tokens (R, W) and how many (R,)."""
    s, rows, B = run.settings, run.rows, run.settings.block
    live = ~rows.dead
    R, J = verdict.tokens.shape[:2]
    run.target_cache.commit(verdict.n_keep * live, verdict.keep, most=verdict.keep.shape[1])
    flat = verdict.tokens.flatten(1)  # (R, J B)
    complete = verdict.known.all(-1).long().cumprod(1).sum(1)
    known = verdict.known.flatten(1).long()
    first_unknown = torch.where(known.all(1), J * B, (1 - known).argmax(1))
    n_new = (first_unknown - rows.returned) * live
    new = flat.gather(1, (rows.returned[:, None] + torch.arange(J * B, device=flat.device))
                      .clamp(max=J * B - 1))
    if run.draft_cache is not None:
        lengths = run.marks + (rows.draft_pending.n + verdict.kept * B) * live
        run.draft_cache.rewind(lengths)
        width = rows.draft_pending.tokens.shape[1]
        moved = flat.gather(1, (verdict.kept[:, None] * B + torch.arange(width, device=flat.device))
                            .clamp(max=J * B - 1))
        n = ((complete - verdict.kept).clamp(min=0) * B) * live
        rows.draft_pending = Pending(moved, n)
    fresh = (complete >= J)[:, None]
    at = complete.clamp(max=J - 1)[:, None]
    x, block_known = gather_rows(verdict.tokens, at)[:, 0], gather_rows(verdict.known, at)[:, 0]
    rows.x = torch.where(live[:, None], torch.where(fresh, s.mask_id, x), rows.x)
    rows.known = torch.where(live[:, None], block_known & ~fresh, rows.known)
    rows.start = rows.start + complete * B * live
    rows.done = torch.where(live, verdict.done, rows.done)
    rows.returned = torch.where(live, (first_unknown - complete * B).clamp(0, B), rows.returned)
    rows.pending = Pending(verdict.pending, verdict.n_pending * live)
    rows.hint, rows.has_hint = verdict.hint, verdict.has_hint & live
    if verdict.hidden is not None:
        rows.hidden = verdict.hidden
    rows.dead = rows.dead | finishes(new, n_new, rows.out, s.max_new_tokens, run.stops)
    rows.out = rows.out + n_new
    rows.reach = reach(rows, s)
    return new, n_new


def reach(rows, s):
    """(R,): the blocks one forward reaches from each row's current block: lookahead, within the
    row's end (at least 1)."""
    return (-(-(rows.end - rows.start) // s.block)).clamp(1, s.lookahead)


def read(run, verdict, new, n_new, starts=None):
    """The iteration's one host sync: each row's new tokens and its stats, the next forward's
    trees' shapes, the caches' lengths, the rows' reach; and given the blocks' starts, what
    --show reads."""
    stats = torch.stack([verdict.stats[name] for name in STATS], 1)  # (R, 5)
    tensors = dict(new=new, n_new=n_new, target=run.target_cache.lens, reach=run.rows.reach,
                   stats=stats, **shape_of(run))
    if run.draft_cache is not None:
        tensors["draft"] = run.draft_cache.lens
    if starts is not None:
        tensors.update({f"trace_{k}": v for k, v in verdict.trace.items()})
        tensors.update(tokens=verdict.tokens, starts=starts)
    seen = readback(**tensors)
    learn(run, seen)
    return seen


def shape_of(run):
    """What the host needs to lay out the next forward's trees (their shapes), on the device."""
    if run.trie is None:
        return {}
    return dict(alive=run.trie.alive, parent=run.trie.parent, block=run.trie.block,
                pending=run.rows.pending.n)


def learn(run, seen):
    """What the host takes from a readback: the next trees' shapes, the caches' lengths, the
    blocks the draft drafts next (the most any row still reaches)."""
    if run.trie is not None:
        run.keys = run.trie.keys(seen["pending"], run.rows.pending.tokens.shape[1],
                                 run.settings.block, seen)
    live = [r for r, row in enumerate(run.batch.rows) if not row.finished] or [0]
    run.blocks = run.verifier.drafted(max(seen["reach"][r] for r in live))
    for name, cache in (("target", run.target_cache), ("draft", run.draft_cache)):
        if cache is not None:
            lengths = seen[name]
            cache.tighten(max(lengths), even=len(set(lengths)) == 1)


# ----------------------------------------------------------------------------- the loop

def widest(s, mode):
    """The most new tokens one forward writes in this mode (a KV cache's scratch). The target's: a
    pending block, then lossless: a clean copy per block reached but the current one and a copy
    per proposed state (the target's own chain and its next all-masked state, the draft's chain
    of L - 1 blocks and its next); exact: clean copies and a copy per draft state; simsd: clean
    copies and two copies per block; SpecDiff: its newest token and L drafted blocks. The
    draft's: L pending blocks and the block it denoises."""
    B, L, S = s.block, s.lookahead, s.steps
    target = {"lossless": B * (1 + L + L * S + 2), "self": B * (1 + L + L * S + 2),
              "paper": B * (L + L * (S if s.verify == "exact" else 2)), "specdiff": 1 + L * B}
    return max(target[mode], B * (L + 1))


def start(target, draft, prompts, s, mode, generator, on_row):
    """The Run after the prefill: the draft and a diffusion target cache each prompt's whole
    blocks (its tail is its current block's known part); an AR target all but its newest token.
    Then the first chains are proposed and their width read back."""
    B, ar, dev = s.block, mode == "specdiff", device_of(target)
    aligned = [len(p) - len(p) % B for p in prompts]
    batch = Batch([Row(i) for i in range(len(prompts))], s, dev, on_row=on_row)
    room = s.room(max(map(len, prompts)), widest(s, mode))
    target_cache = target.new_cache(room, len(prompts))
    prefill(target, [p[:-1] if ar else p[:a] for p, a in zip(prompts, aligned)], target_cache,
            1 if ar else B)
    draft_cache = None
    if draft is not None and not isinstance(draft, Head):  # the host's bound on its cache may
        # run 3L blocks past its longest
        # row: its proposals are stored, padding counted, before a readback tells the lengths
        draft_cache = draft.new_cache(room + 3 * s.lookahead * B, len(prompts))
        prefill(draft, [p[:a].to(device_of(draft)) for p, a in zip(prompts, aligned)],
                draft_cache, B)
    batch.begin()
    rows = first_rows(prompts, aligned, s, ar, target.config)
    draft_rule = replace(s, strategy="left") if ar and not s.sampling.greedy else s
    run = Run(target, draft, target_cache, draft_cache, s, VERIFIERS[mode](s), batch, rows,
              generator, draft_rule, stop_tensor(s.stop_ids, dev))
    longest = max(len(p) + s.max_new_tokens - a for p, a in zip(prompts, aligned))
    run.blocks = run.verifier.drafted(min(s.lookahead, -(-longest // B)))
    propose(run)
    learn(run, readback(target=run.target_cache.lens, reach=run.rows.reach, **shape_of(run),
                        **({} if draft_cache is None else dict(draft=draft_cache.lens))))
    return run


def first_rows(prompts, aligned, s, ar, config):
    """The Rows before the first iteration: each prompt's tail is its first block's known part;
    an AR target's newest token is pending."""
    B, dev, R = s.block, prompts[0].device, len(prompts)
    tails = [p[a:] for p, a in zip(prompts, aligned)]
    x = torch.stack([torch.cat([t, t.new_full((B - len(t),), s.mask_id)]) for t in tails])
    start = torch.tensor(aligned, device=dev)
    pending = Pending(torch.stack([p[-1:] for p in prompts]), torch.ones_like(start)) if ar else \
        Pending(torch.zeros_like(x), start * 0)
    end = torch.tensor([len(p) + s.max_new_tokens for p in prompts], device=dev)
    known = torch.arange(B, device=dev) < torch.tensor([len(t) for t in tails], device=dev)[:, None]
    rows = Rows(x, known, start, start * 0, torch.tensor([len(t) for t in tails], device=dev), end,
                start * 0, start * 0, pending,
                Pending(torch.zeros(R, s.lookahead * B, dtype=torch.long, device=dev), start * 0),
                torch.zeros(R, B, config.vocab_size, device=dev),
                torch.zeros(R, B, config.hidden_size, device=dev), start < 0, start < 0)
    rows.reach = reach(rows, s)
    return rows


@torch.inference_mode()
def generate(target, draft, prompts, max_new_tokens, *, block=4, steps=None, strategy="static",
             threshold=0.9, sampling=GREEDY, verify=None, accept=None, lookahead=LOOKAHEAD,
             eos_min_prob=0.0, stop_ids=(), generator=None, on_iteration=None, on_row=None,
             proposer=None, drafting=None):
    """Speculative decoding: SimSD for a diffusion (SDAR) target, SpecDiff for an AR (qwen3) one,
    of one prompt or a batch (a list of prompts of any lengths). Returns (new tokens, Stats) as
    sdar.generate does (a batch: a list of each). block, steps, strategy, threshold and
    sampling: the target's decoding, which the proposers follow. verify (a diffusion target):
    "lossless" (default: sdar.generate's output), or the paper's "exact" or "simsd"; accept:
    "step" (default) or "position", for exact and simsd. draft None: the target proposes for
    itself (lossless). proposer, with a draft: "draft", or "hybrid" (the draft and the target
    both; lossless only; default by strategy, sdar.PROPOSER). drafting: "step" (a draft forward
    per step) or "block" (one per block; the default but for exact and simsd, whose output is
    the draft's order's). lookahead: the blocks one target forward reaches. eos_min_prob: exact
    and simsd's gate on stop tokens. generator: sampling's random state, on the draft's device
    (the target's without a draft). on_iteration(info) sees each row's iteration: its blocks'
    starts, committed tokens and fates, the proposed tokens and step map of the chain shown and
    who proposed it (by), the steps taken, the clean copies stored, the row's place and its new
    tokens; on_row(i, tokens, stats) each prompt's output once it is final.
    The rows of a batch share every forward; each row takes its own steps and blocks. Host syncs:
    one per iteration for all rows (and one before the first)."""
    s = Settings(max_new_tokens, block, steps, strategy, threshold, sampling, stop_ids, verify,
                 accept, lookahead, eos_min_prob, proposer, drafting)
    mode = mode_of(target, "self" if draft is None else draft, verify, drafting)
    denoiser = target if draft is None or isinstance(draft, Head) else draft  # its mask id
    s = replace(s.resolve(mode), mask_id=diffusion_mask_id(denoiser))
    batched, prompts = as_batch(prompts, device_of(target))
    run = start(target, draft, prompts, s, mode, generator, on_row)
    run.tracing = on_iteration is not None
    while run.batch.live:
        seen = speculate(run, trace=on_iteration is not None)
        for r, row in enumerate(run.batch.rows):
            if row.finished:
                continue
            count(row.stats, seen, r)
            new = run.batch.take(row, seen["new"][r][:seen["n_new"][r]])
            if on_iteration:
                on_iteration(info(seen, r, row, new, s))
        index, places = run.batch.compact(run.rows.dead)
        if index is not None:
            compact(run, index, places)
    return run.batch.returned(batched)


# A verdict's stats, and the Stats fields they add to.
STATS = {"steps": "steps", "matched": "matched", "by_draft": "draft_matched",
         "proposed": "drafted", "accepted": "accepted"}


def count(stats, seen, r):
    """Add one iteration to a row's stats."""
    stats.forwards += 1
    stats.readbacks += 1
    stats.width += seen["width"]
    for field, value in zip(STATS.values(), seen["stats"][r]):
        setattr(stats, field, getattr(stats, field) + value)


def compact(run, index, places):
    """Only the rows at `index` (on the device; `places` on the host) go on: every row tensor and
    cache is cut."""
    rows = run.rows
    for name in ("x", "known", "start", "done", "returned", "end", "reach", "out", "hint",
                 "hidden", "has_hint", "dead"):
        setattr(rows, name, getattr(rows, name)[index])
    for name in ("pending", "draft_pending"):
        p = getattr(rows, name)
        setattr(rows, name, Pending(p.tokens[index], p.n[index], p.whole))
    for cache in (run.target_cache, run.draft_cache):
        if cache is not None:
            cache.keep_rows(index)
    run.marks = None if run.marks is None else run.marks[index]
    run.trie = None if run.trie is None else run.trie.rows(index)
    run.keys = tuple(run.keys[r] for r in places) if run.keys else run.keys
    run.chains = {flag: Chain(*(None if x is None else x[index] for x in (
        c.tokens, c.step, c.states, c.picks, c.probs, c.real, c.tail)))
        for flag, c in run.chains.items()}


def info(seen, r, row, new, s):
    """What on_iteration sees of a row's iteration: per block from the current one its first
    position, tokens after the commit, fates, proposed tokens and step map (of the chain shown),
    target steps taken; who proposed the chain shown, the clean copies stored, the row's place
    and its new tokens."""
    fate = seen["trace_fate"][r]
    return dict(starts=[seen["starts"][r] + j * s.block for j in range(len(fate))],
                tokens=seen["tokens"][r],
                fate=fate, drafted=seen["trace_proposed"][r], steps=seen["trace_steps"][r],
                taken=seen["trace_taken"][r], by="draft" if seen["trace_by"][r] else "self",
                stored=list(range(seen["trace_stored"][r])), row=row.index, new=new)
