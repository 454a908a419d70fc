"""Speculative decoding with a block-diffusion draft, in one loop.

SimSD (arXiv 2606.02544) verifies for a block-diffusion (SDAR) target. Each iteration:
  1. draft  - the small model fills the unknown positions of the current block (decode.denoise),
              recording each drafted token d_i, the step t_i that revealed it (the step map)
              and its distribution p_i;
  2. verify - the target runs ONE forward on [known | reference d_1..d_m | m mask tokens], where
              mask token i sees the block exactly as the draft saw it just before step t_i
              (mask.verify); or, in exact mode, on one copy of the block per draft step;
  3. accept - in draft-step order. The verdict on d_i was computed with every d_j revealed
              before t_i in place, wherever j sits, so step s is judged only when every earlier
              step was accepted. All positions of step s are committed (d_i where accepted, the
              target's token where not), and a rejection ends the iteration;
  4. commit - committed tokens join the block's known tokens, wherever they sit, and the next
              draft fills what is still unknown. A completed block is stored in both caches by
              folding it into each model's next forward, so both caches hold whole blocks only.
Position order (accept="position", the paper's rule) commits the longest agreeing prefix instead.
With the right-to-left step map [4, 3, 2, 1] and d_3 rejected it commits d_0, d_1 and d_2,
each judged with d_3 in place, then replaces d_3: three tokens verified in a context that
never exists. Step order commits only the target's token for d_3 (step 1) and drafts again.

SpecDiff (Christopher et al., "Speculative Diffusion Decoding") verifies for an autoregressive
(Qwen3) target: the same draft; the target runs one causal forward on [its newest committed
token | d_1..d_m], and the logits before each d_i judge it. Causal order is the temporal order
here, so acceptance is in position order, and the token at the first rejection, or after d_m when
everything is accepted, is the target's (up to m + 1 tokens per target forward). Its cache keeps
every accepted token; the draft's still keeps whole blocks.
"""
import torch
import torch.nn.functional as F

import decode
import mask as masks


def uniform(n, generator, device):
    """n uniforms from `generator` (on its own device), moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device).to(device)


def acceptance(d, p, q, order, temperature, generator=None, stop_ids=(), eos_min_prob=0.0):
    """Judge drafted tokens d (m,) with draft distributions p (m, V) against target distributions
    q (r, V) in `order` (r,): each row's rank in time (its draft step, or its index for position
    order). r = m, or m + 1 with a bonus row (an AR target's token after d_m) that drafts nothing
    and is always rejected.

    greedy (temperature 0): d_i is accepted when it is argmax q_i; a rejected row takes argmax q_i.
    sampling (modified rejection sampling): d_i is kept with probability min(1, q_i(d_i) / p_i(d_i)),
    else replaced by a draw from normalize(max(q_i - p_i, 0)), so each committed token is
    distributed as q_i. Every row whose rank is at most the earliest rejected rank is committed:
    all rows of that rank too, since ties reveal several positions at one draft step.
    eos_min_prob: a stop token chosen by the target needs at least this target probability;
    otherwise it is drawn again without stop tokens.
    Returns lists (one host sync): tokens (r,), committed (r,) bool, accepted (r,) bool."""
    m, r = d.shape[0], q.shape[0]
    d, p = F.pad(d, (0, r - m)), F.pad(p, (0, 0, 0, r - m))  # a bonus row drafts token 0 at p = 0
    if temperature == 0:
        ok = d == q.argmax(-1)
    else:
        ok = uniform(r, generator, d.device) * p.gather(-1, d[:, None])[:, 0] < q.gather(-1, d[:, None])[:, 0]
    ok &= torch.arange(r, device=d.device) < m
    chosen = q
    if len(stop_ids) and eos_min_prob > 0:  # gate the stops that the target does not really want
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=q.device)
        chosen = q.index_copy(-1, stops, torch.where(q[:, stops] < eos_min_prob, 0.0, q[:, stops]))
        chosen = torch.where(chosen.sum(-1, keepdim=True) > 0, chosen, q)
    resid = chosen if temperature == 0 else (chosen - p).clamp(min=0)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, chosen)  # empty residual: q itself
    if temperature == 0:
        new = resid.argmax(-1)
    else:  # Gumbel-max: a draw from normalize(resid) per row
        gumbel = -torch.log(-torch.log(uniform(resid.numel(), generator, d.device).clamp(min=1e-20)))
        new = (resid.log() + gumbel.view_as(resid)).argmax(-1)
    first = torch.where(ok, order.max() + 1, order).min()  # the earliest rejected rank
    out = torch.stack([torch.where(ok, d, new), order <= first, ok]).tolist()
    return out[0], [bool(c) for c in out[1]], [bool(a) for a in out[2]]


def verify_layout(known, known_pos, d, drafted_pos, t, mode, mask_id):
    """Token ids, positions, attention mask and the rows whose logits verify d, for one diffusion
    target forward. simsd: [known | d | masks]; exact: one [known | block before step s] per
    distinct step s. Known and drafted positions may interleave in any pattern."""
    n, m = len(known), len(d)
    if mode == "simsd":
        ids = torch.cat([known, d, d.new_full((m,), mask_id)])
        rows = torch.arange(n + m, n + 2 * m, device=d.device)  # the mask tokens
        return ids, masks.verify_positions(known_pos, drafted_pos), masks.verify(t, n), rows
    if mode == "exact":
        states = torch.unique(t)[:, None]  # (S, 1): copy s shows the references revealed before s
        copies = torch.where(t[None, :] < states, d[None, :], mask_id)  # (S, m)
        ids = torch.cat([known.expand(len(states), n), copies], dim=1).reshape(-1)
        att, rows = masks.verify_exact(t, n)
        return ids, masks.verify_exact_positions(t, known_pos, drafted_pos), att, rows
    raise ValueError(f"--verify must be 'simsd' or 'exact'; got {mode!r}")


def verify_block(target, cache, store, x, known, d, t, start, mode, mask_id, pick):
    """SimSD: one diffusion-target forward (the pending store folded in front). Returns q (m, V)."""
    dev = d.device
    K = torch.tensor([i for i, k in enumerate(known) if k], dtype=torch.long, device=dev)
    D = torch.tensor([i for i, k in enumerate(known) if not k], dtype=torch.long, device=dev)
    ids, pos, att, rows = verify_layout(torch.tensor(x, device=dev)[K], start + K, d, start + D, t, mode, mask_id)
    ns = len(store)
    logits = target(torch.cat([store, ids])[None], torch.cat([torch.arange(start - ns, start, device=dev), pos]),
                    masks.with_store(att, ns), cache)[0, ns:]
    if ns:
        cache.commit(ns)  # the completed block is stored
    return decode.distribution(logits[rows], **pick, suppress=mask_id)


def verify_causal(target, cache, pending, d, first, pick):
    """SpecDiff: one causal AR-target forward on [pending | d], d starting at position `first`;
    the logits before each d_i judge it (the AR shift), the last give the token after d_m.
    Returns q (m + 1, V)."""
    ids = torch.cat([pending, d])
    pos = torch.arange(first - len(pending), first + len(d), device=d.device)
    logits = target(ids[None], pos, masks.block_causal(len(ids), 1, device=d.device), cache)[0, len(pending) - 1:]
    return decode.distribution(logits, **pick)


def check_pair(target, draft, target_tok, draft_tok):
    """Raise ValueError unless the draft can propose to the target: an SDAR model with a mask token,
    giving every token of the target the same id, trained with a diffusion target's block length."""
    if draft.config.model_type != "sdar" or draft_tok.mask_id is None:
        raise ValueError("the draft is not an SDAR model with a mask token; this project drafts with diffusion models")
    if not draft_tok.covers(target_tok) or draft.config.vocab_size != target.config.vocab_size:
        raise ValueError("the draft does not give every token of the target the same id; speculation needs one "
                         "vocabulary")
    if target.config.model_type == "sdar" and draft.config.block_size != target.config.block_size:
        raise ValueError(f"the draft was trained with block {draft.config.block_size} and the target with block "
                         f"{target.config.block_size}; they must match")


def check_modes(ar, verify, accept):
    """The verification layout and acceptance order: options of a diffusion target only."""
    if ar and (verify or accept):
        raise ValueError("--verify and --accept apply to a diffusion target only; an autoregressive target "
                         "verifies causally, in position order")
    for flag, value, allowed in (("verify", verify, ("simsd", "exact")), ("accept", accept, ("step", "position"))):
        if value is not None and value not in allowed:
            raise ValueError(f"--{flag} must be one of {', '.join(allowed)}; got {value!r}")
    return verify or "simsd", accept or "step"


class Block:
    """The current block at positions start..start+size-1: its tokens (mask_id where unknown), which of
    them are known (anywhere in the block), and how many leading ones were returned already."""

    def __init__(self, start, size, mask_id, tokens=(), returned=0):
        self.start, self.size, self.mask_id, self.returned = start, size, mask_id, returned
        self.x = list(tokens) + [mask_id] * (size - len(tokens))
        self.known = [True] * len(tokens) + [False] * (size - len(tokens))

    def unknown(self):
        return [i for i, k in enumerate(self.known) if not k]

    def commit(self, D, tokens, committed, ok):
        """Fill the drafted positions D where committed; returns each position's fate."""
        status = ["known" if k else "dropped" for k in self.known]
        for i, pos in enumerate(D):
            if committed[i]:
                self.x[pos], self.known[pos], status[pos] = tokens[i], True, "accepted" if ok[i] else "replaced"
        return status

    def advance(self, bonus=None):
        """(tokens now returnable: the known prefix, the completed block or None). A completed block
        gives way to the next, whose first known token is `bonus` (an AR target's token after d_m)."""
        new, done = [], None
        while True:
            while self.returned < self.size and self.known[self.returned]:
                new.append(self.x[self.returned])
                self.returned += 1
            if self.returned < self.size:
                return new, done
            done = self.x
            self.__init__(self.start + self.size, self.size, self.mask_id, [bonus] if bonus is not None else [])
            bonus = None


def draft_block(draft, blk, store, cache, steps, device, **denoise_args):
    """1. The draft fills the block's unknown positions D, its pending store folded in. Returns D, the
    draft's block and step map (for on_iteration), then for D the tokens d, steps t and distributions p
    on `device` (the target's), and the number of draft forwards."""
    dev = decode.device_of(draft)
    xd, td, pd, forwards = decode.denoise(draft, torch.tensor(blk.x, device=dev), blk.start, steps, cache=cache,
                                          known=torch.tensor(blk.known, device=dev), context=store.to(dev),
                                          **denoise_args)
    D = blk.unknown()
    Dd = torch.tensor(D, device=dev)
    return D, xd.tolist(), td.tolist(), xd[Dd].to(device), td[Dd].to(device), pd[Dd].to(device), forwards


def caches(target, draft, prompt, block, room, ar):
    """Both models' KV caches with the prompt committed: its aligned blocks for the draft and a diffusion
    target, every token but the newest for an AR target (its next forward verifies with that one)."""
    tcache, dcache = target.new_cache(room), draft.new_cache(room)
    aligned = len(prompt) - len(prompt) % block
    decode.prefill(target, prompt[:len(prompt) - 1] if ar else prompt[:aligned], tcache, 1 if ar else block)
    decode.prefill(draft, prompt[:aligned].to(decode.device_of(draft)), dcache, block)
    return tcache, dcache


@torch.inference_mode()
def generate(target, draft, prompt_ids, max_new_tokens, block=4, draft_steps=None, verify=None, accept=None,
             temperature=0.0, top_k=0, top_p=1.0, strategy="static", threshold=0.9, stop_ids=(), mask_id=None,
             eos_min_prob=0.0, generator=None, on_iteration=None):
    """Speculative decoding: SimSD for a diffusion target, SpecDiff for an AR (qwen3) target.
    Returns (new tokens, stats): at most max_new_tokens, trimmed before the first stop token.

    verify: "simsd" (default) or "exact"; accept: "step" (default) or "position"; both apply to
    a diffusion target only. draft_steps: the draft's denoising steps per block (default: the
    block length, one position per step). The generator, if given, lives on the draft's device.
    on_iteration(info) sees every iteration: the block after it, the step map, each position's
    fate ("known", "accepted", "replaced", "dropped") and the tokens it returned ("new")."""
    ar = target.config.model_type == "qwen3"
    verify, accept = check_modes(ar, verify, accept)
    decode.check(max_new_tokens=max_new_tokens, block=block, steps=draft_steps, eos_min_prob=eos_min_prob)
    mask_id = decode.resolve_mask_id(draft, mask_id)  # the draft is always a diffusion model
    tdev = decode.device_of(target)
    prompt, pick = decode.as_prompt(prompt_ids, tdev), dict(temperature=temperature, top_k=top_k, top_p=top_p)
    aligned = len(prompt) - len(prompt) % block
    t0 = decode.sync(tdev)
    tcache, dcache = caches(target, draft, prompt, block, len(prompt) + max_new_tokens + 3 * block + block * block, ar)
    t1 = decoding_start = decode.sync(tdev)
    stats = {**dict.fromkeys(("iterations", "drafted", "accepted", "replaced", "draft_seconds", "verify_seconds"), 0),
             "target_forwards": int(tcache.len > 0), "draft_forwards": int(dcache.len > 0),
             "committed_histogram": [0] * (block + 2)}
    blk = Block(aligned, block, mask_id, prompt[aligned:].tolist(), returned=len(prompt) - aligned)  # its tail
    store, pending, out = prompt[:0], prompt[-1:], []  # pending: an AR target's uncached tokens
    while len(out) < max_new_tokens:
        D, xd, td, d, t, p, f = draft_block(draft, blk, store, dcache, draft_steps or block, tdev, strategy=strategy,
                                            threshold=threshold, mask_id=mask_id, generator=generator, **pick)
        t2 = decode.sync(tdev)
        # 2. verify: one target forward; 3. accept
        if ar:
            q, order = verify_causal(target, tcache, pending, d, blk.start + D[0], pick), torch.arange(len(D) + 1)
        else:
            q = verify_block(target, tcache, store, blk.x, blk.known, d, t, blk.start, verify, mask_id, pick)
            order = t if accept == "step" else torch.arange(len(D))
        tokens, committed, ok = acceptance(d, p, q, order.to(tdev), temperature, generator, stop_ids, eos_min_prob)
        t3 = decode.sync(tdev)
        kept = sum(c and a for c, a in zip(committed, ok))
        if ar:  # the cache wrote [pending | d]: keep pending and the accepted prefix of d
            tcache.commit(len(pending) + kept)
            pending = torch.tensor([tokens[sum(committed) - 1]], device=tdev)  # the last committed: the target's
        # 4. commit
        bonus = tokens[-1] if len(tokens) > len(D) and committed[-1] else None
        start, status = blk.start, blk.commit(D, tokens, committed, ok)
        info = {"start": start, "block": blk.x[:], "steps": td, "drafted": xd, "status": status, "bonus": bonus}
        for key, value in dict(iterations=1, drafted=len(D), accepted=kept, replaced=sum(committed) - kept,
                               target_forwards=1, draft_forwards=f, draft_seconds=t2 - t1,
                               verify_seconds=t3 - t2).items():
            stats[key] += value
        stats["committed_histogram"][sum(committed)] += 1
        new, done = blk.advance(bonus)
        store = prompt[:0] if done is None else torch.tensor(done, device=tdev)  # both store it next time
        stop = next((i for i, tok in enumerate(new) if tok in stop_ids), None)
        new = new[:stop][:max_new_tokens - len(out)]
        out += new
        if on_iteration:
            on_iteration({**info, "new": new})
        if stop is not None:
            break
        t1 = t3
    stats.update(tokens=len(out), seconds=decode.sync(tdev) - decoding_start, prefill_seconds=decoding_start - t0)
    return out, stats
