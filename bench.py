"""Decoding methods side by side: one markdown table per task, a headline per task, then one JSON line.

    python bench.py                                             # the toy models (trained first if missing)
    python bench.py --model T --draft D --prompts p.jsonl       # checkpoints: an SDAR or a Qwen3 target
    python bench.py --shapes sdar-8b:sdar-1.7b                  # random weights of real shapes: forward timings

Rows. The target alone: `target` (static: the scheduled position per step) and `target-dyn0.9`,
`target-dyn0.7` (dynamic: also every position above the threshold), the strongest things a block-
diffusion target does alone; `draft` alone. SimSD: `simsd` (static drafting, draft-step-order
acceptance), `simsd-position` (the paper's position-order acceptance), `simsd-dyn0.9` (dynamic drafting),
`simsd-exact` (exact verification: the target's own decisions along the draft's order). An
autoregressive target: `ar` alone and
`specdiff` (the diffusion draft proposing to it). Greedy rows on every task; temperature-1 rows on the
tasks scored by validity, where sampling can be right.

Two protocols, never mixed. Latency: a fixed number of new tokens, stop tokens ignored, prefill and
warm-up excluded, the median over --repeats per prompt, then the median over prompts: tok/s, speedup
(against `target` at the same block and temperature; `specdiff` against `ar`), tokens per target forward,
acceptance, the share of decode time spent drafting. Quality: stop at EOS or --answer-cap: accuracy.
The headline is honest: the fastest target-alone row within 1 point of the static target's accuracy, and
SimSD's best ratio against it among SimSD rows within that point too.
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

DYN = lambda threshold: dict(strategy="dynamic", threshold=threshold)  # noqa: E731
METHODS = {"target": ("target", {}), "target-dyn0.9": ("target", DYN(0.9)), "target-dyn0.7": ("target", DYN(0.7)),
           "draft": ("draft", {}), "simsd": ("simsd", {}), "simsd-position": ("simsd", dict(accept="position")),
           "simsd-dyn0.9": ("simsd", DYN(0.9)), "simsd-exact": ("simsd", dict(verify="exact")),
           "ar": ("ar", {}), "specdiff": ("specdiff", {})}
ALONE = ("target", "target-dyn0.9", "target-dyn0.7")
TINY = sdar.Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, mask_token_id=511)
SHAPES = {**sdar.PRESETS, "tiny": TINY}


def fail(message):
    print(f"bench.py: error: {message}", file=sys.stderr)
    sys.exit(2)


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

def decode_once(method, models, ids, block, new_tokens, temperature, stop_ids, mask_id, seed):
    """One decode by `method`: its stats, plus the new tokens under "out"."""
    kind, options = METHODS[method]
    gen = torch.Generator(decode.device_of(models["draft"])).manual_seed(seed)
    common = dict(temperature=temperature, stop_ids=stop_ids, generator=gen)
    if kind == "ar":
        out, stats = decode.generate_ar(models["ar"], ids, new_tokens, **common)
    elif kind in ("target", "draft"):
        out, stats = decode.generate(models[kind], ids, new_tokens, block=block, mask_id=mask_id, **options, **common)
    else:
        target = models["ar" if kind == "specdiff" else "target"]
        out, stats = speculative.generate(target, models["draft"], ids, new_tokens, block=block, mask_id=mask_id,
                                          **options, **common)
    return {**stats, "out": out}


def configs(tasks, methods, blocks, temperatures, sampled):
    """(task, method, block, temperature) to run: `ar` has no block; sampling only on `sampled` tasks."""
    return [(task, m, None if m == "ar" else b, t) for task in tasks for t in temperatures
            if t == 0 or task in sampled for b in blocks for m in methods if m != "ar" or b == blocks[0]]


def measure(models, tok, tasks, check, keys, new_tokens, repeats, device, cap):
    """Every configuration on every prompt of its task (with that task's models), prompt by prompt, so drift
    hits all alike. One record per configuration with lists over prompts: tok_s and stats (latency), quality
    and correct (None: no answer)."""
    records = {k: {"task": k[0], "method": k[1], "block": k[2], "temperature": k[3], "tok_s": [], "stats": [],
                   "quality": [], "correct": []} for k in keys}
    for task, prompts in tasks.items():
        mine = [k for k in keys if k[0] == task]
        for i, (text, answer) in enumerate(prompts):
            ids = tok.chat(text)
            for key in mine:
                rec, (_, method, block, temperature) = records[key], key
                run = lambda: decode_once(method, models[task], ids, block, new_tokens, temperature, (), tok.mask_id, i)
                sec, runs = median_time(run, repeats, int(not rec["tok_s"]), device)  # warm up once per row
                rec["tok_s"].append(runs[-1]["tokens"] / sec)
                rec["stats"].append(runs[-1])
                rec["quality"].append(decode_once(method, models[task], ids, block, cap, temperature, tok.stop_ids,
                                                  tok.mask_id, i))
                rec["correct"].append(None if answer is None else check(text, tok.decode(rec["quality"][-1]["out"]),
                                                                       answer))
            log(f"{task} prompt {i + 1}/{len(prompts)}")
    return list(records.values())


def table_rows(records):
    """Rows from records: tok/s = median over prompts; speedup against `target` at the same task, block and
    temperature (`specdiff` against `ar`); tokens per target forward over decode forwards only (vanilla:
    tokens / (forwards - prefill forwards), speculative: tokens / iterations, draft: none); acceptance =
    accepted / drafted; drafting = the share of speculative decode time spent drafting; accuracy = % correct
    among prompts with an answer; and tokens per target forward and acceptance under the quality protocol."""
    tok_s = {(r["task"], r["method"], r["block"], r["temperature"]): statistics.median(r["tok_s"]) for r in records}
    rows = []
    for r in records:
        def ratios(stats):
            total = lambda key: sum(s[key] for s in stats)  # noqa: E731
            spec = "iterations" in stats[0]
            forwards = total("iterations") if spec else total("forwards") - total("prefill_forwards")
            return (total("tokens") / max(forwards, 1) if r["method"] != "draft" else None,
                    total("accepted") / max(total("drafted"), 1) if spec else None,
                    total("draft_seconds") / total("seconds") if spec else None)
        base = ("ar", None) if r["method"] in ("ar", "specdiff") else ("target", r["block"])
        base = tok_s.get((r["task"], *base, r["temperature"]))
        mine = tok_s[r["task"], r["method"], r["block"], r["temperature"]]
        scored = [c for c in r["correct"] if c is not None]
        (tpf, acc, share), (qtpf, qacc, _) = ratios(r["stats"]), ratios(r["quality"])
        rows.append({"task": r["task"], "method": r["method"], "block": r["block"], "temperature": r["temperature"],
                     "tok_s": mine, "speedup": mine / base if base else None, "tokens_per_target_forward": tpf,
                     "acceptance": acc, "drafting": share, "accuracy": 100 * sum(scored) / len(scored) if scored
                     else None, "quality_tokens_per_target_forward": qtpf, "quality_acceptance": qacc})
    return rows


def headlines(rows):
    """Per task, block and temperature: the fastest target alone within 1 point of static accuracy, and
    SimSD's best ratio against it among SimSD rows within that point; SpecDiff's ratio against `ar`."""
    lines = []
    for task, block, temp in dict.fromkeys((r["task"], r["block"], r["temperature"]) for r in rows):
        group = {r["method"]: r for r in rows if (r["task"], r["block"], r["temperature"]) == (task, block, temp)}
        where = f"{task}, block {block}, {'greedy' if temp == 0 else f'temperature {temp:g}'}"
        if "specdiff" in group and group["specdiff"]["speedup"] is not None:
            lines.append(f"{where}: specdiff {group['specdiff']['speedup']:.2f}x ar")
        static = group.get("target")
        if static is None or static["accuracy"] is None:
            continue
        near = lambda r: r["accuracy"] is not None and r["accuracy"] >= static["accuracy"] - 1  # noqa: E731
        best = max((group[m] for m in ALONE if m in group and near(group[m])), key=lambda r: r["tok_s"])
        line = (f"{where}: fastest target alone within 1 point of static accuracy ({static['accuracy']:.1f}%) is "
                f"{best['method']} at {best['tok_s']:.0f} tok/s ({best['accuracy']:.1f}%)")
        spec = [r for m, r in group.items() if m.startswith("simsd")]
        good = [r for r in spec if near(r)]
        if good:
            top = max(good, key=lambda r: r["tok_s"])
            line += f"; SimSD's best within that point: {top['method']} at {top['tok_s'] / best['tok_s']:.2f}x of it"
        elif spec:
            top = max(spec, key=lambda r: r["tok_s"])
            line += (f"; no SimSD row is within that point (the fastest, {top['method']}, runs at "
                     f"{top['tok_s'] / best['tok_s']:.2f}x of it with {top['accuracy']:.1f}%)")
        lines.append(line)
    return lines


def show(v, spec, unit=""):
    return "" if v is None else format(v, spec) + unit


def markdown(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|---" + "|--:" * (len(header) - 1) + "|"]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def report(conditions, rows):
    """Conditions, a table per task, the headlines, then the JSON line: always the last line of stdout."""
    print("\n".join(f"- {k}: {v}" for k, v in conditions.items()))
    header = ["method", "block", "temp", "tok/s", "speedup", "tokens / target forward", "at EOS", "acceptance",
              "drafting", "accuracy"]
    for task in dict.fromkeys(r["task"] for r in rows):
        print(f"\n{task}:\n")
        print(markdown(header, [[r["method"], show(r["block"], "d"), f"{r['temperature']:g}", show(r["tok_s"], ".1f"),
                                 show(r["speedup"], ".2f", "x"), show(r["tokens_per_target_forward"], ".2f"),
                                 show(r["quality_tokens_per_target_forward"], ".2f"), show(r["acceptance"], ".0%"),
                                 show(r["drafting"], ".0%"),
                                 show(r["accuracy"], ".1f", "%")] for r in rows if r["task"] == task]))
    print("\n" + "\n".join(headlines(rows)))
    rounded = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    print(json.dumps({"device": conditions["device"], "dtype": conditions["dtype"], "rows": rounded}))


def load_models(paths, device, dtype):
    """{"target" or "ar": the --model, "draft": the --draft, "ar": an extra AR target} and the draft's
    tokenizer, each pair checked; sentences, not tracebacks."""
    try:
        models = {name: sdar.load(path, device, dtype) for name, path in paths.items()}
        toks = {name: sdar.load_tokenizer(path) for name, path in paths.items()}
    except (OSError, ValueError) as e:
        fail(f"cannot load the checkpoints: {e}")
    for name in ("model", "ar") if "ar" in paths else ("model",):  # the toys add an AR target
        try:
            speculative.check_pair(models[name], models["draft"], toks[name], toks["draft"])
        except ValueError as e:
            fail(f"--draft {paths['draft']} with {paths[name]}: {e}")
    target = models.pop("model")
    models[{"sdar": "target", "qwen3": "ar"}[target.config.model_type]] = target
    return models, toks["draft"]


def read_prompts(path, n):
    """[(prompt, answer or None)] from the first n lines of a JSONL file."""
    try:
        lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"--prompts {path} cannot be read as JSONL ({e}); give one JSON object per line")
    if not lines or any(not isinstance(x, dict) or not isinstance(x.get("prompt"), str) for x in lines):
        fail(f'--prompts {path} must hold one {{"prompt": ..., "answer": ...}} object per line')
    return [(x["prompt"], None if x.get("answer") is None else str(x["answer"])) for x in lines][:n]


def contains_answer(prompt, prediction, answer):
    return answer.strip() in prediction


def table_main(args, device, dtype):
    if args.model is None:
        import train_tiny  # the toy default only; real checkpoints never need it
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the table, then the JSON line
            train_tiny.ensure_trained(quiet=True)
        jobs = {t: (dict(zip(("model", "draft"), train_tiny.pair(t)), ar=train_tiny.AR_DIR),
                    train_tiny.examples(args.num_prompts or 48, "heldout", task=t)) for t in args.tasks or train_tiny.TASKS}
        check, source = train_tiny.score, "train_tiny held-out prompts; sort by exact match, walk by validity"
        sampled = [t for t in jobs if t != "sort"]  # a sorted list has one right answer: greedy only
    else:
        jobs = {"prompts": ({"model": args.model, "draft": args.draft}, read_prompts(args.prompts, args.num_prompts))}
        check, source, sampled = contains_answer, f"{args.prompts}, answer contained in the output", ["prompts"]
    models, keys = {}, []
    for task, (paths, prompts) in jobs.items():
        models[task], tok = load_models(paths, device, dtype)
        have = {"target": "target" in models[task], "draft": True, "simsd": "target" in models[task],
                "ar": "ar" in models[task], "specdiff": "ar" in models[task]}
        trained = models[task]["draft"].config.block_size
        blocks = args.blocks or ([trained] if trained else [4, 8])
        if trained and any(b != trained for b in blocks):
            fail(f"block {next(b for b in blocks if b != trained)} requested but the draft was trained with block "
                 f"{trained}; block 8 needs the -b8 checkpoints")
        kind, rule = lambda m: METHODS[m][0], lambda m: METHODS[m][1].get("accept", "step")  # noqa: E731
        keys += configs([task], [m for m in args.methods or METHODS if have[kind(m)] and (
            not args.accept or kind(m) != "simsd" or rule(m) == args.accept)], blocks, args.temperatures or [0.0, 1.0],
            sampled)
    # Toy answers are 21-36 tokens: 32 fixed tokens time the answer itself, not post-EOS filler on which the
    # models were never trained to agree.
    new, reps = args.new_tokens or (32 if args.prompts is None else 128), args.repeats or 1
    tasks = {task: prompts for task, (_, prompts) in jobs.items()}
    records = measure(models, tok, tasks, check, keys, new, reps, torch.device(device), args.answer_cap)
    params = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.3g}M"  # noqa: E731
    conditions = {"device": device, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                  "models": "; ".join(f"{t}: " + ", ".join(f"{k} {params(m)} parameters" for k, m in ms.items())
                                      for t, ms in models.items()),
                  "folders": "; ".join(f"{t}: " + ", ".join(map(str, paths.values())) for t, (paths, _) in jobs.items()),
                  "batch": 1, "steps": "one position per step (steps = block)",
                  "prompts": f"{', '.join(f'{len(p)} {t}' for t, p in tasks.items())} ({source})",
                  "latency protocol": f"{new} new tokens, stop tokens ignored, prefill and warm-up excluded, "
                  f"median of {reps} repeats per prompt, then median over prompts",
                  "quality protocol": f"stop at EOS or {args.answer_cap} tokens: accuracy",
                  "sampling": "temperature 1, seeded per prompt; rows with temp 0 are greedy"}
    report(conditions, table_rows(records))


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


def time_block(target, draft, B, args, device, mask_id):
    """{forward name: (query tokens, seconds, weight bytes read)} at block B after args.context tokens."""
    ctx, dev = args.context, torch.device(device)
    tcache, dcache = (m.new_cache(ctx + B * B + B) for m in (target, draft))
    for m, cache in ((target, tcache), (draft, dcache)):
        decode.prefill(m, torch.randint(0, mask_id, (ctx,), device=device), cache, B)
    blk, full = torch.full((B,), mask_id, device=device), masks.block_causal(B, B, ctx, device)
    pos, d = torch.arange(ctx, ctx + B, device=device), torch.randint(0, mask_id, (B,), device=device)
    none = pos[:0]

    def verify(mode):
        ids, p, att, _ = speculative.verify_layout(none, none, d, pos, torch.arange(1, B + 1, device=device), mode,
                                                   mask_id)
        return lambda: target(ids[None], p, att, tcache)

    def iteration():  # B draft steps, one simsd verification, greedy acceptance (its host sync included)
        x, t, p, _ = decode.denoise(draft, blk, ctx, B, cache=dcache, mask_id=mask_id)
        q = speculative.verify_block(target, tcache, none, [mask_id] * B, [False] * B, x, t, ctx, "simsd", mask_id,
                                     dict(temperature=0.0, top_k=0, top_p=1.0))
        speculative.acceptance(x, p, q, t, 0.0)

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
        fail(f"--shapes takes TARGET:DRAFT with names from {', '.join(sorted(SHAPES))}")
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
    p = argparse.ArgumentParser(description="Decoding methods side by side: a table per task that ends with one JSON "
                                "line. Default: the toy models of train_tiny.py.")
    add = p.add_argument
    add("--model", help="target checkpoint folder, SDAR or Qwen3 (with --draft and --prompts)")
    add("--draft", help="draft SDAR checkpoint folder")
    add("--prompts", help='JSONL file, one {"prompt": ..., "answer": ...} per line (answer optional)')
    add("--num-prompts", type=int, help="prompts per task (default: 48 toy prompts per task, or every line)")
    add("--tasks", nargs="+", help="toy tasks to run (default: all of train_tiny.TASKS)")
    add("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
        help=f"rows to run, from {', '.join(METHODS)} (default: all)")
    add("--accept", choices=["step", "position"], help="only the SimSD rows that accept by this rule: step (simsd, "
        "simsd-dyn0.9, simsd-exact) or position (simsd-position); default: both")
    add("--temperatures", type=float, nargs="+", help="0 = greedy; sampling rows only on validity-scored tasks "
        "(default: 0 1)")
    add("--new-tokens", type=int, help="latency protocol: fixed new tokens (default: toys 32, checkpoints 128, "
        "--shapes 256)")
    add("--answer-cap", type=int, default=256, help="quality protocol: most new tokens before EOS (default 256)")
    add("--repeats", type=int, help="timed runs per prompt or forward after a warm-up (default 1; --shapes 3)")
    add("--blocks", type=int, nargs="+", help="block lengths (default: the checkpoint's, else 4 8)")
    add("--shapes", help=f"TARGET:DRAFT random-weight models, names from {', '.join(sorted(SHAPES))}")
    add("--context", type=int, default=512, help="--shapes: prefilled context tokens (default 512)")
    add("--bandwidth", type=float, help="--shapes: memory GB/s for the floor (default: measured on CUDA)")
    add("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, else float32")
    add("--threads", type=int, help="CPU threads (default: torch's)")
    return p.parse_args(argv)


def check_args(args):
    """Every numeric option in range, every combination meaningful: a sentence and exit 2 otherwise."""
    for flag, values, low in (("--num-prompts", [args.num_prompts], 1), ("--new-tokens", [args.new_tokens], 1),
                              ("--answer-cap", [args.answer_cap], 1), ("--repeats", [args.repeats], 1),
                              ("--blocks", args.blocks or [], 1), ("--context", [args.context], 0),
                              ("--threads", [args.threads], 1), ("--bandwidth", [args.bandwidth], 1e-9),
                              ("--temperatures", args.temperatures or [], 0)):
        for v in values:
            if v is not None and not v >= low:
                fail(f"{flag} must be {'an integer ' if isinstance(v, int) else ''}>= {low:g}; got {v}")
    if args.shapes and (args.model or args.draft or args.prompts):
        fail("--shapes uses random weights; it takes no --model, --draft or --prompts")
    if not args.shapes and not (args.model is None) == (args.draft is None) == (args.prompts is None):
        fail("checkpoints need all of --model, --draft and --prompts FILE.jsonl")
    if args.tasks and (args.model or args.shapes):
        fail("--tasks selects toy tasks; checkpoints take --prompts")
    if args.tasks:
        import train_tiny
        unknown = [t for t in args.tasks if t not in train_tiny.TASKS]
        if unknown:
            fail(f"--tasks {unknown[0]} is not a toy task; choose from {', '.join(train_tiny.TASKS)}")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but this machine has no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    (shapes_main if args.shapes else table_main)(args, device, dtype)


if __name__ == "__main__":
    main()
