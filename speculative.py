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


def check_modes(ar, verify, accept):
    """The verification layout and acceptance order: options of a diffusion target only."""
    if ar and (verify or accept):
        raise ValueError("--verify and --accept apply to a diffusion target only; an autoregressive target "
                         "verifies causally, in position order")
    for flag, value, allowed in (("verify", verify, ("simsd", "exact")), ("accept", accept, ("step", "position"))):
        if value is not None and value not in allowed:
            raise ValueError(f"--{flag} must be one of {', '.join(allowed)}; got {value!r}")
    return verify or "simsd", accept or "step"


@torch.inference_mode()
def generate(target, draft, prompt_ids, max_new_tokens, block=4, draft_steps=None, verify=None, accept=None,
             temperature=0.0, top_k=0, top_p=1.0, strategy="static", threshold=0.9, stop_ids=(), mask_id=None,
             eos_min_prob=0.0, generator=None, on_iteration=None):
    """Speculative decoding: SimSD for a diffusion target, SpecDiff for an AR (qwen3) target.
    Returns (new tokens, stats): at most max_new_tokens, trimmed before the first stop token.

    verify: "simsd" (default) or "exact"; accept: "step" (default) or "position"; both apply to
    a diffusion target only. draft_steps: the draft's denoising steps per block (default: the
    block length, one position per step). The generator, if given, lives on the draft's device.
    on_iteration(info) sees every iteration: the block before and after, the step map, each
    position's fate ("known", "accepted", "replaced", "dropped") and the tokens it returned."""
    ar = target.config.model_type == "qwen3"
    verify, accept = check_modes(ar, verify, accept)
    decode.check(max_new_tokens=max_new_tokens, block=block, steps=draft_steps, eos_min_prob=eos_min_prob)
    mask_id = decode.resolve_mask_id(draft, mask_id)  # the draft is always a diffusion model
    tdev, ddev = decode.device_of(target), decode.device_of(draft)
    prompt = decode.as_prompt(prompt_ids, tdev)
    P = len(prompt)
    aligned = P - P % block
    room = P + max_new_tokens + 3 * block + block * block  # committed + the widest scratch
    tcache, dcache = target.new_cache(room), draft.new_cache(room)
    pick = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    t0 = decode.sync(tdev)
    decode.prefill(target, prompt[:P - 1] if ar else prompt[:aligned], tcache, 1 if ar else block)
    decode.prefill(draft, prompt[:aligned].to(ddev), dcache, block)
    t1 = decoding_start = decode.sync(tdev)
    stats = {"iterations": 0, "drafted": 0, "accepted": 0, "replaced": 0, "target_forwards": int(tcache.len > 0),
             "draft_forwards": int(aligned > 0), "committed_histogram": [0] * (block + 2), "draft_seconds": 0.0,
             "verify_seconds": 0.0}
    start, n = aligned, P - aligned
    x, known, emitted = prompt[aligned:].tolist() + [mask_id] * (block - n), [True] * n + [False] * (block - n), n
    store, pending, out = prompt[:0], prompt[P - 1:], []  # pending: an AR target's uncached tokens
    while len(out) < max_new_tokens:
        # 1. draft: fill the unknown positions (folding the draft's pending store in)
        D = [i for i in range(block) if not known[i]]
        xd, td, pd, f = decode.denoise(draft, torch.tensor(x, device=ddev), start, draft_steps or block,
                                       known=torch.tensor(known, device=ddev), cache=dcache, context=store.to(ddev),
                                       strategy=strategy, threshold=threshold, mask_id=mask_id, generator=generator,
                                       **pick)
        Dd = torch.tensor(D, device=ddev)
        d, t, p = xd[Dd].to(tdev), td[Dd].to(tdev), pd[Dd].to(tdev)
        t2 = decode.sync(tdev)
        # 2. verify: one target forward; 3. accept
        if ar:
            q, order = verify_causal(target, tcache, pending, d, start + D[0], pick), torch.arange(len(D) + 1)
        else:
            q = verify_block(target, tcache, store, x, known, d, t, start, verify, mask_id, pick)
            order = t if accept == "step" else torch.arange(len(D))
        tokens, committed, ok = acceptance(d, p, q, order.to(tdev), temperature, generator, stop_ids, eos_min_prob)
        t3 = decode.sync(tdev)
        kept = [c and a for c, a in zip(committed, ok)]
        if ar:  # the cache wrote [pending | d]: keep pending and the accepted prefix of d
            tcache.commit(len(pending) + sum(kept))
            pending = torch.tensor([tokens[max(i for i, c in enumerate(committed) if c)]], device=tdev)
        # 4. commit
        status = ["known" if k else "dropped" for k in known]
        for i, pos in enumerate(D):
            if committed[i]:
                x[pos], known[pos], status[pos] = tokens[i], True, "accepted" if ok[i] else "replaced"
        bonus = tokens[-1] if len(tokens) > len(D) and committed[-1] else None
        for key, value in (("iterations", 1), ("drafted", len(D)), ("accepted", sum(kept)),
                           ("replaced", sum(committed) - sum(kept)), ("target_forwards", 1), ("draft_forwards", f),
                           ("draft_seconds", t2 - t1), ("verify_seconds", t3 - t2)):
            stats[key] += value
        stats["committed_histogram"][sum(committed)] += 1
        info = {"start": start, "block": x[:], "steps": td.tolist(), "drafted": xd.tolist(), "status": status,
                "bonus": bonus}
        new, store = [], prompt[:0]  # both models have stored the previous block by now
        while True:  # return the block's known prefix; a completed block is stored next time
            while emitted < block and known[emitted]:
                new.append(x[emitted])
                emitted += 1
            if emitted < block:
                break
            store, start = torch.tensor(x, device=tdev), start + block
            x, known, emitted = [mask_id] * block, [False] * block, 0
            if bonus is not None:  # an AR target's token after d_m starts the next block
                x[0], known[0], bonus = bonus, True, None
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
