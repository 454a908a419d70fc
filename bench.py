"""Vanilla SDAR decoding vs SimSD: a markdown table that ends with one JSON line.

    python bench.py                                             # the toy pair (trained first if missing)
    python bench.py --model T --draft D --prompts p.jsonl       # real SDAR checkpoints
    python bench.py --shapes sdar-8b:sdar-1.7b                  # random weights of real shapes

Two protocols, never mixed (DESIGN.md section 8). Latency: a fixed number of new tokens with
stop tokens ignored, prefill and warm-up excluded, medians; it gives tok/s, speedup, tokens per
target forward and acceptance. Quality: one greedy run per prompt that stops at EOS; it gives
accuracy. Toy answers are scored by train_tiny.score (exact match); a JSONL line
{"prompt": ..., "answer": ...} counts as correct when the stripped answer appears in the decoded
output, and lines without an answer are not scored (accuracy null when none has one).
"""
import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch

import decode
import mask as masks
import model as sdar
import speculative

METHODS = ("target", "draft", "simsd", "simsd-exact")
TINY = sdar.Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, mask_token_id=511)
SHAPES = {**sdar.PRESETS, "tiny": TINY}


def log(message):
    print(message, file=sys.stderr, flush=True)


def median_time(run, repeats, warmup, device):
    """(median seconds, results) over `repeats` calls of run() after `warmup` untimed ones, synchronised
    on CUDA. A run returning generate's stats is timed by its "seconds" (prefill excluded), others whole."""
    seconds, results = [], []
    for i in range(warmup + repeats):
        t0 = decode.sync(device)
        out = run()
        t1 = decode.sync(device)
        if i >= warmup:
            seconds.append(out["seconds"] if isinstance(out, dict) else t1 - t0)
            results.append(out)
    return statistics.median(seconds), results


# ----------------------------------------------------------------------------- the table

def decode_once(method, target, draft, ids, block, new_tokens, stop_ids, mask_id):
    """One greedy decode by `method`: generate's stats, plus the new tokens under "out"."""
    if method in ("target", "draft"):
        out, stats = decode.generate(target if method == "target" else draft, ids, new_tokens, block=block,
                                     stop_ids=stop_ids, mask_id=mask_id)
    else:
        out, stats = speculative.generate(target, draft, ids, new_tokens, block=block, stop_ids=stop_ids,
                                          verify="exact" if method == "simsd-exact" else "simsd", mask_id=mask_id)
    return {**stats, "out": out}


def measure(target, draft, tok, prompts, check, blocks, new_tokens, repeats, device, cap=256):
    """Every method on every prompt, prompt by prompt, so drift hits all methods alike. One record per
    (method, block), lists over prompts: tok_s and stats (latency protocol); quality (stats) and correct
    (None: no answer) (quality protocol)."""
    records = {(m, b): {"method": m, "block": b, "tok_s": [], "stats": [], "correct": [], "quality": []}
               for b in blocks for m in METHODS}
    for i, (text, answer) in enumerate(prompts):
        ids = tok.chat(text)
        for (method, block), rec in records.items():
            sec, runs = median_time(lambda: decode_once(method, target, draft, ids, block, new_tokens, (),
                                                        tok.mask_id), repeats, int(i == 0), device)
            rec["tok_s"].append(runs[-1]["tokens"] / sec)
            rec["stats"].append(runs[-1])
            rec["quality"].append(decode_once(method, target, draft, ids, block, cap, tok.stop_ids, tok.mask_id))
            rec["correct"].append(None if answer is None else check(tok.decode(rec["quality"][-1]["out"]), answer))
        log(f"prompt {i + 1}/{len(prompts)}  tok/s so far: " + ", ".join(
            f"{m}@{b} {statistics.median(r['tok_s']):.0f}" for (m, b), r in records.items()))
    return list(records.values())


def table_rows(records):
    """Rows from measured records: tok/s = median over prompts; speedup against `target` at the same
    block; tokens per target forward over decode forwards only (vanilla target: tokens / (forwards -
    prefill forwards), speculative: tokens / iterations, draft: none); acceptance = accepted / drafted;
    accuracy = % correct among prompts with an answer."""
    tok_s = {(r["method"], r["block"]): statistics.median(r["tok_s"]) for r in records}
    rows = []
    for r in records:
        total = lambda key: sum(s[key] for s in r["stats"])
        spec = "iterations" in r["stats"][0]
        forwards = total("iterations") if spec else total("forwards") - total("prefill_forwards")
        base, mine = tok_s.get(("target", r["block"])), tok_s[r["method"], r["block"]]
        scored = [c for c in r["correct"] if c is not None]
        rows.append({"method": r["method"], "block": r["block"], "tok_s": mine,
                     "speedup": mine / base if base else None,
                     "tokens_per_target_forward": total("tokens") / forwards if spec or r["method"] == "target"
                     else None,
                     "acceptance": total("accepted") / total("drafted") if spec else None,
                     "accuracy": 100 * sum(scored) / len(scored) if scored else None})
    return rows


def notes(records):
    """Per speculative row: where decode time goes (latency protocol), and tokens per target forward and
    acceptance when stopping at EOS (quality protocol), since fixed-length runs go on past the answer."""
    quality = table_rows([{**r, "stats": r["quality"]} for r in records])
    out = []
    for r, q in zip(records, quality):
        if r["method"].startswith("simsd"):
            share = lambda key: sum(s[key] for s in r["stats"]) / sum(s["seconds"] for s in r["stats"])
            out.append(f"{r['method']} at block {r['block']}: {share('draft_seconds'):.0%} of decode time drafting, "
                       f"{share('verify_seconds'):.0%} verifying; stopping at EOS instead (quality protocol): "
                       f"{q['tokens_per_target_forward']:.2f} tokens per target forward, "
                       f"{q['acceptance']:.0%} accepted")
    return out


def show(v, spec, unit=""):
    return "" if v is None else format(v, spec) + unit


def markdown(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|---" + "|--:" * (len(header) - 1) + "|"]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def report(conditions, rows, notes=()):
    """Conditions, the markdown table, notes, then the JSON line: always the last line of stdout."""
    print("\n".join(f"- {k}: {v}" for k, v in conditions.items()) + "\n")
    print(markdown(["method", "block", "tok/s", "speedup", "tokens / target forward", "acceptance", "accuracy"],
                   [[r["method"], r["block"], show(r["tok_s"], ".1f"), show(r["speedup"], ".2f", "x"),
                     show(r["tokens_per_target_forward"], ".2f"), show(r["acceptance"], ".0%"),
                     show(r["accuracy"], ".1f", "%")] for r in rows]))
    print("".join(f"\n{n}" for n in notes))
    rounded = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    print(json.dumps({"device": conditions["device"], "dtype": conditions["dtype"], "rows": rounded}))


def load_pair(target_dir, draft_dir, device, dtype):
    """Target, draft and tokenizer; a sentence instead of a traceback when a folder is wrong."""
    try:
        target, draft = sdar.load(target_dir, device, dtype), sdar.load(draft_dir, device, dtype)
        tok = sdar.load_tokenizer(target_dir)
    except (OSError, ValueError) as e:
        sys.exit(f"bench.py: error: cannot load the checkpoints: {e}")
    if draft.config.vocab_size != target.config.vocab_size:
        sys.exit(f"bench.py: error: --draft {draft_dir} and --model {target_dir} have different vocabularies")
    return target, draft, tok


def read_prompts(path, n):
    """[(prompt, answer or None)] from the first n lines of a JSONL file."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines or any(not isinstance(x, dict) or not isinstance(x.get("prompt"), str) for x in lines):
        sys.exit(f"bench.py: error: {path} must hold one {{\"prompt\": ..., \"answer\": ...}} object per line")
    return [(x["prompt"], None if x.get("answer") is None else str(x["answer"])) for x in lines][:n]


def contains_answer(prediction, answer):
    return answer.strip() in prediction


def table_main(args, device, dtype):
    if args.model is None:
        import train_tiny  # the toy default only; real checkpoints never need it
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the table, then the JSON line
            train_tiny.ensure_trained(quiet=True)
        args.model, args.draft = train_tiny.TARGET_DIR, train_tiny.DRAFT_DIR
        prompts, check, source = train_tiny.examples(args.num_prompts or 48, "heldout"), train_tiny.score, \
            "train_tiny held-out, exact match"
    else:
        prompts, check, source = read_prompts(args.prompts, args.num_prompts), contains_answer, \
            f"{args.prompts}, answer contained in the output"
    target, draft, tok = load_pair(args.model, args.draft, device, dtype)
    blocks = args.blocks or ([target.config.block_size] if target.config.block_size else [4, 8])
    bad = [b for b in blocks if any(m.config.block_size not in (None, b) for m in (target, draft))]
    if bad:
        sys.exit(f"bench.py: error: block {bad[0]} requested but the checkpoints were trained with block "
                 f"{target.config.block_size} (target) and {draft.config.block_size} (draft); pass --blocks")
    # Toy answers are ~27 tokens: 32 fixed tokens time the answer itself, not post-EOS filler on which
    # the models were never trained to agree (at 64, over half the tokens are filler: 57% accepted).
    new, reps = args.new_tokens or (32 if source.startswith("train_tiny") else 128), args.repeats or 1
    records = measure(target, draft, tok, prompts, check, blocks, new, reps, torch.device(device), args.answer_cap)
    params = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.3g}M parameters"
    answered = sum(a is not None for _, a in prompts)
    conditions = {"device": device, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                  "target": f"{args.model} ({params(target)})", "draft": f"{args.draft} ({params(draft)})",
                  "batch": 1, "blocks": blocks, "steps": "one token per step (steps = block), static, greedy",
                  "prompts": f"{len(prompts)} ({source}); {answered} with answers",
                  "latency protocol": f"{new} new tokens, stop tokens ignored, prefill and warm-up excluded, "
                  f"median of {reps} repeats per prompt, then median over prompts: tok/s, speedup, "
                  "tokens per target forward and acceptance (summed over prompts)",
                  "quality protocol": f"greedy, stop at EOS or {args.answer_cap} tokens: accuracy"}
    report(conditions, table_rows(records), notes(records))


# ----------------------------------------------------------------------------- random weights, real shapes

def random_model(config, device, dtype, seed):
    """Random weights of `config`'s shape, built on the meta device and materialised once on `device`
    (an 8B model fits and builds in seconds): normals of std 0.02, norms at 1."""
    with torch.device("meta"):
        m = sdar.Transformer(config).to(dtype)
    m = m.to_empty(device=device).eval()
    if config.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight  # to_empty materialises each module's copy
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)
    return m


def prefilled_cache(m, B, context, device, mask_id):
    cache = m.new_cache(context + B * B + B)
    if context:
        m(torch.randint(0, mask_id, (1, context), device=device), torch.arange(context, device=device),
          masks.block_causal(context, B, device=device), cache)
        cache.commit(context)
    return cache


def time_block(target, draft, B, args, device, mask_id):
    """{forward name: (query tokens, seconds, weight bytes read)} at block B after args.context tokens."""
    ctx, dev = args.context, torch.device(device)
    tcache, dcache = (prefilled_cache(m, B, ctx, device, mask_id) for m in (target, draft))
    blk, full = torch.full((B,), mask_id, device=device), masks.block_causal(B, B, ctx, device)
    pos, d = torch.arange(ctx, ctx + B, device=device), torch.randint(0, mask_id, (B,), device=device)

    def verify(mode):
        ids, p, att, _ = speculative.verify_layout(blk[:0], d, torch.arange(1, B + 1, device=device), ctx, mode,
                                                   mask_id)
        return lambda: target(ids[None], p, att, tcache)

    def iteration():  # B draft steps, one simsd verification, greedy acceptance (its host sync included)
        x, t, p, _ = decode.denoise(draft, blk, ctx, B, cache=dcache, mask_id=mask_id)
        ids, pos2, att, rows = speculative.verify_layout(blk[:0], x, t, ctx, "simsd", mask_id)
        speculative.accept(x, p, decode.distribution(target(ids[None], pos2, att, tcache)[0, rows]), 0.0)

    wt, wd = (sum(p.nbytes for p in m.parameters()) for m in (target, draft))
    runs = {"target denoise step": (B, lambda: target(blk[None], pos, full, tcache), wt),
            "target verify, simsd": (2 * B, verify("simsd"), wt),
            "target verify, exact": (B * B, verify("exact"), wt),
            "draft step": (B, lambda: draft(blk[None], pos, full, dcache), wd),
            "SimSD iteration": (B * (B + 2), iteration, B * wd + wt)}
    out = {}
    for name, (tokens, run, nbytes) in runs.items():
        out[name] = (tokens, median_time(run, args.repeats, 1, dev)[0], nbytes)
        log(f"block {B} {name}: {out[name][1] * 1e3:.2f} ms")
    return out


@torch.inference_mode()
def shapes_main(args, device, dtype):
    names = args.shapes.split(":")
    if len(names) != 2 or any(n not in SHAPES for n in names):
        sys.exit(f"bench.py: error: --shapes takes TARGET:DRAFT with names from {sorted(SHAPES)}")
    target, draft = (random_model(SHAPES[n], device, dtype, seed) for seed, n in enumerate(names))
    mask_id, dev, new = target.config.mask_token_id, torch.device(device), args.new_tokens or 256
    args.repeats = args.repeats or 3
    cuda = dev.type == "cuda"
    bw = args.bandwidth * 1e9 if args.bandwidth else None
    if cuda and bw is None:  # bytes read + written per second by a large device-to-device copy
        a = torch.empty(2 ** 28, device=device)
        bw = 2 * a.nbytes / median_time(lambda: torch.empty_like(a).copy_(a), 5, 1, dev)[0]
    blocks_out, cells = [], []
    for B in args.blocks or [4, 8]:
        timed = time_block(target, draft, B, args, device, mask_id)
        forwards = [{"name": k, "tokens": t, "ms": s * 1e3, "weight_bytes": w,
                     "floor_fraction": w / bw / s if bw else None} for k, (t, s, w) in timed.items()]
        cells += [[B, f["name"], f["tokens"], f"{f['ms']:.2f}", f"{f['weight_bytes'] / 1e9:.3f}",
                   show(f["floor_fraction"], ".0%")] for f in forwards]
        prompt = torch.randint(0, mask_id, (args.context,)).tolist()
        sec, runs = median_time(lambda: decode.generate(target, prompt, new, block=B, mask_id=mask_id)[1],
                                args.repeats, 1, dev)
        blocks_out.append({"block": B, "forwards": forwards, "vanilla_tok_s": runs[-1]["tokens"] / sec,
                           "simsd_tok_s_derived": [k / timed["SimSD iteration"][1] for k in range(1, B + 1)]})
    gpu = torch.cuda.get_device_name(dev) if cuda else None
    print(f"- {gpu or device}, {str(dtype).removeprefix('torch.')}, torch threads: {torch.get_num_threads()}, batch 1, "
          f"{args.context} context tokens prefilled, median of {args.repeats} after one warm-up; an iteration is "
          f"B draft steps + 1 simsd verify (no folded store); vanilla: {new} fixed new tokens via decode.generate\n")
    print(markdown(["block", "forward", "query tokens", "ms", "weight GB", "fraction of the weight-bytes floor"],
                   cells) + "\n")
    print(markdown(["block", "vanilla tok/s", "SimSD tok/s derived for k = 1..B tokens committed per iteration "
                    "(k / iteration time; random weights accept nothing)"],
                   [[b["block"], f"{b['vanilla_tok_s']:.1f}", " / ".join(f"{v:.1f}" for v in b["simsd_tok_s_derived"])]
                    for b in blocks_out]))
    print(json.dumps({"device": device, "dtype": str(dtype).removeprefix("torch."), "gpu": gpu,
                      "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None,
                      "bandwidth_GBps": bw / 1e9 if bw else None, "threads": torch.get_num_threads(),
                      "target": names[0], "draft": names[1], "context": args.context, "new_tokens": new,
                      "batch": 1, "blocks": blocks_out}))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Vanilla SDAR decoding vs SimSD: a table that ends with one JSON line. "
                                "Default: the toy pair of train_tiny.py.")
    p.add_argument("--model", help="target SDAR checkpoint folder (with --draft and --prompts)")
    p.add_argument("--draft", help="draft SDAR checkpoint folder")
    p.add_argument("--prompts", help='JSONL file, one {"prompt": ..., "answer": ...} per line (answer optional)')
    p.add_argument("--num-prompts", type=int, help="prompts to use (default: 48 toy prompts, or every line)")
    p.add_argument("--new-tokens", type=int, help="latency protocol: fixed new tokens (toy 32, checkpoints 128, "
                   "--shapes 256)")
    p.add_argument("--answer-cap", type=int, default=256, help="quality protocol: most new tokens before EOS")
    p.add_argument("--repeats", type=int, help="timed runs per prompt or forward after a warm-up (1; 3 --shapes)")
    p.add_argument("--blocks", type=int, nargs="+", help="block lengths (default: the checkpoint's, else 4 8)")
    p.add_argument("--shapes", help=f"TARGET:DRAFT random-weight models, names from {sorted(SHAPES)}")
    p.add_argument("--context", type=int, default=512, help="--shapes: prefilled context tokens")
    p.add_argument("--bandwidth", type=float, help="--shapes: memory GB/s for the floor (default: measured on CUDA)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, float32")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py: error: --device cuda was asked for but this machine has no CUDA GPU")
    if args.shapes and (args.model or args.draft or args.prompts):
        sys.exit("bench.py: error: --shapes uses random weights; it takes no --model, --draft or --prompts")
    if not args.shapes and not (args.model is None) == (args.draft is None) == (args.prompts is None):
        sys.exit("bench.py: error: real checkpoints need all of --model, --draft and --prompts FILE.jsonl")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    (shapes_main if args.shapes else table_main)(args, device, dtype)


if __name__ == "__main__":
    main()
