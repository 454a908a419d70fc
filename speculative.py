"""Speculative decoding, every mode, for one prompt or a batch: SimSD for an SDAR target (the paper's
verifications, and lossless verification with any proposer), SpecDiff for an autoregressive one.

One iteration (`speculate`), for every row at once:
  1. propose - chains of states for the current block and, with lookahead, the blocks after it,
               each made by SDAR's rule: by the draft (here: a forward per step, or one per block
               whose confidences the rule is applied to step after step) and, for lossless
               verification, by the target itself (lossless.py);
  2. lay out - every proposal laid out for one target forward, by the verifier;
  3. forward - the target's one forward, for every row;
  4. accept  - the verifier's verdict from the target's distributions (verifier.py, lossless.py);
  5. commit  - committed tokens join their blocks, and each cache keeps what was committed.
simsd.py is the paper's method alone, at batch 1: read it first.
"""
from dataclasses import dataclass, replace

import torch
from torch.profiler import record_function as phase

import batch
from batch import Batch, as_batch, clock
from lossless import Lossless, self_chains
from sdar import (GREEDY, LOOKAHEAD, Settings, denoise, device_of, diffusion_mask_id, mode_of,
                  prefill, schedule)
from verifier import DRAFT, SELF, Causal, Paper, leading_complete, proposal

VERIFIERS = {"lossless": Lossless, "self": Lossless, "paper": Paper, "specdiff": Causal}


@dataclass
class Block:
    """The block being decoded at positions start..: its tokens (the mask id where unknown) and
    which are known; how many are unknown, the target steps taken on it, the tokens returned."""
    start: int
    tokens: torch.Tensor
    known: torch.Tensor
    masks: int
    done: int = 0
    returned: int = 0


@dataclass(kw_only=True)
class Row(batch.Row):
    """One prompt's state: end, the position after the last token max_new_tokens allows; its
    block; pending / draft_pending: the tokens before it that the target / the draft has not
    cached (completed blocks; an AR target's newest token), fed first to its next forward; hint:
    the target's distributions at the state its last step was taken from (B, V), which propose
    the rest of the block."""
    end: int
    block: Block
    pending: torch.Tensor
    draft_pending: torch.Tensor
    hint: torch.Tensor | None = None


@dataclass
class Run:
    """One decode: the models and their caches (a row per prompt still decoding, in the order of
    batch.rows), the settings, the verifier, the random state (on the draft's device)."""
    target: torch.nn.Module
    draft: torch.nn.Module | None
    target_cache: object
    draft_cache: object
    settings: Settings
    verifier: object
    batch: Batch
    generator: torch.Generator | None = None
    draft_rule: Settings | None = None  # the draft's decoding (SpecDiff sampled: from the left)

    @property
    def rows(self):
        return self.batch.rows


# ----------------------------------------------------------------------------- one iteration

def speculate(run):
    """One iteration for every row: propose -> lay out -> one target forward -> accept -> commit.
    Returns, per row, its Verdict, its Trace, its current block's first position and the tokens
    it made returnable. Each step is a profiler label (split.py reads them)."""
    s, dev = run.settings, device_of(run.target)
    t0 = clock(dev)
    with phase("propose"):  # per row, chains for its current block and the blocks after it
        reach = [min(s.lookahead, -(-(row.end - row.block.start) // s.block)) for row in run.rows]
        marks = None if run.draft_cache is None else list(run.draft_cache.lens)
        chains = propose(run, reach)
    t1 = clock(dev)
    with phase("lay out"):  # each row's part of the forward; the rows padded to one width
        laid = run.verifier.layout(run, chains, reach)
    with phase("target forward"):  # for every row; its distributions at each row's verifying rows
        logits = run.target(laid.ids, laid.pos, laid.mask, run.target_cache)
        verifying = [logits[r, at] for r, at in enumerate(laid.rows)]  # each row's, not the pads
        suppress = s.mask_id if run.target.config.model_type == "sdar" else None  # AR: no mask
        q = s.sampling.distribution(torch.cat(verifying), suppress)
    with phase("accept"):  # what each row commits (and beside it, what --show and stats read)
        verdicts = run.verifier.accept(run, laid, q.split([len(v) for v in verifying]))
    with phase("commit"):
        starts = [row.block.start for row in run.rows]
        news = commit(run, [verdict for verdict, _ in verdicts], marks)
        for row, (_, trace), width in zip(run.rows, verdicts, laid.widths):
            count(row.stats, trace, width, t1 - t0)
    return [(*verdict, first, new) for verdict, first, new in zip(verdicts, starts, news)]


def propose(run, reach):
    """Per row, {proposer flag: [Proposal per block from the current one]}: the target's own chain
    (from its distributions at the state its last step was taken from), then the draft's."""
    chains = [{} for _ in run.rows]
    hinted = [r for r, row in enumerate(run.rows) if row.hint is not None]
    if run.settings.proposer != "draft" and hinted:
        for r, proposal in zip(hinted, self_chains(run, [run.rows[r] for r in hinted])):
            chains[r][SELF] = [proposal]
    if run.settings.proposer != "self":
        drafted = [run.verifier.drafted(n) for n in reach]
        for r, proposals in enumerate(draft_chains(run, drafted)):
            chains[r][DRAFT] = proposals
    return chains


def draft_chains(run, drafted):
    """Per row, its first drafted[r] blocks: the rest of the current block by the target's rule,
    then whole blocks, each after storing the one before in the draft's cache (tentatively:
    commit() rewinds what the target does not commit). Every row drafts as far as the furthest
    (its extra blocks dropped), so that all take part in each draft forward; drafting "step": a
    forward per step, "block": one per block."""
    s, ddev, rows = run.settings, device_of(run.draft), run.rows
    x = torch.stack([row.block.tokens for row in rows]).to(ddev)
    known = torch.stack([row.block.known for row in rows]).to(ddev)
    pending = [row.draft_pending.to(ddev) for row in rows]
    starts = [row.block.start for row in rows]
    masks_left, done = [row.block.masks for row in rows], [row.block.done for row in rows]
    out = [[] for _ in rows]
    for j in range(max(drafted)):
        quotas = [schedule(m, s.block, s.steps, d) for m, d in zip(masks_left, done)]
        with phase("draft"):
            d = denoise(run.draft, x, known, starts, quotas, run.draft_rule,
                        cache=run.draft_cache, pending=pending, generator=run.generator,
                        drafting=s.drafting)
        for r, row in enumerate(rows):
            if j < drafted[r]:
                row.stats.draft_forwards += d.forwards[r]
                out[r].append(proposal(starts[r], known[r], done[r], d, r,
                                       row.block.tokens.device))
        pending, masks_left, done = list(d.tokens), [s.block] * len(rows), [0] * len(rows)
        x, known = torch.full_like(x, s.mask_id), torch.zeros_like(known)
        starts = [first + s.block for first in starts]
    return out


# ----------------------------------------------------------------------------- 5. commit

def commit(run, verdicts, marks):
    """Each cache keeps, row by row, what was committed of what it stored in this iteration: the
    target the tokens its verdict keeps (moved to the front when others lie between them), the
    draft (whose committed lengths were `marks` before) the leading drafted blocks committed
    exactly as drafted; the other complete blocks become pending. The first incomplete block is
    the current one (a fresh one after the complete ones when none is). Returns, per row, the
    tokens now returnable."""
    B, n_keep, keep, lengths, news = run.settings.block, [], [], [], []
    for r, (row, v) in enumerate(zip(run.rows, verdicts)):
        complete = leading_complete(v.known)
        tokens = torch.tensor(v.tokens, device=row.block.tokens.device)  # (rows, B)
        n_keep.append(len(v.keep))
        keep.append(None if v.keep == list(range(len(v.keep))) else v.keep)
        row.pending = torch.tensor(v.pending, dtype=torch.long, device=tokens.device)
        if run.draft_cache is not None:
            lengths.append(marks[r] + len(row.draft_pending) + v.kept * B)
            row.draft_pending = tokens[v.kept:complete].flatten()
        news.append(returnable(v.tokens, v.known, row.block.returned))
        row.block, row.hint = next_block(row.block, v, tokens, complete, run.settings), v.hint
    run.target_cache.commit(n_keep, keep)
    if run.draft_cache is not None:
        run.draft_cache.rewind(lengths)
    return news


def next_block(block, v, tokens, complete, s):
    """The block decoding goes on with: the first incomplete row of the verdict, or a fresh block
    after the complete ones."""
    start, B = block.start + complete * s.block, s.block
    if complete == len(v.tokens):
        fresh = torch.full((B,), s.mask_id, device=tokens.device)
        return Block(start, fresh, torch.zeros_like(fresh, dtype=torch.bool), B)
    known = v.known[complete]
    returned = known.index(False) if False in known else B  # its known prefix was returned
    return Block(start, tokens[complete], torch.tensor(known, dtype=torch.bool,
                 device=tokens.device), known.count(False), v.done[complete], returned)


def returnable(tokens, known, returned):
    """The known tokens after the first `returned`, up to the first unknown position (rows of B)."""
    flat = [t if k else None for t, k in zip(sum(tokens, []), sum(known, []))][returned:]
    return flat[:flat.index(None)] if None in flat else flat


def count(stats, trace, width, draft_seconds):
    """Add one iteration to a row's stats."""
    stats.forwards += 1
    stats.steps += sum(trace.taken)
    stats.width += width
    stats.draft_seconds += draft_seconds
    stats.matched += trace.matched[0]
    stats.draft_matched += trace.matched[1]
    for fate, steps in zip(trace.fate, trace.steps):
        stats.drafted += sum(s > 0 for s in steps)
        stats.accepted += fate.count(1)


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
    blocks (its tail is its current block's known part); an AR target all but its newest token."""
    B, ar, dev = s.block, mode == "specdiff", device_of(target)
    aligned = [len(p) - len(p) % B for p in prompts]
    rows = []
    for i, (prompt, a) in enumerate(zip(prompts, aligned)):
        tail = prompt[a:]
        tokens = torch.cat([tail, tail.new_full((B - len(tail),), s.mask_id)])
        known = torch.arange(B, device=dev) < len(tail)
        block = Block(a, tokens, known, B - len(tail), returned=len(tail))
        pending = prompt[-1:] if ar else prompt[:0]
        rows.append(Row(i, end=len(prompt) + s.max_new_tokens, block=block, pending=pending,
                        draft_pending=prompt[:0]))
    progress = Batch(rows, s, dev, on_row=on_row)
    room = s.room(max(map(len, prompts)), widest(s, mode))
    target_cache = target.new_cache(room, len(prompts))
    prefill(target, [p[:-1] if ar else p[:a] for p, a in zip(prompts, aligned)], target_cache,
            1 if ar else B)
    draft_cache = None
    if draft is not None:
        draft_cache = draft.new_cache(room, len(prompts))
        prefill(draft, [p[:a].to(device_of(draft)) for p, a in zip(prompts, aligned)],
                draft_cache, B)
    progress.begin()
    draft_rule = replace(s, strategy="left") if ar and not s.sampling.greedy else s
    return Run(target, draft, target_cache, draft_cache, s, VERIFIERS[mode](s), progress,
               generator, draft_rule)


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
    The rows of a batch share every forward; each row takes its own steps and blocks, and a row
    whose output is final leaves the batch. Host syncs per iteration: one per row (its verdict),
    and those of propose (the shared prefix of two chains, a dynamic draft's steps)."""
    s = Settings(max_new_tokens, block, steps, strategy, threshold, sampling, stop_ids, verify,
                 accept, lookahead, eos_min_prob, proposer, drafting)
    mode = mode_of(target, "self" if draft is None else draft, verify)
    s = replace(s.resolve(mode), mask_id=diffusion_mask_id(target if draft is None else draft))
    batched, prompts = as_batch(prompts, device_of(target))
    run = start(target, draft, prompts, s, mode, generator, on_row)
    while run.rows:
        for row, (verdict, trace, first, new) in zip(list(run.rows), speculate(run)):
            new = run.batch.take(row, new)
            if on_iteration:
                on_iteration(info(verdict, trace, first, row, new, s))
        run.batch.retire([run.target_cache, run.draft_cache])
    return run.batch.returned(batched)


def info(verdict, trace, first, row, new, s):
    """What on_iteration sees of a row's iteration: per block from the current one its first
    position, tokens after the commit, fates, proposed tokens and step map (of the chain shown),
    target steps taken; who proposed the chain shown, the clean copies stored, the row's place
    and its new tokens."""
    blank = [[s.mask_id] * s.block] * (len(trace.fate) - len(verdict.tokens))
    return dict(starts=[first + j * s.block for j in range(len(trace.fate))],
                tokens=verdict.tokens + blank, fate=trace.fate, drafted=trace.proposed,
                steps=trace.steps, taken=trace.taken, by=trace.by, stored=trace.stored,
                row=row.index, new=new)
