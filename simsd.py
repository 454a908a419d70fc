"""SimSD, the paper's method, for one prompt: a small draft denoises a block, and the target checks
every drafted token in one forward.

One iteration, for the block being decoded:
  1. draft   - the draft denoises the block's unknown positions by SDAR's rule (sdar.denoise),
               recording the step that revealed each position (its step map) and, at each step,
               its distributions;
  2. layout  - [the block, each drafted position holding its drafted token (a reference token) |
               one mask token per position], both at the block's positions, attending by
               mask.verify: mask token i sees the block exactly as the draft saw it just before
               the step that revealed position i;
  3. forward - one target forward; its logits at mask token i are its prediction for position i
               in that state;
  4. accept  - the drafted tokens judged in draft-step order (argmax, or rejection sampling): a
               whole step is committed (the target's token where it rejected the draft's), and
               a step with a rejection is the last;
  5. commit  - the committed tokens join the block's known tokens; the draft denoises what is still
               masked next time, continuing SDAR's schedule. A full block is stored by both models,
               folded into their next forward (it is "pending" until then).
In one layer the logits at mask token i equal the target's on that state; deeper, a mask token also
sees later reveals through other mask tokens, which the paper accepts. The output is not the
target's own (the draft chose the order), and sampled it is biased; speculative.py holds lossless
verification, lookahead, batches and SpecDiff, and is tested against this file.
"""
import torch

import mask as masks
from batch import Stats, trim
from sdar import GREEDY, Pending, Settings, denoise, device_of, draw, prefill


def judge(d, p, q, sampling, generator=None, stop_ids=(), eos_min_prob=0.0):
    """(tokens, ok): each row's verdict on a drafted token d (...,), given draft and target
    distributions p and q (..., V). Greedy accepts d when it is argmax q; sampling with probability
    min(1, q(d) / p(d)), else draws from normalize(max(q - p, 0)): a row's token is distributed as
    q whatever the draft did. eos_min_prob: a stop token the target picks needs this probability,
    else it picks again without stop tokens (which changes the target's output)."""
    chosen = q
    if eos_min_prob > 0 and len(stop_ids):  # gate the stop tokens the target does not want
        stops = torch.as_tensor(stop_ids, device=q.device)  # ids, or their tensor
        weak = q.index_select(-1, stops) < eos_min_prob
        chosen = q.index_copy(-1, stops, q.index_select(-1, stops).masked_fill(weak, 0.0))
        chosen = torch.where(chosen.sum(-1, keepdim=True) > 0, chosen, q)
    if sampling.greedy:
        ok = d == q.argmax(-1)
        return torch.where(ok, d, chosen.argmax(-1)), ok
    source = generator.device if generator is not None else d.device  # the generator's own device
    u = torch.rand(d.shape, generator=generator, device=source).to(d.device)
    q_d, p_d = q.gather(-1, d[..., None])[..., 0], p.gather(-1, d[..., None])[..., 0]
    ok = u * p_d < q_d  # modified rejection sampling
    residual = (chosen - p).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, chosen)  # p == q: q
    return torch.where(ok, d, draw(residual, generator)), ok


def in_time_order(ok, order):
    """The positions committed when judged in time order (ok, order: (..., n), each position's
    verdict and rank): every position up to the earliest rejected rank, all of that rank."""
    later = order.max(-1, keepdim=True).values + 1
    first = torch.where(ok, later, order).min(-1, keepdim=True).values
    return order <= first


def accept(step, drafted, probs, q, s, generator):
    """Step 4: the target's verdict on one drafted block. step (B,): the step map (0 = known);
    drafted (B,): the drafted tokens; probs (S, B, V): the draft's distributions before each step
    (None when greedy); q (B, V): the target's at each position's mask token. Returns the tokens
    (the target's where it rejected the draft's) and which positions are committed."""
    p = None if probs is None else probs[(step - 1).clamp(min=0), torch.arange(len(step))]
    tokens, ok = judge(drafted, p, q, s.sampling, generator, s.stop_ids, s.eos_min_prob)
    order = step if s.accept == "step" else torch.arange(len(step))  # the paper's: positions
    return tokens, (step > 0) & in_time_order(ok | (step == 0), order)


@torch.inference_mode()
def generate(target, draft, prompt_ids, max_new_tokens, *, block=4, steps=None, strategy="static",
             threshold=0.9, sampling=GREEDY, order="step", eos_min_prob=0.0, stop_ids=(),
             generator=None):
    """SimSD decoding of one prompt (a list of ids) with an SDAR target and an SDAR draft. Returns
    (new tokens, Stats): at most max_new_tokens, trimmed before the first stop token. The target's
    decoding settings (block, steps, strategy, threshold, sampling) are the draft's too; order:
    "step" (draft-step order) or the paper's "position" (the longest agreeing prefix in position
    order, which can commit a token judged with a later-rejected one in place); eos_min_prob: the
    target probability a stop token it picks in place of a drafted one needs."""
    s = Settings(max_new_tokens, block, steps, strategy, threshold, sampling, stop_ids,
                 verify="simsd", accept=order, eos_min_prob=eos_min_prob,
                 drafting="step").resolve("paper")
    B, mask_id, dev = block, target.config.mask_token_id, device_of(target)
    prompt = torch.tensor(list(prompt_ids), device=dev)
    start = len(prompt) - len(prompt) % B  # blocks sit at [kB, (k+1)B)
    caches = [m.new_cache(s.room(len(prompt), 3 * B)) for m in (target, draft)]
    for m, cache in zip((target, draft), caches):
        prefill(m, prompt[:start], cache, B)
    tail = prompt[start:]
    x = torch.cat([tail, tail.new_full((B - len(tail),), mask_id)])  # the block: mask id = unknown
    known, done = torch.arange(B, device=dev) < len(tail), 0  # done: target steps on the block
    pending = [prompt[:0], prompt[:0]]  # the last full block, which the target / draft has not stored
    out, stats = [], Stats()
    while True:
        # 1. draft: the rest of the block, continuing SDAR's schedule after `done` steps
        stored = Pending(pending[1][None], torch.tensor([len(pending[1])], device=dev), whole=True)
        d = denoise(draft, x[None], torch.tensor([start], device=dev),
                    torch.tensor([done], device=dev), s, cache=caches[1], pending=stored,
                    generator=generator)
        step, drafted = d.step[0], d.tokens[0]
        # 2. layout: [pending | the block as drafted | B mask tokens], each copy at the positions
        before = torch.arange(start - len(pending[0]), start, device=dev)
        positions = torch.arange(start, start + B, device=dev)
        ids = torch.cat([pending[0], drafted, torch.full_like(drafted, mask_id)])
        pos = torch.cat([before, positions, positions])
        attend = masks.with_pending(len(pending[0]), masks.verify(step), B)
        # 3. one target forward: its distributions at the mask tokens (B, V)
        logits = target(ids[None], pos, attend, caches[0])[0, -B:]
        q = s.sampling.distribution(logits, suppress=mask_id)
        # 4. accept, in draft-step order
        probs = None if d.probs is None else d.probs[:, 0]
        tokens, committed = accept(step, drafted, probs, q, s, generator)
        # 5. commit: the target stored its pending block (the draft's first forward did)
        caches[0].commit(len(pending[0]))
        pending = [prompt[:0], prompt[:0]]
        x, known = torch.where(committed, tokens, x), known | committed
        dropped = step[(step > 0) & ~committed]
        done += int(dropped.min()) - 1 if len(dropped) else int(step.max())
        stats.forwards += 1
        stats.draft_forwards += d.forwards
        if known.all():  # a full block: returned, and stored by both models next time
            new, finished = trim(x.tolist()[len(tail):], s.stop_ids, max_new_tokens - len(out))
            out += new
            if finished:
                stats.tokens = len(out)
                return out, stats
            pending, tail, start, done = [x, x], tail[:0], start + B, 0
            x, known = torch.full_like(x, mask_id), torch.zeros_like(known)
