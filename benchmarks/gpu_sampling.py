"""Benchmark: sampling throughput per engine, and the overhead of our stage over the bare engine.

    python benchmarks/gpu_sampling.py [--model DIR] [--prompts 64] [--n 8] [--max-tokens 64]

Runs every engine importable here (transformers always; vLLM and lmdeploy on a CUDA
machine with their extras) on the same synthetic prompts: once as bare ``generate``
calls over the exact requests the stage makes, once through ``run_stage`` (templating,
shards, Parquet writes). Prints output tokens/s, samples/s and the stage's overhead.
Without ``--model`` it builds the tiny offline model (random weights); on a GPU pass a
real checkpoint folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=str, default=None)
    parser.add_argument("--prompts", type=int, default=64, help="closed prompts")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--engines", nargs="*", default=None)
    args = parser.parse_args()

    import polars as pl
    import torch

    from mpo.engines import ENGINES, load_engine
    from mpo.ingest import ingest
    from mpo.sampling import SamplingConfig, _correctness_requests, run_stage, strided_shards
    from mpo.schemas import PROMPTS, read_dir
    from mpo.synth import CLOSED_DATASETS, generate
    from mpo.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="mpo-bench-sampling-"))
    per_dataset = -(-args.prompts // len(CLOSED_DATASETS))
    generate(work / "data", count=per_dataset, seed=0, heldout_fraction=0.0, datasets=CLOSED_DATASETS)
    ingest(work / "data" / "meta.json", work / "ingested")
    model = args.model or str(work / "tiny")
    if args.model is None:
        build_tiny_model(Path(model), seed=0)
    config = SamplingConfig(n=args.n, max_tokens=args.max_tokens, temperature=1.0, prompts_per_shard=16)
    prompts = pl.from_arrow(read_dir(work / "ingested" / "prompts", PROMPTS))
    assert isinstance(prompts, pl.DataFrame)
    requests = [
        r
        for shard in strided_shards(prompts, config.prompts_per_shard)
        for _, r, _ in _correctness_requests(shard, config)
    ]

    available = {
        "transformers": True,
        "vllm": importlib.util.find_spec("vllm") is not None and torch.cuda.is_available(),
        "lmdeploy": importlib.util.find_spec("lmdeploy") is not None and torch.cuda.is_available(),
    }
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    rows = []
    for name in args.engines or ENGINES:
        if not available.get(name):
            print(f"{name}: not available here, skipped")
            continue
        engine = load_engine(name, model)
        engine.generate(requests[:1])  # warm-up (compilation, caches)
        start = time.perf_counter()
        outputs = engine.generate(requests)
        bare = time.perf_counter() - start
        tokens = sum(c.num_tokens for out in outputs for c in out)
        samples = sum(len(out) for out in outputs)
        start = time.perf_counter()
        run_stage("correctness", work / "ingested" / "prompts", engine, work / f"samples-{name}", config)
        staged = time.perf_counter() - start
        engine.close()
        rows.append((name, samples, tokens, bare, staged))

    print(
        f"\ndevice: {device}   model: {'tiny (random weights)' if args.model is None else model}   "
        f"prompts: {prompts.height}   n: {args.n}   max_tokens: {args.max_tokens}"
    )
    print(
        f"{'engine':<14}{'samples':>9}{'out tok':>10}{'bare s':>9}{'tok/s':>10}{'samples/s':>11}{'stage s':>9}{'overhead':>10}"
    )
    for name, samples, tokens, bare, staged in rows:
        print(
            f"{name:<14}{samples:>9}{tokens:>10}{bare:>9.1f}{tokens / bare:>10.0f}{samples / bare:>11.1f}"
            f"{staged:>9.1f}{(staged / bare - 1):>9.1%}"
        )


if __name__ == "__main__":
    main()
