"""Our engine against transformers, same model, same process, same run: SmolLM2-135M on this machine.

What it measures (greedy, ignore_eos, the engine's auto dtype: bf16 or fp32, see dtype_choice;
the engine also once per --quantization):

1. Batch-1 decode: one ~16-token prompt, 128 new tokens; output tok/s over the whole call.
   transformers: `model.generate(do_sample=False, max_new_tokens=128, min_new_tokens=128)`, default cache.
2. 32 concurrent requests of 128-token prompts (distinct slices of real text), 128 new tokens each,
   all arriving together: aggregate output tok/s. transformers: one left-padded batch `generate()`.
3. Prefill of a 1,000-token prompt: time to first token (max_tokens=1) on a prompt never seen before,
   for several engine `max_num_batched_tokens` budgets. transformers: `generate(max_new_tokens=1)`.
4. Prefix caching: two ~1,020-token prompts sharing a 1,000-token prefix; time to first token of the
   first (cold) and the second (warm), the speed-up and the engine's `cached_tokens`.
5. Memory: the KV cache allocated at start-up, and process RSS (VmRSS) sampled every 100 requests
   across many short requests (20-token prompts, 8 new tokens, waves of 32): first, last, max, growth.

Contenders run interleaved, rep by rep, after a warm-up, so that load on the machine hits both alike;
the table shows the median of the reps and the ratio (>1 means the engine is faster). Timings are never
asserted. Run it on a quiet machine (check `uptime` first):

    .venv/bin/python benchmarks/engine_vs_transformers.py                # full run, a few minutes
    .venv/bin/python benchmarks/engine_vs_transformers.py --quick        # smoke run, under a minute
    .venv/bin/python benchmarks/engine_vs_transformers.py --quantization none --out results/x.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmaas import LLM, SamplingParams
from llmaas.cpu_info import cpu_model
from llmaas.engine.dtype_choice import resolve_dtype_name
from llmaas.engine.outputs import RequestOutput
from llmaas.models.catalog import resolve_model_dir

MODEL = "smollm2-135m"
DTYPE = resolve_dtype_name("auto")  # bf16 where the CPU computes in it, else fp32
_ttft_ids = itertools.count()

# Original prose, written for this benchmark, so prompts are real English without a download.
# Prompts are token slices of this text repeated end to end; a tag at the start makes each one unique.
TEXT = """\
The harbour town woke before the sun. Fishermen carried nets down the stone steps while the bakers on
the hill pulled the first loaves from their ovens, and the smell of bread drifted over the water to the
boats. Nobody in the town could remember a morning when the tide had been late, and so the whole place
ran on it the way other towns ran on church bells or factory whistles. Children learned to read the
water before they learned to read books.

Mara kept the lighthouse at the end of the northern breakwater. Her father had kept it before her, and
his mother before him, and each of them had written a line in the logbook every night for ninety years:
the weather, the ships that passed, the state of the lamp. Most entries were dull. A few were not. One
winter night in the old handwriting described a ship with no lights at all that sailed straight past the
rocks in a gale and was never seen again, and the next line said only that the lamp had burned well.

Engineers came from the capital one spring to study whether the light could run itself. They brought
instruments in wooden cases, measured the tower, timed the lamp, and asked Mara how many hours she slept.
She answered their questions politely and then asked some of her own: what would happen when a storm
broke the glass, who would climb the stairs when the motor jammed, and who would write in the logbook.
The engineers wrote her questions down carefully, as if they were measurements too.

In the evenings the town gathered in the square to argue about the price of fish, the new road over the
mountains, and whether the young schoolteacher would stay another year. The arguments never settled
anything, which was part of their charm. Old men who had disagreed for forty years still sat at the
same table, and when one of them was ill the other brought him soup and complained about its salt.

Science, the schoolteacher told her pupils, is mostly patience. You look at the same thing many times
and write down what you see, even when it seems that nothing has changed, because one day something
will, and you will only notice if you know exactly how it looked before. The children thought of the
lighthouse logbook, and some of them began to keep their own: the height of the tide, the colour of the
sky at dusk, the number of gulls on the harbour wall. One boy counted the gulls every day for a year.

By autumn the engineers had sent their report. The light could run itself, they wrote, but it should
not be left alone, because machines fail in the ways nobody has thought of yet, and a person who knows
the sea will notice what an instrument cannot. The town read the report aloud in the square, argued
about it for a week, and then went back to the price of fish. Mara wrote one line in the logbook that
night: wind from the west, three ships, the lamp burned well.
"""


# ----------------------------------------------------------------------------------------- machine
def rss_bytes() -> int:
    """This process's resident set size, from /proc (psutil is not a dependency)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_info(argv: list[str]) -> dict:
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *argv]),
        "load_avg_start": list(os.getloadavg()),
    }


def progress(message: str) -> None:
    """To stderr, with the 1-minute load average: ours is ~2 on 2 cores; more means someone else runs."""
    load = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')} load {load:.2f}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- prompts
class PromptMaker:
    """Token-exact prompts from TEXT: a unique tag, then the text from a given offset, cut to length."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stream = tokenizer.encode(TEXT, add_special_tokens=False)
        self.next_tag = 0

    def text_tokens(self, offset: int, length: int) -> list[int]:
        n = len(self.stream)
        return [self.stream[(offset + i) % n] for i in range(length)]

    def fresh(self, length: int, offset: int | None = None) -> list[int]:
        """A prompt of exactly `length` tokens that no earlier prompt shares a first block with."""
        tag = self.tokenizer.encode(f"Note {self.next_tag}.\n", add_special_tokens=False)
        offset = 37 * self.next_tag if offset is None else offset
        self.next_tag += 1
        return (tag + self.text_tokens(offset, length))[:length]


# ------------------------------------------------------------------------------------- contenders
def build_engine(quantization: str, **kwargs) -> LLM:
    """An engine for one --quantization label ("none", "int8"); kwargs are EngineConfig fields."""
    return LLM(MODEL, dtype=DTYPE, quantization=None if quantization == "none" else quantization, **kwargs)


def engine_name(quantization: str) -> str:
    return f"llmaas {DTYPE}" if quantization == "none" else f"llmaas {quantization} weights"


def engine_generate(llm: LLM, prompts: list[list[int]], max_tokens: int):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return llm.generate(prompts, params)


def engine_ttft(llm: LLM, prompt: list[int]) -> tuple[float, RequestOutput]:
    """Seconds from add_request to the first step that returns a token, as a streaming client sees it.

    Asks for 2 tokens and finishes the request untimed: a request that finishes in its prefill step
    (max_tokens=1) does not publish its blocks to the prefix cache, which section 4 relies on.
    """
    engine = llm.engine
    request_id = f"ttft-{next(_ttft_ids)}"
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    first = None
    while True:
        for out in engine.step():
            if out.request_id != request_id:
                continue
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - t0
            if out.finished:
                return first, out


def hf_ttft(model, tokenizer, prompt: list[int]) -> float:
    return seconds_of(lambda: hf_generate(model, tokenizer, [prompt], 1))


def hf_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> torch.Tensor:
    """One left-padded batch; returns only the new tokens."""
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[:, batch["input_ids"].shape[1] :]


def load_transformers(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPE)).eval()
    return model, tokenizer


def seconds_of(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(runs: dict[str, Callable[[int], float]], reps: int) -> dict[str, list[float]]:
    """Warm each contender once, then reps rounds of all of them in turn.

    A run takes the rep index (-1 for the warm-up) and returns the seconds it measured.
    """
    for name, run in runs.items():
        progress(f"  warm-up {name}")
        run(-1)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps):
        for name, run in runs.items():
            dt = run(rep)
            seconds[name].append(dt)
            progress(f"  rep {rep + 1}/{reps} {name}: {dt:.3f}s")
    return seconds


def summary(seconds: list[float], work: float | None = None) -> dict:
    """Median and best time; with `work` (tokens) also tokens per second at the median."""
    med = statistics.median(seconds)
    out = {"seconds": seconds, "median_s": med, "best_s": min(seconds)}
    if work is not None:
        out["tok_per_s"] = work / med
        out["best_tok_per_s"] = work / min(seconds)
    return out


# -------------------------------------------------------------------------------------- benchmarks
def greedy_agreement(ours: list[int], theirs: list[int], eos_ids: set[int]) -> dict:
    """How many leading greedy tokens agree; ignore_eos lets the engine emit EOS where min_new_tokens
    makes transformers pick the runner-up, so a first difference on EOS is not a numerical one."""
    n = min(len(ours), len(theirs))
    first = next((i for i in range(n) if ours[i] != theirs[i]), n)
    return {"matching": first, "of": n, "differs_on_eos": first < n and ours[first] in eos_ids}


def bench_decode_batch1(engines, hf, tok, prompts: PromptMaker, args) -> dict:
    n = args.new_tokens
    progress(f"1. batch-1 decode: 16-token prompt, {n} new tokens")
    prompt = prompts.fresh(16)
    runs = {
        engine_name(q): (lambda rep, llm=llm: seconds_of(lambda: engine_generate(llm, [prompt], n)))
        for q, llm in engines.items()
    }
    runs["transformers"] = lambda rep: seconds_of(lambda: hf_generate(hf, tok, [prompt], n))
    result = {name: summary(s, n) for name, s in interleaved(runs, args.reps).items()}
    theirs = hf_generate(hf, tok, [prompt], n)[0].tolist()
    for q, llm in engines.items():
        ours = engine_generate(llm, [prompt], n)[0].outputs[0].token_ids
        result[engine_name(q)]["greedy"] = greedy_agreement(ours, theirs, llm.engine.eos_token_ids)
    return result


def bench_concurrent(engines, hf, tok, prompts: PromptMaker, args) -> dict:
    """All requests submitted at once; the warm-up is the same batch with 8 new tokens."""
    c, p, n = args.concurrency, args.concurrent_prompt_tokens, args.new_tokens
    progress(f"2. {c} concurrent requests: {p}-token prompts, {n} new tokens each")
    batch = [prompts.fresh(p, offset=53 * i) for i in range(c)]
    new_tokens = lambda rep: n if rep >= 0 else 8

    def engine_run(rep: int, llm: LLM) -> float:
        t0 = time.perf_counter()
        outs = engine_generate(llm, batch, new_tokens(rep))
        dt = time.perf_counter() - t0
        assert sum(o.completion_tokens for o in outs) == c * new_tokens(rep)
        return dt

    runs = {engine_name(q): (lambda rep, llm=llm: engine_run(rep, llm)) for q, llm in engines.items()}
    runs["transformers"] = lambda rep: seconds_of(lambda: hf_generate(hf, tok, batch, new_tokens(rep)))
    return {name: summary(s, c * n) for name, s in interleaved(runs, args.reps).items()}


def bench_prefill(engines, hf, tok, prompts: PromptMaker, args) -> dict:
    """TTFT of a fresh prompt every time, so nothing comes from the prefix cache."""
    p = args.prefill_tokens
    progress(f"3. prefill: {p}-token prompt, time to first token; budgets {args.prefill_budgets}")
    runs, cached = {}, {}
    for q, llm in engines.items():
        for budget in args.prefill_budgets:
            target = llm
            if budget != llm.engine.config.max_num_batched_tokens:
                progress(f"  building {engine_name(q)} with max_num_batched_tokens={budget}")
                target = build_engine(q, max_num_batched_tokens=budget, kv_cache_memory=64 * 2**20)
            name = f"{engine_name(q)}, max_num_batched_tokens={budget}"

            def run(rep: int, llm: LLM = target, name: str = name) -> float:
                dt, out = engine_ttft(llm, prompts.fresh(p))
                cached[name] = max(cached.get(name, 0), out.cached_tokens)
                return dt

            runs[name] = run
    runs["transformers"] = lambda rep: hf_ttft(hf, tok, prompts.fresh(p))
    result = {name: summary(s) for name, s in interleaved(runs, args.reps).items()}
    for name, most in cached.items():
        result[name]["max_cached_tokens"] = most
    del runs
    gc.collect()  # the extra engines
    return result


def bench_prefix_cache(engines, hf, tok, prompts: PromptMaker, args) -> dict:
    """Per rep: transformers on a fresh prompt of the full length, then for each engine a new shared
    prefix and two prompts that differ only in their last tokens (cold, then warm)."""
    p, s = args.prefill_tokens, args.suffix_tokens
    progress(f"4. prefix caching: {p}-token shared prefix + {s}-token distinct suffixes")
    hf_seconds: list[float] = []
    ours = {q: {"cold": [], "warm": [], "cached_tokens_cold_warm": []} for q in engines}
    for rep in range(-1, args.reps):  # rep -1 is the warm-up
        dt = hf_ttft(hf, tok, prompts.fresh(p + s))
        if rep >= 0:
            hf_seconds.append(dt)
        for q, llm in engines.items():
            prefix = prompts.fresh(p)
            dt_cold, out_cold = engine_ttft(llm, prefix + prompts.text_tokens(11, s))
            dt_warm, out_warm = engine_ttft(llm, prefix + prompts.text_tokens(401, s))
            which = f"rep {rep + 1}/{args.reps}" if rep >= 0 else "warm-up"
            progress(
                f"  {which} {engine_name(q)}: cold {dt_cold:.3f}s, "
                f"warm {dt_warm:.3f}s, cached_tokens {out_cold.cached_tokens} then "
                f"{out_warm.cached_tokens}; transformers {dt:.3f}s"
            )
            if rep >= 0:
                ours[q]["cold"].append(dt_cold)
                ours[q]["warm"].append(dt_warm)
                ours[q]["cached_tokens_cold_warm"].append((out_cold.cached_tokens, out_warm.cached_tokens))
    result: dict = {"transformers": summary(hf_seconds)}
    for q, r in ours.items():
        cold, warm = summary(r["cold"]), summary(r["warm"])
        result[engine_name(q)] = {
            "prompt_tokens": p + s,
            "cold": cold,
            "warm": warm,
            "cached_tokens_cold_warm": r["cached_tokens_cold_warm"],
            "speedup": cold["median_s"] / warm["median_s"],
        }
    return result


def bench_memory(llm: LLM, prompts: PromptMaker, args) -> dict:
    total, wave, n = args.memory_requests, 32, 8
    progress(f"5. memory: {total} requests of 20-token prompts, {n} new tokens, waves of {wave}")
    samples = [(0, rss_bytes())]
    done = 0
    t0 = time.perf_counter()
    while done < total:
        size = min(wave, total - done)
        outs = engine_generate(llm, [prompts.fresh(20) for _ in range(size)], n)
        assert all(o.completion_tokens == n for o in outs)
        before, done = done, done + size
        if done // 100 > before // 100 or done == total:
            samples.append((done, rss_bytes()))
            progress(f"  {done} requests: RSS {samples[-1][1] / 2**20:.1f} MiB")
    rss = [r for _, r in samples[1:]]
    runner = llm.engine.runner
    return {
        "kv_cache_bytes": runner.kv_cache_bytes,
        "kv_blocks": runner.num_blocks,
        "block_size": runner.block_size,
        "requests": total,
        "seconds": time.perf_counter() - t0,
        "rss_samples": samples,
        "rss_before": samples[0][1],
        "rss_first": rss[0],
        "rss_last": rss[-1],
        "rss_max": max(rss),
        "rss_growth": rss[-1] - rss[0],
    }


# -------------------------------------------------------------------------------------------- table
def ratio(ours: float, peer: float, higher_is_better: bool) -> str:
    return f"{(ours / peer if higher_is_better else peer / ours):.2f}x"


def greedy_note(g: dict) -> str:
    note = f"greedy = transformers for {g['matching']}/{g['of']} tokens"
    return note + (", then EOS" if g["differs_on_eos"] else "")


def table_rows(results: dict, args) -> list[tuple[str, str, str, str, str]]:
    rows = []
    d = results["decode_batch1"]
    hf = d["transformers"]["tok_per_s"]
    for name, r in d.items():
        if name != "transformers":
            rows.append(
                (
                    f"Batch-1 decode, {name} (tok/s, 16+{args.new_tokens}; {greedy_note(r['greedy'])})",
                    f"{r['tok_per_s']:.1f}",
                    "transformers",
                    f"{hf:.1f}",
                    ratio(r["tok_per_s"], hf, True),
                )
            )
    c = results["concurrent"]
    hf = c["transformers"]["tok_per_s"]
    for name, r in c.items():
        if name != "transformers":
            rows.append(
                (
                    f"{args.concurrency} concurrent, {name} (output tok/s, "
                    f"{args.concurrent_prompt_tokens}+{args.new_tokens} each)",
                    f"{r['tok_per_s']:.1f}",
                    "transformers padded batch",
                    f"{hf:.1f}",
                    ratio(r["tok_per_s"], hf, True),
                )
            )
    pf = results["prefill"]
    hf = pf["transformers"]["median_s"]
    for name, r in pf.items():
        if name != "transformers":
            rows.append(
                (
                    f"Prefill {args.prefill_tokens} tokens, {name} (TTFT s)",
                    f"{r['median_s']:.3f}",
                    "transformers",
                    f"{hf:.3f}",
                    ratio(r["median_s"], hf, False),
                )
            )
    pc = results["prefix_cache"]
    hf = pc["transformers"]["median_s"]
    for name, r in pc.items():
        if name == "transformers":
            continue
        cold, warm = r["cold"]["median_s"], r["warm"]["median_s"]
        cached = r["cached_tokens_cold_warm"][-1]
        rows.append(
            (
                f"Prefix cache cold, {name} (TTFT s, {r['prompt_tokens']} tokens, cached {cached[0]})",
                f"{cold:.3f}",
                "transformers",
                f"{hf:.3f}",
                ratio(cold, hf, False),
            )
        )
        rows.append(
            (
                f"Prefix cache warm, {name} (TTFT s, cached {cached[1]} of {r['prompt_tokens']})",
                f"{warm:.3f}",
                "llmaas cold",
                f"{cold:.3f}",
                ratio(warm, cold, False),
            )
        )
    return rows


def markdown(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def memory_table(mem: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    title = f"Memory, {engine_name(mem['engine'])}: {mem['requests']} requests of 20+8 tokens in waves of 32"
    rows = [
        (
            "KV cache (allocated at start-up)",
            f"{mib(mem['kv_cache_bytes'])}: {mem['kv_blocks']} blocks x {mem['block_size']} tokens",
        ),
        ("RSS before the first request", mib(mem["rss_before"])),
        ("RSS after 100 requests (first sample)", mib(mem["rss_first"])),
        (
            f"RSS after {mem['requests']} requests (last sample) / max",
            f"{mib(mem['rss_last'])} / {mib(mem['rss_max'])}",
        ),
        ("RSS growth, first sample to last", mib(mem["rss_growth"])),
        ("(RSS includes transformers and the other engines loaded earlier in this process)", ""),
    ]
    return markdown(rows, (title, "Value"))


def report(results: dict, args) -> str:
    m = results["machine"]
    mem = results.get("memory")
    parts = [
        f"## llmaas engine vs transformers — {MODEL}, {DTYPE}",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}",
        f"- torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}",
        f"- date: {m['date']}; load average at start {m['load_avg_start'][0]:.2f}, "
        f"at end {m['load_avg_end'][0]:.2f}",
        f"- command: `{m['command']}`",
        f"- median of {args.reps} rep(s) after a warm-up, contenders interleaved; ratio > 1: llmaas faster",
        "",
        markdown(table_rows(results, args), ("Measure", "llmaas", "Peer", "Peer value", "Ratio")),
    ]
    if mem:
        parts += ["", memory_table(mem)]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 1 rep, 32 new tokens, 100 memory requests"
    )
    ap.add_argument("--out", default="results/engine_bench.json", help="where to write the JSON results")
    ap.add_argument("--quantization", default="none,int8", help="engine variants, comma separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--concurrent-prompt-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=1000)
    ap.add_argument("--suffix-tokens", type=int, default=20)
    ap.add_argument("--prefill-budgets", default="512,1024,2048", help="engine max_num_batched_tokens to try")
    ap.add_argument("--memory-requests", type=int, default=1000)
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.new_tokens, args.memory_requests = 1, 32, 100
    args.quantizations = [q.strip() for q in args.quantization.split(",") if q.strip()]
    args.prefill_budgets = [int(b) for b in args.prefill_budgets.split(",")]
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    results: dict = {
        "machine": machine_info([sys.argv[0], *argv]),
        "model": MODEL,
        "dtype": DTYPE,
        "args": {k: v for k, v in vars(args).items()},
    }
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        progress("WARNING: the machine is busy before we start; timings will be noisy")
    progress(f"loading transformers and llmaas ({', '.join(args.quantizations)})")
    hf, tok = load_transformers(resolve_model_dir(MODEL))
    engines = {q: build_engine(q) for q in args.quantizations}
    prompts = PromptMaker(tok)
    results["decode_batch1"] = bench_decode_batch1(engines, hf, tok, prompts, args)
    results["concurrent"] = bench_concurrent(engines, hf, tok, prompts, args)
    results["prefill"] = bench_prefill(engines, hf, tok, prompts, args)
    results["prefix_cache"] = bench_prefix_cache(engines, hf, tok, prompts, args)
    first = args.quantizations[0]
    del hf
    for q in args.quantizations[1:]:
        del engines[q]
    gc.collect()
    results["memory"] = bench_memory(engines[first], prompts, args) | {"engine": first}
    results["machine"]["load_avg_end"] = list(os.getloadavg())
    text = report(results, args)
    print(text)
    results["table_markdown"] = text
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    progress(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
