"""Speculative decoding with block-diffusion proposals: SimSD for SDAR targets, SpecDiff for AR ones.

One iteration (`speculate`) reads propose -> layout -> target forward -> accept -> commit (the
layouts and the acceptance rules are verifier.py's):
  1. propose - chains of states for the current block and the blocks after it, each made by
               SDAR's rule: by the draft (a forward per step, or one per block whose
               confidences the rule is applied to step after step), by the target itself (its
               logits from the forward that just ran, applied the same way: no forward at all),
               or by both, merged into a trie of distinct states;
  2. layout  - every proposed state laid out for one target forward (mask.tree);
  3. forward - the target's one forward;
  4. accept  - the target's verdict, in time order;
  5. commit  - committed tokens join their blocks, and each cache keeps what was committed.

A diffusion target verifies in one of three ways (`verify`):
  lossless - the target's own decoding. From each proposed state (one copy of the block per
             state) the target takes its own step: its pick at every masked position (argmax, or
             rejection sampling against a proposer's pick, a draw from the target either way)
             and SDAR's rule on them. The chain follows the child state equal to the target's
             step and stops where none is; the target's step from there is committed too. The
             output is decode.generate's (greedy: token for token; sampled: in distribution), and
             a target forward commits at least one step. After a proposed block ends, a clean copy
             of it and the next block's all-masked state give that block's first step, and the
             target's logits there propose the rest of it to the next forward.
  exact    - the paper's acceptance on the draft's copies: each drafted token is judged (argmax, or
             rejection sampling) in draft-step order. The draft chose which positions to reveal and
             when, so the output is not the target's own, and when sampling it is biased.
  simsd    - the paper's layout, one copy [block | masks] (mask.verify), and the same acceptance;
             deeper than one layer, a mask token also sees later reveals through other masks.
With exact and simsd, accept="position" (the paper's rule: the longest agreeing prefix in position
order) can commit tokens that were judged with a later-rejected token in place.

An autoregressive (Qwen3) target verifies causally (SpecDiff): one forward on [its newest committed
token | the drafted tokens, in position order] judges each drafted token by the logits before it;
the token at the first rejection, or after the last drafted one (a bonus), is the target's. The
output is the target's own, greedy and sampled (sampling drafts leftmost positions first).

Host syncs per iteration: one, the verdict's readback; one more when two proposers' chains are
merged (how long is their shared prefix?); one more per draft step when the draft refreshes
dynamically; and on CUDA two `synchronize` calls that time drafting for the stats.
"""
from dataclasses import dataclass, field

import torch

import decode
import mask as masks
from decode import GREEDY, Stats
from verifier import (DRAFT, SELF, Proposal, accept_causal, accept_lossless, accept_paper,
                      causal_layout, grow, layout)

LOOKAHEAD = 2  # blocks one target forward reaches by default (the README says why)
# Who proposes to a lossless target with a draft, by strategy (the README says why): the target's
# own chain helps static decoding; dynamic decoding has revealed every confident position already.
PROPOSER = {"static": "hybrid", "dynamic": "draft"}
DRAFTING = "block"  # the draft's forwards: one per block, or one per step (the README says why)


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


@dataclass(frozen=True)
class Options:
    """One decode's settings, as options() checked them."""
    block: int
    steps: int
    strategy: str
    threshold: float
    sampling: decode.Sampling
    verify: str | None  # None: an AR target
    accept: str
    lookahead: int
    eos_min_prob: float
    stop_ids: tuple
    mask_id: int
    max_new_tokens: int
    proposer: str  # "draft", "self" or "hybrid"
    drafting: str  # "step" or "block"


@dataclass
class Row:
    """One prompt's state. index: its place in the batch; end: the position after the last
    token max_new_tokens allows; tpending / dpending: completed blocks the target / the draft has
    not stored yet, fed in front of its next forward; target_pending: the AR target's newest
    token, which its cache lacks; hint: the target's distributions at the state its last
    committed step was taken from (B, V), which propose the rest of the block; out: the tokens
    returned; done: whether its output is final."""
    index: int
    end: int
    block: Block
    tpending: torch.Tensor
    dpending: torch.Tensor
    target_pending: torch.Tensor
    hint: torch.Tensor | None = None
    out: list = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    done: bool = False


@dataclass
class Run:
    """One decode's shared state: the models, their caches (a row per prompt still decoding, in
    the order of `rows`), the rows, the random state (on the draft's device)."""
    target: torch.nn.Module
    draft: torch.nn.Module | None
    tcache: object
    dcache: object
    rows: list
    generator: torch.Generator | None


# ----------------------------------------------------------------------------- one iteration

def speculate(run, opt):
    """One iteration for every row: propose -> layout -> one target forward -> accept -> commit.
    Returns, per row, the tokens it makes returnable (untrimmed) and what happened (on_iteration's
    info)."""
    B, dev = opt.block, decode.device_of(run.target)
    t0 = decode.sync(dev)
    # 1. propose: per row, chains for its current block and, up to its end, the blocks after it
    reach = [min(opt.lookahead, -(-(row.end - row.block.start) // B)) for row in run.rows]
    draft_lens = list(run.dcache.lens) if run.dcache is not None else None
    chains = propose(run, reach, opt)
    t1 = decode.sync(dev)
    # 2. layout: each row's part of the forward; the rows padded to one width
    if opt.verify is None:  # an AR target: its logits before each drafted token, and after
        parts = [causal_layout(c[DRAFT], row.target_pending, row.block.masks)
                 for c, row in zip(chains, run.rows)]
        rows = [torch.arange(len(row.target_pending) - 1, len(ids), device=dev)
                for (ids, _, _), row in zip(parts, run.rows)]
    else:  # the target's distributions at every verifying row
        trees = [grow(c, n, row.block, opt) for c, n, row in zip(chains, reach, run.rows)]
        laid = [layout(t, row.tpending, row.block.start, opt) for t, row in zip(trees, run.rows)]
        parts, rows = [part[:3] for part in laid], [part[3] for part in laid]
    ids, pos, attend = masks.pack(parts, opt.mask_id)
    # 3. the target's one forward, for every row
    logits = run.target(ids, pos, attend, run.tcache)
    verifying = [logits[r, at] for r, at in enumerate(rows)]  # each row's own, pads left out
    suppress = None if opt.verify is None else opt.mask_id  # an AR target has no mask token
    q = opt.sampling.distribution(torch.cat(verifying), suppress).split(list(map(len, verifying)))
    # 4. accept: the target's own steps, the paper's judgement, or the causal one
    verdicts = []
    for r, row in enumerate(run.rows):
        if opt.verify is None:
            verdicts.append(accept_causal(chains[r][DRAFT], q[r], run.generator, row.block.masks,
                                          opt))
        elif opt.verify == "lossless":
            verdicts.append(accept_lossless(trees[r], q[r].view(-1, B, q[r].shape[-1]),
                                            run.generator, len(row.tpending), opt))
        else:
            verdicts.append(accept_paper(trees[r], q[r].view(-1, B, q[r].shape[-1]),
                                         run.generator, opt))
    # 5. commit: each cache keeps what was committed; the rest becomes pending
    starts = [row.block.start for row in run.rows]
    news = commit(run, verdicts, draft_lens, opt)
    out = []
    for row, v, (part_ids, _, _), first, new in zip(run.rows, verdicts, parts, starts, news):
        count(row.stats, v, len(part_ids), t1 - t0)
        info = dict(starts=[first + j * B for j in range(len(v.tokens))], tokens=v.tokens,
                    fate=v.fate, drafted=v.proposed, steps=v.steps, taken=v.taken, by=v.by,
                    stored=v.slots, row=row.index)
        out.append((new, info))
    return out


# ----------------------------------------------------------------------------- 1. propose

def propose(run, reach, opt):
    """Per row, {proposer flag: [Proposal per block from the current one]}: the target's own
    chain (from its distributions at the state its last step was taken from: the rest of the
    current block) and the draft's. A lossless target reaches the last of a row's `reach` blocks
    by its first state alone (grow), so the draft drafts one block fewer there."""
    chains = [{} for _ in run.rows]
    hinted = [r for r, row in enumerate(run.rows) if row.hint is not None]
    if opt.proposer != "draft" and hinted:
        for r, proposal in zip(hinted, self_proposals(run, hinted, opt)):
            chains[r][SELF] = [proposal]
    if opt.proposer != "self":
        drafted = [n - (opt.verify == "lossless" and n > 1) for n in reach]
        for r, proposals in enumerate(draft_proposals(run, drafted, opt)):
            chains[r][DRAFT] = proposals
    return chains


def self_proposals(run, hinted, opt):
    """The target's own chains for the rest of these rows' current blocks: SDAR's rule applied step
    after step to its distributions at the state each last stepped from (hint), fresh picks at
    every state when sampling. No forward."""
    rows = [run.rows[r] for r in hinted]
    dev = run.generator.device if run.generator is not None else rows[0].block.tokens.device
    quotas = [decode.schedule(row.block.masks, opt.block, opt.steps, row.block.done)
              for row in rows]
    d = decode.denoise(run.target, torch.stack([row.block.tokens for row in rows]).to(dev),
                       torch.stack([row.block.known for row in rows]).to(dev),
                       [row.block.start for row in rows], quotas, strategy=opt.strategy,
                       threshold=opt.threshold, sampling=opt.sampling, generator=run.generator,
                       record=True, probs=torch.stack([row.hint for row in rows]).to(dev),
                       refresh=False)
    return [proposal(row.block.start, row.block.known, d, r, row.block.done, row.block.tokens.device)
            for r, row in enumerate(rows)]


def proposal(start, known, d, r, done, dev):
    """Row r of a Denoised batch as a Proposal on the target's device (its own steps only)."""
    S = d.steps[r]
    probs = None if d.probs is None else d.probs[:S, r].to(dev)
    return Proposal(start, known.to(dev), d.tokens[r].to(dev), d.step[r].to(dev), done,
                    d.picks[:S, r].to(dev), probs)


def draft_proposals(run, drafted, opt):
    """Per row, its first drafted[r] blocks: the rest of the current block by the target's rule,
    then whole blocks, each after storing the one before in the draft's cache (tentatively:
    commit() rewinds what the target does not commit). Every row drafts as far as the furthest
    (its extra blocks dropped), so that all take part in each draft forward; drafting "step": a
    forward per step, "block": one per block."""
    B, ddev = opt.block, decode.device_of(run.draft)
    rows = run.rows
    x = torch.stack([row.block.tokens for row in rows]).to(ddev)
    known = torch.stack([row.block.known for row in rows]).to(ddev)
    pending = [row.dpending.to(ddev) for row in rows]
    masks_left, done = [row.block.masks for row in rows], [row.block.done for row in rows]
    strategy = "left" if opt.verify is None and not opt.sampling.greedy else opt.strategy
    out = [[] for _ in rows]
    for j in range(max(drafted)):
        starts = [row.block.start + j * B for row in rows]
        quotas = [decode.schedule(m, B, opt.steps, d) for m, d in zip(masks_left, done)]
        d = decode.denoise(run.draft, x, known, starts, quotas, cache=run.dcache, pending=pending,
                           strategy=strategy, threshold=opt.threshold, sampling=opt.sampling,
                           generator=run.generator, record=True, refresh=opt.drafting == "step")
        for r, row in enumerate(rows):
            if j < drafted[r]:
                row.stats.draft_forwards += d.forwards[r]
                out[r].append(proposal(starts[r], known[r], d, r, done[r],
                                       row.block.tokens.device))
        pending, masks_left, done = list(d.tokens), [B] * len(rows), [0] * len(rows)
        x, known = torch.full_like(x, opt.mask_id), torch.zeros_like(known)
    return out


# ----------------------------------------------------------------------------- 5. commit

def count(stats, v, width, draft_seconds):
    """Add one iteration to the stats; matched: proposed steps the target committed as proposed."""
    stats.forwards += 1
    stats.steps += sum(v.taken)
    stats.width += width
    stats.draft_seconds += draft_seconds
    stats.matched += v.matched[0]
    stats.draft_matched += v.matched[1]
    for fate, steps in zip(v.fate, v.steps):
        stats.drafted += sum(s > 0 for s in steps)
        stats.accepted += fate.count(1)


def commit(run, verdicts, draft_lens, opt):
    """Each cache keeps, row by row, what was committed of what it stored in this iteration: a
    diffusion target its pending blocks and the clean copies of the committed blocks (slots; moved
    to the front when others lie between them), an AR target its pending token and the accepted
    ones, the draft the leading blocks committed exactly as drafted. The other complete blocks
    become pending; the first incomplete block is the current one (a fresh one after them when
    none is). Returns, per row, the tokens now returnable."""
    B = opt.block
    keep, n_keep, news = [], [], []
    for r, (row, v) in enumerate(zip(run.rows, verdicts)):
        complete = 0
        while complete < len(v.tokens) and all(v.known[complete]):
            complete += 1
        tokens = torch.tensor(v.tokens, device=row.block.tokens.device)  # (rows, B)
        if opt.verify is None:  # an AR target: the token after the accepted ones is pending next
            accepted = sum(fates.count(1) for fates in v.fate)
            n_keep.append(len(row.target_pending) + accepted)
            keep.append(None)
            bonus = B - row.block.masks + accepted
            row.target_pending = tokens.flatten()[bonus:bonus + 1]
        else:
            P, n = len(row.tpending), len(v.slots)
            n_keep.append(P + n * B)
            keep.append(None if v.slots == list(range(n)) else [*range(P), *(
                P + c * B + i for c in v.slots for i in range(B))])
            row.tpending = tokens[n:complete].flatten()
        if run.dcache is not None:
            draft_lens[r] += len(row.dpending) + v.kept * B
            row.dpending = tokens[v.kept:complete].flatten()
        news.append(returnable(v.tokens, v.known, row.block.returned))
        row.block, row.hint = next_block(row.block, v, tokens, complete, opt), v.hint
    run.tcache.commit(n_keep, keep)
    if run.dcache is not None:
        run.dcache.rewind(draft_lens)
    return news


def next_block(block, v, tokens, complete, opt):
    """The block decoding goes on with: the first incomplete row of the verdict, or a fresh block
    after the complete ones."""
    start, B = block.start + complete * opt.block, opt.block
    if complete == len(v.tokens):
        fresh = torch.full((B,), opt.mask_id, device=tokens.device)
        return Block(start, fresh, torch.zeros_like(fresh, dtype=torch.bool), B)
    known = v.known[complete]
    returned = known.index(False) if False in known else B  # its known prefix was returned
    return Block(start, tokens[complete], torch.tensor(known, dtype=torch.bool,
                 device=tokens.device), known.count(False), v.done[complete], returned)


def returnable(tokens, known, returned):
    """The known tokens after the first `returned`, up to the first unknown position (rows of B)."""
    flat = [t if k else None for t, k in zip(sum(tokens, []), sum(known, []))][returned:]
    return flat[:flat.index(None)] if None in flat else flat


# ----------------------------------------------------------------------------- the loop

def options(target, draft, max_new_tokens, *, block, steps, strategy, threshold, sampling, verify,
            accept, lookahead, eos_min_prob, stop_ids, proposer, drafting):
    """Check every option against the target's kind and the proposers; the Options of the
    decode."""
    ar = target.config.model_type == "qwen3"
    decode.check(max_new_tokens=max_new_tokens, block=block, strategy=strategy, threshold=threshold,
                 lookahead=lookahead, eos_min_prob=eos_min_prob)
    steps = block if steps is None else steps
    decode.check_steps(steps, block)
    if ar and (verify is not None or accept is not None):
        raise ValueError("verify and accept apply to a diffusion target only; an autoregressive "
                         "target verifies causally, in position order")
    verify = None if ar else verify or "lossless"
    if proposer is None:
        proposer = "self" if draft is None else "draft" if verify != "lossless" else PROPOSER.get(
            strategy, "draft")
    refused = [  # (when, why)
        (draft is None and ar, "an autoregressive target needs a draft to propose to it"),
        (proposer not in ("draft", "self", "hybrid"),
         f"proposer must be 'draft', 'self' or 'hybrid'; got {proposer!r}"),
        (draft is None and proposer != "self",
         f"proposer={proposer!r} needs a draft model; without one the target proposes for itself"),
        (draft is not None and proposer == "self",
         "proposer='self' proposes with the target alone; pass draft=None"),
        (proposer != "draft" and verify != "lossless",
         "the target's own proposals are verified losslessly only; use verify='lossless'"),
        (proposer == "self" and lookahead > 2,
         "the target proposes the rest of its block and the next block's first step: "
         "lookahead 1 or 2"),
        (draft is None and drafting is not None, "drafting applies to a draft model"),
        (drafting not in (None, "step", "block"),
         f"drafting must be 'step' or 'block'; got {drafting!r}"),
        (ar and strategy == "dynamic" and not sampling.greedy,
         "strategy='dynamic' reveals drafted tokens by their sampled confidence, which biases an "
         "autoregressive target's rejection sampling; use 'static'"),
        (verify not in (None, "lossless", "exact", "simsd"),
         f"verify must be 'lossless', 'exact' or 'simsd'; got {verify!r}"),
        (accept not in (None, "step", "position"),
         f"accept must be 'step' or 'position'; got {accept!r}"),
        (accept is not None and verify == "lossless",
         "accept applies to verify='exact' or 'simsd'; lossless follows the target's own order"),
        (eos_min_prob > 0 and verify in (None, "lossless"),
         "eos_min_prob changes the target's output; it applies to verify='exact' or 'simsd' only")]
    for when, why in refused:
        if when:
            raise ValueError(why)
    mask_id = decode.diffusion_mask_id(target if draft is None else draft)
    if drafting is None:  # the paper's output depends on its draft, which decodes step by step
        drafting = DRAFTING if verify in ("lossless", None) else "step"
    return Options(block, steps, strategy, threshold, sampling, verify, accept or "step", lookahead,
                   eos_min_prob, tuple(stop_ids), mask_id, max_new_tokens, proposer, drafting)


def start(target, draft, prompts, generator, opt):
    """The Run after the prefill: the draft and a diffusion target cache each prompt's whole
    blocks (its tail is its current block's known part); an AR target all but its newest token."""
    B, ar = opt.block, opt.verify is None
    aligned = [len(p) - len(p) % B for p in prompts]
    room = max(map(len, prompts)) + opt.max_new_tokens + 3 * B + (opt.lookahead + 1) * B * (B + 1)
    tcache = target.new_cache(room, len(prompts))
    decode.prefill(target, [p[:-1] if ar else p[:a] for p, a in zip(prompts, aligned)], tcache,
                   1 if ar else B)
    dcache = None
    if draft is not None:
        ddev = decode.device_of(draft)
        dcache = draft.new_cache(room, len(prompts))
        decode.prefill(draft, [p[:a].to(ddev) for p, a in zip(prompts, aligned)], dcache, B)
    rows = []
    for i, (prompt, a) in enumerate(zip(prompts, aligned)):
        tail = prompt[a:]
        tokens = torch.cat([tail, tail.new_full((B - len(tail),), opt.mask_id)])
        known = torch.arange(B, device=prompt.device) < len(tail)
        block = Block(a, tokens, known, B - len(tail), returned=len(tail))
        rows.append(Row(i, len(prompt) + opt.max_new_tokens, block, prompt[:0], prompt[:0],
                        prompt[-1:]))
    return Run(target, draft, tcache, dcache, rows, generator)


@torch.inference_mode()
def generate(target, draft, prompts, max_new_tokens, *, block=4, steps=None, strategy="static",
             threshold=0.9, sampling=GREEDY, verify=None, accept=None, lookahead=LOOKAHEAD,
             eos_min_prob=0.0, stop_ids=(), generator=None, on_iteration=None, on_row=None,
             proposer=None, drafting=None):
    """Speculative decoding: SimSD for a diffusion (SDAR) target, SpecDiff for an AR (qwen3) one,
    of one prompt or a batch (a list of prompts of any lengths). Returns (new tokens, Stats) as
    decode.generate does (a batch: a list of each). block, steps, strategy, threshold and
    sampling: the target's decoding, which the proposers follow. verify (a diffusion target):
    "lossless" (default: decode.generate's output), or the paper's "exact" or "simsd"; accept:
    "step" (default) or "position", for exact and simsd. draft None: the target proposes for
    itself (lossless). proposer, with a draft: "draft", or "hybrid" (the draft and the target
    both; lossless only; default PROPOSER by strategy). drafting: "step" (a draft forward per
    step) or "block" (one per block; DRAFTING by default, but "step" for exact and simsd, whose
    output is the draft's order's).
    lookahead: the blocks one target forward reaches. eos_min_prob: exact and simsd's gate on
    stop tokens. generator: sampling's random state, on the draft's device (the target's without
    a draft). on_iteration(info) sees each row's iteration: its blocks' starts, committed tokens
    and fates, the proposed tokens and step map of the chain shown and who proposed it (by), the
    steps taken, the clean copies stored, the row's place and its new tokens; on_row(i, tokens,
    stats) each prompt's output once it is final.
    The rows of a batch share every forward; each row takes its own steps and blocks, and a row
    whose output is final leaves the batch. Host syncs per iteration: one per row (its verdict),
    and those of propose (the shared prefix of two chains, a dynamic draft's steps)."""
    dev = decode.device_of(target)
    batch, prompts = decode.as_batch(prompts, dev)
    opt = options(target, draft, max_new_tokens, block=block, steps=steps, strategy=strategy,
                  threshold=threshold, sampling=sampling, verify=verify, accept=accept,
                  lookahead=lookahead, eos_min_prob=eos_min_prob, stop_ids=stop_ids,
                  proposer=proposer, drafting=drafting)
    t0 = decode.sync(dev)
    run = start(target, draft, prompts, generator, opt)
    t1 = decode.sync(dev)
    results = [None] * len(prompts)
    while run.rows:
        for row, (new, info) in zip(run.rows, speculate(run, opt)):
            new, row.done = decode.trim(new, opt.stop_ids, max_new_tokens - len(row.out))
            row.out += new
            if on_iteration:
                on_iteration({**info, "new": new})
            if row.done:
                row.stats.prefill_seconds = t1 - t0
                decode.final(results, row.index, row.out, row.stats, decode.sync(dev) - t1, on_row)
        if any(row.done for row in run.rows):  # finished rows leave the batch
            going = [r for r, row in enumerate(run.rows) if not row.done]
            run.rows = [run.rows[r] for r in going]
            for cache in (run.tcache, run.dcache):
                if cache is not None:
                    cache.keep_rows(going)
    return tuple(map(list, zip(*results))) if batch else results[0]
