"""Vanilla SDAR block-diffusion decoding: a KV cache, the no-cache oracle, and `python decode.py`.

A block of B positions at absolute positions [kB, (k+1)B) starts as known tokens plus
masks. Each of `steps` forwards predicts every masked position, and the most confident
ones are revealed. A finished block is stored in the cache by folding it into the first
forward of the next block, so a block costs `steps` forwards, not `steps + 1`.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

import mask as masks
import model as sdar


def schedule(m, steps):
    """How many of m masked positions each step reveals: as even as possible, earlier
    steps taking the remainder, empty steps skipped."""
    base, extra = divmod(m, steps)
    return [base + (s < extra) for s in range(steps) if base + (s < extra) > 0]


def distribution(logits, temperature=0.0, top_k=0, top_p=1.0):
    """(..., V) logits -> the probabilities a token is drawn from: temperature (1 for
    argmax decoding), then top-k, then top-p (the smallest set whose mass reaches top_p)."""
    logits = logits.float() / (temperature or 1.0)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # the mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def pick(probs, temperature, generator):
    """One token per row: argmax when temperature == 0, else a draw."""
    if temperature == 0:
        return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def denoise(model, block, start, steps, *, cache=None, context=None, strategy="static", threshold=0.9,
            temperature=0.0, top_k=0, top_p=1.0, mask_id, generator=None):
    """Fill the masked positions of one block: the one place that forwards, picks, reveals
    and records the step map.

    block (B,): known tokens, mask_id at the positions to fill, at positions start..start+B-1.
    context: tokens just before the block. With a cache it is the just-completed block (or
    empty), stored by folding it into the first forward; without a cache (the oracle) it is
    the whole sequence so far, recomputed at every step.
    Returns tokens (B,), step (B,) (0 = known, s = revealed at step s >= 1), probs (B, V)
    (the distribution each position was drawn from; zeros at known positions), forwards.
    """
    if strategy not in ("static", "dynamic"):
        raise ValueError(f"unknown strategy {strategy!r}: use 'static' or 'dynamic'")
    context = block[:0] if context is None else context
    todo = block == mask_id  # (B,) still masked
    step = torch.zeros_like(block)
    probs_out, forwards = None, 0
    for s, k in enumerate(schedule(int(todo.sum()), steps), start=1):
        if strategy == "dynamic" and s > 1 and not todo.any():
            break  # dynamic revealed more than scheduled: the block is done early
        n = len(context)
        logits = model(torch.cat([context, block])[None], torch.arange(start - n, start + len(block),
                       device=block.device), masks.block_causal(n + len(block), len(block), start - n,
                       block.device), cache)[0, n:]
        forwards += 1
        if cache is not None and n:
            cache.commit(n)  # the folded store is now in the cache
            context = context[:0]
        probs = distribution(logits, temperature, top_k, top_p)  # (B, V)
        tokens = pick(probs, temperature, generator)
        conf = probs.gather(-1, tokens[:, None])[:, 0].masked_fill(~todo, -1.0)
        rank = torch.argsort(torch.argsort(conf, descending=True, stable=True))  # 0 = most confident
        reveal = todo & ((rank < k) | ((conf > threshold) if strategy == "dynamic" else False))
        block = torch.where(reveal, tokens, block)  # no host sync: everything stays on the device
        step = torch.where(reveal, s, step)
        probs_out = torch.where(reveal[:, None], probs, 0.0 if probs_out is None else probs_out)
        todo = todo & ~reveal
    return block, step, probs_out, forwards


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def resolve_mask_id(model, mask_id):
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    if mask_id is None:
        raise ValueError("no mask token: pass mask_id or set mask_token_id in config.json")
    return mask_id


def _generate(model, prompt_ids, max_new_tokens, cached, block=4, steps=None, stop_ids=(), mask_id=None,
              callback=None, **pick_args):
    mask_id = resolve_mask_id(model, mask_id)
    dev = model.model.embed_tokens.weight.device
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=dev)
    P = len(prompt)
    aligned = P - P % block  # blocks sit at absolute positions [kB, (k+1)B)
    cache = model.new_cache(aligned + max_new_tokens + 3 * block) if cached else None
    t0, forwards = sync(dev), 0
    if cached and aligned:  # prefill the aligned prompt prefix, block-causally
        model(prompt[None, :aligned], torch.arange(aligned, device=dev), masks.block_causal(aligned, block,
              device=dev), cache)
        cache.commit(aligned)
        forwards += 1
    t1 = sync(dev)
    seq, known, out = prompt[:aligned], prompt[aligned:], []
    while len(out) < max_new_tokens:
        start = len(seq)
        x = torch.cat([known, known.new_full((block - len(known),), mask_id)])
        if not cached:
            context = seq  # the oracle recomputes everything
        elif start > aligned:
            context = seq[start - block:]  # fold the block just completed into this forward
        else:
            context = seq[:0]
        x, _, _, f = denoise(model, x, start, steps or block, cache=cache, context=context, mask_id=mask_id,
                             **pick_args)
        forwards += f
        new = x[len(known):].tolist()  # one host sync per block
        seq, known = torch.cat([seq, x]), known[:0]
        stop = next((i for i, t in enumerate(new) if t in stop_ids), None)
        out += new[:stop]
        if callback:
            callback(new[:stop])
        if stop is not None:
            break
    t2 = sync(dev)
    out = out[:max_new_tokens]
    return out, {"forwards": forwards, "prefill_forwards": int(cached and aligned > 0), "tokens": len(out),
                 "seconds": t2 - t1, "prefill_seconds": t1 - t0}


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, block=4, steps=None, strategy="static", threshold=0.9,
             temperature=0.0, top_k=0, top_p=1.0, stop_ids=(), mask_id=None, generator=None, callback=None):
    """Vanilla block-diffusion decoding with a KV cache. Returns (new tokens, stats): at most
    max_new_tokens, trimmed before the first stop token; stats has forwards, tokens,
    seconds (decode, prefill excluded) and prefill_seconds. callback(tokens) sees each block."""
    return _generate(model, prompt_ids, max_new_tokens, True, block, steps, stop_ids, mask_id, callback,
                     strategy=strategy, threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p,
                     generator=generator)


@torch.inference_mode()
def generate_naive(model, prompt_ids, max_new_tokens, block=4, steps=None, strategy="static", threshold=0.9,
                   temperature=0.0, top_k=0, top_p=1.0, stop_ids=(), mask_id=None, generator=None):
    """The oracle: the same decisions with no cache, recomputing the whole sequence with the
    block-causal mask at every step. The cached path must equal it token for token."""
    return _generate(model, prompt_ids, max_new_tokens, False, block, steps, stop_ids, mask_id, None,
                     strategy=strategy, threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p,
                     generator=generator)


# ----------------------------------------------------------------------------- the command

WEIGHTS_HELP = ("SDAR weights are downloaded with the Hugging Face CLI, e.g. "
                "`huggingface-cli download JetLM/SDAR-8B-Chat --local-dir SDAR-8B-Chat`, then --model SDAR-8B-Chat")


def fail(message):
    print(f"decode.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_checkpoint(path, device, dtype, what="--model"):
    """Model + tokenizer from a checkpoint folder; a clear sentence instead of a traceback."""
    path = Path(path)
    if not path.is_dir():
        fail(f"{what} {path} is not a folder. {WEIGHTS_HELP}")
    try:
        return sdar.load(path, device, dtype), sdar.load_tokenizer(path)
    except (OSError, ValueError) as e:
        fail(f"{what} {path} is not a complete SDAR checkpoint: {e}. {WEIGHTS_HELP}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Block-diffusion decoding with an SDAR model (vanilla), or SimSD "
                                "speculative decoding with --draft. Without --model it runs the toy models "
                                "trained by train_tiny.py (training them first if missing).")
    p.add_argument("--model", help="SDAR checkpoint folder (config.json, safetensors, tokenizer files)")
    p.add_argument("--draft", help="draft checkpoint folder: decode speculatively (SimSD)")
    p.add_argument("--verify", choices=["simsd", "exact"], default="simsd",
                   help="verification layout: the paper's single copy, or one copy per draft step (lossless)")
    p.add_argument("--draft-device", choices=["cpu", "cuda"], help="device of the draft model (default: --device)")
    p.add_argument("--show", action="store_true", help="print every speculative iteration")
    p.add_argument("--prompt", default="Write a haiku about the sea.", help="user message (chat template applied)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--block", type=int, help="block length (default: the checkpoint's block_size, else 4)")
    p.add_argument("--steps", type=int, help="denoising steps per block (default: the block length)")
    p.add_argument("--strategy", choices=["static", "dynamic"], default="static",
                   help="static: reveal the scheduled top-k; dynamic: every position above --threshold")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of --strategy dynamic")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = argmax")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--eos-min-prob", type=float, default=0.0,
                   help="speculative: a stop token arriving only as the bonus needs this target probability")
    p.add_argument("--vanilla", action="store_true", help="toy default only: run the toy target without the draft")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def pick_device(name):
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but this machine has no CUDA GPU (or torch was built without CUDA)")
    return device


def main(argv=None):
    args = parse_args(argv)
    device, draft_device = pick_device(args.device), pick_device(args.draft_device or args.device)
    dtype_of = lambda dev: getattr(torch, args.dtype or ("bfloat16" if dev == "cuda" else "float32"))
    if not args.prompt.strip():
        fail("the prompt is empty; give some text with --prompt")
    if args.model is None:
        import train_tiny  # the toy default: the command may reach up; the library never does
        train_tiny.ensure_trained()
        args.model = str(train_tiny.TARGET_DIR)
        args.draft = None if args.vanilla else args.draft or str(train_tiny.DRAFT_DIR)
        prompts = train_tiny.examples(5, "heldout")
    else:
        prompts = [(args.prompt, None)]
    model, tok = load_checkpoint(args.model, device, dtype_of(device))
    draft = None
    if args.draft:
        draft, draft_tok = load_checkpoint(args.draft, draft_device, dtype_of(draft_device), "--draft")
        if (draft_tok.specials, draft_tok.vocab_size) != (tok.specials, tok.vocab_size) or \
                draft.config.vocab_size != model.config.vocab_size:
            fail(f"--draft {args.draft} and --model {args.model} do not share a tokenizer; speculation needs one")
        if draft.config.block_size != model.config.block_size:
            fail(f"the draft was trained with block {draft.config.block_size} and the target with block "
                 f"{model.config.block_size}; they must match")
    trained = model.config.block_size
    if args.block is not None and trained is not None and args.block != trained:
        fail(f"block {args.block} requested but this checkpoint was trained with block {trained}")
    block = args.block or trained or 4
    for text, answer in prompts:
        ids = tok.chat(text, args.system)
        if len(ids) + args.max_new_tokens > model.config.max_position_embeddings:
            fail(f"prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
                 f"max_position_embeddings {model.config.max_position_embeddings}")
        run_one(model, draft, tok, ids, text, answer, block, args, draft_device)


class Printer:
    """Streams committed text, holding back a split UTF-8 character; draws --show iterations."""

    def __init__(self, tok, color):
        self.tok, self.tokens, self.shown, self.color = tok, [], "", color

    def stream(self, tokens):
        if any(t in self.tok.stop_ids for t in self.tokens):
            return  # everything after a stop token is discarded
        self.tokens += tokens
        stop = next((i for i, t in enumerate(self.tokens) if t in self.tok.stop_ids), None)
        text = self.tok.decode(self.tokens[:stop])
        if not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def paint(self, tokens, code, marker):
        text = "".join(repr(self.tok.decode([t]))[1:-1] for t in tokens)
        return f"\033[{code}m{text}\033[0m" if self.color else f"{marker[0]}{text}{marker[1]}"

    def show(self, it):
        a, d = it["accepted"], it["drafted"]
        steps = " ".join(f"{repr(self.tok.decode([t]))[1:-1]}@{s}" for t, s in zip(d, it["steps"]))
        line = self.paint(it["known"], "2", "()") + self.paint(d[:a], "32", "[]") + self.paint(d[a:], "9;31", "{}")
        bonus = f" + bonus {self.paint([it['bonus']], '1;33', '<>')}" if it["bonus"] is not None else ""
        print(f"  draft {steps:<40} -> {line}{bonus}   ({a}/{len(d)} accepted)")


def run_one(model, draft, tok, ids, text, answer, block, args, draft_device):
    out = Printer(tok, sys.stdout.isatty())
    gen = torch.Generator(device=draft_device if draft is not None else model.lm_head.weight.device)
    gen.manual_seed(args.seed)
    pick_args = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, strategy=args.strategy,
                     threshold=args.threshold, stop_ids=tok.stop_ids, mask_id=tok.mask_id, generator=gen)
    print(f"\n>>> {text}\n", flush=True)
    if draft is None:
        tokens, stats = generate(model, ids, args.max_new_tokens, block=block, steps=args.steps,
                                 callback=out.stream, **pick_args)
        forwards = stats["forwards"] - stats["prefill_forwards"]
        extra = f"{forwards / max(stats['tokens'], 1):.2f} forwards per token"
    else:
        import speculative
        if args.show:
            print("  (known) [accepted] {rejected} <bonus>" if not out.color else "", flush=True)
        tokens, stats = speculative.generate(
            model, draft, ids, args.max_new_tokens, block=block, draft_steps=args.steps, verify=args.verify,
            eos_min_prob=args.eos_min_prob, **pick_args,
            on_iteration=out.show if args.show else lambda it: out.stream(it["drafted"][:it["accepted"]] + (
                [it["bonus"]] if it["bonus"] is not None else [])))
        forwards = stats["iterations"]
        extra = (f"{stats['tokens'] / max(forwards, 1):.2f} tokens per target forward, acceptance "
                 f"{stats['accepted'] / max(stats['drafted'], 1):.0%}, verify {args.verify}")
    print(tok.decode(tokens)[len(out.shown):] if not args.show else "\n" + tok.decode(tokens))
    if answer is not None:
        import train_tiny
        print(f"[{'correct' if train_tiny.score(tok.decode(tokens), answer) else 'WRONG, expected ' + answer}]")
    n, sec = stats["tokens"], stats["seconds"]
    print(f"[{n} tokens, {n / max(sec, 1e-9):.1f} tok/s, {extra}, block {block}, {args.strategy}, "
          f"{model.lm_head.weight.device.type}]")


if __name__ == "__main__":
    main()
