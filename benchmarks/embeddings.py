"""Sentences per second through POST /v1/embeddings against sentence-transformers' `encode`, same run.

llmaas: `llmaas serve --model minilm-l6 --no-auth` in its own process (each --dtype in turn), driven
over loopback by C concurrent clients, each sending requests of --inputs-per-request sentences
(base64 vectors, as the openai SDK asks for them) until the texts are used up. The peer:
sentence-transformers' SentenceTransformer on the same folder (fp32, its default), `encode` over the
same texts in one call (its own length-sorted batches of --st-batch-size), in this process while no
server runs (before the servers and after them; ratios against the mean), with torch's default
threads (one per core, as the server). On a machine other processes share, run it with
OMP_WAIT_POLICY=PASSIVE: both sides (the server inherits it) then sleep instead of spinning.
Texts: the first --texts sentences of the news corpus (llmaas.distill.data.news_sentences). Every
llmaas vector is checked against sentence-transformers' (the worst cosine is printed).

    PYTHONPATH=. .venv/bin/python benchmarks/embeddings.py [--texts 1024] [--concurrency 1,16]
        [--dtype auto,float32] [--inputs-per-request 1] [--st-batch-size 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

import llmaas
from llmaas.bench.server_process import free_port, stop_process_group, wait_until_ready
from llmaas.cpu_info import cpu_model
from llmaas.distill.data import news_sentences
from llmaas.models.catalog import resolve_model_dir

MODEL = "minilm-l6"


def sentence_transformers_rate(texts: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(resolve_model_dir(MODEL)), device="cpu")
    model.encode(texts[:64], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    vectors = model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    return len(texts) / (time.perf_counter() - start), vectors


async def llmaas_rate(url: str, texts: list[str], clients: int, per_request: int) -> tuple[float, np.ndarray]:
    """Sentences/s with `clients` concurrent clients; the vectors in text order."""
    requests = [list(range(i, min(i + per_request, len(texts)))) for i in range(0, len(texts), per_request)]
    vectors = np.zeros((len(texts), 0), dtype=np.float32)
    pending = iter(requests)
    found: dict[int, np.ndarray] = {}

    async def client(http: httpx.AsyncClient) -> None:
        for indices in pending:
            body = {"model": MODEL, "input": [texts[i] for i in indices], "encoding_format": "base64"}
            r = await http.post("/v1/embeddings", json=body)
            r.raise_for_status()
            for i, item in zip(indices, r.json()["data"]):
                found[i] = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(min(clients, 4))))  # warm-up
        found.clear()
        pending = iter(requests)
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    vectors = np.stack([found[i] for i in range(len(texts))])
    return len(texts) / elapsed, vectors


def serve(dtype: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llmaas.cli", "serve", "--model", MODEL, "--no-auth", "--port", str(port),
           "--dtype", dtype, "--database-url", f"sqlite:///{tmp / f'billing-{dtype}.sqlite3'}",
           "--max-waiting", "4096"]  # fmt: skip
    log = tmp / f"serve-{dtype}.log"
    code_root = Path(llmaas.__file__).parent.parent  # `-m` puts the cwd first on sys.path: serve this code
    proc = subprocess.Popen(
        cmd, cwd=code_root, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, url, log)
    return proc, url


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=1024)
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--dtype", default="auto,float32", help="llmaas dtypes to serve, in turn")
    p.add_argument("--inputs-per-request", type=int, default=1)
    p.add_argument("--st-batch-size", type=int, default=32)
    args = p.parse_args()
    texts = news_sentences(args.texts)
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, {os.cpu_count()} CPUs")
    print(f"{len(texts)} news sentences, mean {np.mean([len(t) for t in texts]):.0f} characters; "
          f"llmaas requests of {args.inputs_per_request} sentence(s)")  # fmt: skip
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    # The peer before and after the servers, the ratios against the mean: a machine whose load drifts
    # during the run moves both sides.
    st_before, st_vectors = sentence_transformers_rate(texts, args.st_batch_size)
    tmp = Path(tempfile.mkdtemp(prefix="llmaas-embeddings-"))
    rows = []
    for dtype in args.dtype.split(","):
        proc, url = serve(dtype, tmp)
        try:
            for clients in levels:
                rate, vectors = asyncio.run(llmaas_rate(url, texts, clients, args.inputs_per_request))
                rows.append((dtype, clients, rate, float(np.min(np.sum(vectors * st_vectors, axis=1)))))
                print(f"llmaas {dtype}, {clients} clients: {rate:.1f} sentences/s", flush=True)
        finally:
            stop_process_group(proc)
    st_after, _ = sentence_transformers_rate(texts, args.st_batch_size)
    st_rate = (st_before + st_after) / 2
    print(f"sentence-transformers encode (fp32, batch {args.st_batch_size}): {st_before:.1f} sentences/s "
          f"before, {st_after:.1f} after, mean {st_rate:.1f}")  # fmt: skip
    print("| llmaas dtype | clients | sentences/s | vs sentence-transformers | worst cosine |")
    print("|---|---:|---:|---:|---:|")
    for dtype, clients, rate, worst in rows:
        print(f"| {dtype} | {clients} | {rate:.1f} | {rate / st_rate:.2f}x | {worst:.6f} |")
    policy = os.environ.get("OMP_WAIT_POLICY")
    print(f"load average after: {os.getloadavg()[0]:.2f}; OMP_WAIT_POLICY={policy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
