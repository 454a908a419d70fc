"""SimSD speculative decoding for block-diffusion models (arXiv 2606.02544).

Each iteration:
  1. draft  - the small model denoises the rest of the current block (decode.denoise),
              recording each drafted token d_i, the step t_i that revealed it, and its
              distribution p_i;
  2. verify - the target runs ONE forward on [known | reference d_1..d_m | m masks], where
              mask token i sees the block exactly as the draft saw it just before step t_i
              (mask.verify); or, in exact mode, on one copy of the block per draft step;
  3. accept - in position order: greedy match, or modified rejection sampling; the first
              rejected position gets a bonus token from the target;
  4. commit - the accepted prefix plus the bonus join the block's known tokens; a completed
              block is stored in both caches by folding it into each model's next forward.
Both caches only ever hold complete blocks; the known tokens of the current block are re-fed.
"""
import torch

import decode
import mask as masks


def uniform(n, generator, device):
    """n uniforms from `generator` (on its own device), moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device).to(device)


def accept(d, p, q, temperature, generator=None, stop_ids=(), eos_min_prob=0.0):
    """Position-order acceptance of drafted tokens d (m,) with draft distributions p (m, V)
    and target distributions q (m, V). Returns (accepted, bonus): the length of the accepted
    prefix, and the target's token at the first rejected position (None if all accepted).

    greedy (temperature 0): accept while d_i == argmax q_i; the bonus is argmax q_a.
    sampling: accept d_i with probability min(1, q_i(d_i) / p_i(d_i)); the bonus is drawn
    from normalize(max(q_a - p_a, 0)), so every committed token is distributed as q.
    eos_min_prob: a stop token that arrives only as the bonus needs at least this target
    probability; otherwise the bonus is drawn again without stop tokens."""
    m = d.shape[0]
    qd = q.gather(-1, d[:, None])[:, 0]
    if temperature == 0:
        ok = d == q.argmax(-1)
    else:
        ok = uniform(m, generator, d.device) * p.gather(-1, d[:, None])[:, 0] < qd
    a = ok.long().cumprod(0).sum()  # length of the agreeing prefix, still on the device
    row = a.clamp(max=m - 1)  # when all are accepted the bonus below is computed and ignored
    target = q[row]
    if len(stop_ids) and eos_min_prob > 0:  # gate stops that the target does not really want
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=d.device)
        target = target.index_put((stops,), torch.where(target[stops] < eos_min_prob, 0.0, target[stops]))
    bonus_dist = target if temperature == 0 else (target - p[row]).clamp(min=0)
    bonus_dist = torch.where(bonus_dist.sum() > 0, bonus_dist, target)  # empty residual: use q itself
    if temperature == 0:
        bonus = bonus_dist.argmax()
    else:
        gumbel = -torch.log(-torch.log(uniform(q.shape[-1], generator, d.device).clamp(min=1e-20)))
        bonus = (bonus_dist.log() + gumbel).argmax()  # a draw from normalize(bonus_dist)
    a, bonus = torch.stack([a, bonus]).tolist()  # the one host sync of an iteration
    return a, (bonus if a < m else None)


def verify_layout(known, d, t, start, mode, mask_id):
    """Token ids, positions, attention mask and the rows whose logits verify d, for one target
    forward. simsd: [known | d | masks]; exact: one [known | block before step s] per step s."""
    n, m = len(known), len(d)
    if mode == "simsd":
        ids = torch.cat([known, d, d.new_full((m,), mask_id)])
        rows = torch.arange(n + m, n + 2 * m, device=d.device)  # the mask tokens
        return ids, masks.verify_positions(t, n, start), masks.verify(t, n), rows
    if mode == "exact":
        states = torch.unique(t)[:, None]  # (S, 1): copy s shows the references revealed before s
        copies = torch.where(t[None, :] < states, d[None, :], mask_id)  # (S, m)
        ids = torch.cat([known.expand(len(states), n), copies], dim=1).reshape(-1)
        att, rows = masks.verify_exact(t, n)
        return ids, masks.verify_exact_positions(t, n, start), att, rows
    raise ValueError(f"unknown verification mode {mode!r}: use 'simsd' or 'exact'")


@torch.inference_mode()
def generate(target, draft, prompt_ids, max_new_tokens, block=4, draft_steps=None, verify="simsd",
             temperature=0.0, top_k=0, top_p=1.0, strategy="static", threshold=0.9, stop_ids=(), mask_id=None,
             eos_min_prob=0.0, generator=None, on_iteration=None):
    """SimSD decoding. Returns (new tokens, stats): at most max_new_tokens, trimmed before the
    first stop token. draft_steps defaults to one position per step. The generator, if given,
    lives on the draft's device. on_iteration(info) sees every iteration (for --show)."""
    mask_id = decode.resolve_mask_id(target, mask_id)
    tdev, ddev = target.model.embed_tokens.weight.device, draft.model.embed_tokens.weight.device
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=tdev)
    aligned = len(prompt) - len(prompt) % block
    room = aligned + max_new_tokens + 3 * block + block * block  # committed + the widest scratch
    tcache, dcache = target.new_cache(room), draft.new_cache(room)
    pick = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    t0 = decode.sync(tdev)
    if aligned:  # prefill both models with the aligned prompt prefix
        for mdl, cache, dev in ((target, tcache, tdev), (draft, dcache, ddev)):
            mdl(prompt[None, :aligned].to(dev), torch.arange(aligned, device=dev),
                masks.block_causal(aligned, block, device=dev), cache)
            cache.commit(aligned)
    t1 = decoding_start = decode.sync(tdev)
    stats = {"iterations": 0, "drafted": 0, "accepted": 0, "target_forwards": int(aligned > 0),
             "draft_forwards": int(aligned > 0), "committed_histogram": [0] * (block + 1),
             "draft_seconds": 0.0, "verify_seconds": 0.0}
    start, known, store, out = aligned, prompt[aligned:], prompt[:0], []
    while len(out) < max_new_tokens:
        # 1. draft: denoise the rest of the block (folding in the draft's pending store)
        n, m = len(known), block - len(known)
        x = torch.cat([known, known.new_full((m,), mask_id)]).to(ddev)
        x, t, p, f = decode.denoise(draft, x, start, draft_steps or m, cache=dcache, context=store.to(ddev),
                                    strategy=strategy, threshold=threshold, mask_id=mask_id, generator=generator,
                                    **pick)
        d, t, p = x[n:].to(tdev), t[n:].to(tdev), p[n:].to(tdev)
        t2 = decode.sync(tdev)
        # 2. verify: one target forward, with the pending store folded in front
        ids, pos, att, rows = verify_layout(known, d, t, start, verify, mask_id)
        ns = len(store)
        logits = target(torch.cat([store, ids])[None], torch.cat([torch.arange(start - ns, start, device=tdev), pos]),
                        masks.with_store(att, ns), tcache)[0, ns:]
        if ns:
            tcache.commit(ns)
            store = store[:0]  # both models have it now
        q = decode.distribution(logits[rows], **pick)  # (m, V)
        # 3. accept in position order, 4. commit
        a, bonus = accept(d, p, q, temperature, generator, stop_ids, eos_min_prob)
        new = d[:a].tolist() + ([bonus] if bonus is not None else [])
        t3 = decode.sync(tdev)
        for key, value in (("iterations", 1), ("drafted", m), ("accepted", a), ("target_forwards", 1),
                           ("draft_forwards", f), ("draft_seconds", t2 - t1), ("verify_seconds", t3 - t2)):
            stats[key] += value
        stats["committed_histogram"][len(new)] += 1
        if on_iteration:
            on_iteration({"known": known.tolist(), "drafted": d.tolist(), "steps": t.tolist(), "accepted": a,
                          "bonus": bonus})
        known = torch.cat([known, torch.tensor(new, dtype=torch.long, device=tdev)])
        stop = next((i for i, tok in enumerate(new) if tok in stop_ids), None)
        out += new[:stop]
        if stop is not None:
            break
        if len(known) == block:  # the block is complete: both models store it on their next forward
            start, store, known = start + block, known, known[:0]
        t1 = t3
    out = out[:max_new_tokens]
    stats.update(tokens=len(out), seconds=decode.sync(tdev) - decoding_start, prefill_seconds=decoding_start - t0)
    return out, stats
