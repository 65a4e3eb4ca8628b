"""Constrained decoding at the engine level: what a JSON schema costs next to unconstrained decoding.

Same model (SmolLM2-135M, the engine's auto dtype), same prompts, same run, through `llmaas.LLM`:

1. Decode throughput, batch 1 and batch 16: output tok/s of unconstrained decoding (ignore_eos) against
   the same requests held to a JSON schema (a list of people objects: strings, integers, enums, nested
   arrays; minItems keeps it from completing, so both sides decode the same number of tokens).
2. A new schema: the compile time (GrammarCompiler.compile, cache miss) of fresh schemas, and the time
   to first token of a 1-token request with a never-seen schema against the same request unconstrained.

Contenders run interleaved, rep by rep, after a warm-up; the tables show medians and ratios. Timings
are never asserted. The issue's targets: overhead at most 10% at batch 1, 15% at 16; a new schema adds
at most 50 ms.

On a machine shared with other work, set OMP_WAIT_POLICY=PASSIVE (llmaas/openmp_defaults.py).

    .venv/bin/python benchmarks/structured_engine.py            # a few minutes
    .venv/bin/python benchmarks/structured_engine.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

from llmaas import LLM, SamplingParams
from llmaas.cpu_info import cpu_model
from llmaas.engine.dtype_choice import resolve_dtype_name
from llmaas.engine.structured import StructuredOutput

MODEL = "smollm2-135m"

PEOPLE = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 50,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "city": {"type": "string"},
                    "role": {"enum": ["engineer", "teacher", "doctor", "artist", "farmer"]},
                    "skills": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                },
                "required": ["name", "age", "city", "role", "skills"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}

TOPICS = [
    "a small fishing village",
    "a busy hospital",
    "a mountain school",
    "a software company",
    "an art studio",
    "a farm in spring",
    "a railway station",
    "a city library",
]


def prompts(llm: LLM, n: int) -> list[str]:
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        message = f"List the people of {topic} (#{i}) as JSON: name, age, city, role and skills."
        out.append(llm.tokenizer.apply_chat_template([{"role": "user", "content": message}]))
    return out


def throughput(llm: LLM, batch: list[str], max_tokens: int, structured: StructuredOutput | None) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, structured=structured)
    t0 = time.perf_counter()
    outs = llm.generate(batch, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    assert tokens == len(batch) * max_tokens, "a request ended early: the comparison would be unfair"
    return tokens / elapsed


def fresh_schema(i: int) -> StructuredOutput:
    schema = json.loads(json.dumps(PEOPLE))
    schema["properties"]["people"]["items"]["properties"][f"field_{i}"] = {"type": "string"}
    schema["properties"]["people"]["minItems"] = 1
    return StructuredOutput("json_schema", json.dumps(schema, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    llm = LLM(MODEL)
    so = StructuredOutput("json_schema", json.dumps(PEOPLE, sort_keys=True))
    results: dict = {
        "model": MODEL,
        "dtype": resolve_dtype_name("auto"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "throughput": {},
    }
    print(f"{MODEL} ({results['dtype']}) on {results['cpu']}, {results['cores']} cores")

    for batch_size, max_tokens in ((1, 32 if args.quick else 128), (16, 16 if args.quick else 64)):
        batch = prompts(llm, batch_size)
        throughput(llm, batch[:2], 8, so)  # warm-up: kernels, the grammar, the mask thread
        runs: dict[str, list[float]] = {"unconstrained": [], "JSON schema": []}
        for _ in range(reps):
            runs["unconstrained"].append(throughput(llm, batch, max_tokens, None))
            runs["JSON schema"].append(throughput(llm, batch, max_tokens, so))
        base = statistics.median(runs["unconstrained"])
        print(f"\nbatch {batch_size}, {max_tokens} new tokens each, median of {reps}:")
        print(f"  {'':24} {'tok/s':>8} {'vs unconstrained':>17}")
        table = {}
        for name, values in runs.items():
            value = statistics.median(values)
            table[name] = {"tok_s": round(value, 1), "ratio": round(value / base, 3), "reps": values}
            print(f"  {name:24} {value:8.1f} {value / base:16.3f}x")
        results["throughput"][f"batch_{batch_size}"] = table

    n_new = 5 if args.quick else 20
    compile_ms = []
    for i in range(n_new):
        t0 = time.perf_counter()
        llm.engine.grammars.compile(fresh_schema(1000 + i))
        compile_ms.append((time.perf_counter() - t0) * 1e3)
    ttft_new, ttft_plain = [], []
    batch = prompts(llm, 1)
    for i in range(n_new):
        for structured, sink in ((None, ttft_plain), (fresh_schema(2000 + i), ttft_new)):
            t0 = time.perf_counter()
            llm.generate(batch, SamplingParams(max_tokens=1, temperature=0, structured=structured))
            sink.append((time.perf_counter() - t0) * 1e3)
    added = statistics.median(ttft_new) - statistics.median(ttft_plain)
    results["new_schema"] = {
        "compile_ms_median": round(statistics.median(compile_ms), 2),
        "compile_ms_max": round(max(compile_ms), 2),
        "ttft_ms_new_schema": round(statistics.median(ttft_new), 1),
        "ttft_ms_unconstrained": round(statistics.median(ttft_plain), 1),
        "added_ms": round(added, 1),
    }
    print(f"\na new schema ({n_new} fresh ones):")
    print(
        f"  compile (cache miss): median {statistics.median(compile_ms):.1f} ms, max {max(compile_ms):.1f} ms"
    )
    print(
        f"  time to first token: {statistics.median(ttft_new):.1f} ms with a new schema, "
        f"{statistics.median(ttft_plain):.1f} ms unconstrained: +{added:.1f} ms"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
