"""MPO training step: our trainer vs TRL's DPOTrainer (sigmoid + bco_pair + sft, weights 0.8/0.2/1.0).

Same pairs, same model, same batch size, same max_length. Each trainer runs in its own
child process (so peak memory is its own): steps/s is measured over the steps after
``--skip`` warm-up steps, peak memory is the child's peak RSS on CPU or
``torch.cuda.max_memory_allocated`` on CUDA.

Rows:
- ``ours (precomputed ref)``: the pipeline's way: reference log-probs written into the
  pairs beforehand by ``mpo ref-logps`` (timed separately, reported per pair);
- ``ours (online ref)``: a frozen reference model run every step, like TRL;
- ``TRL DPOTrainer``: TRL 1.16, reference model copy, images run through the vision tower
  for chosen and rejected, full logits.

    python benchmarks/train_step.py                      # CPU, the tiny model
    python benchmarks/train_step.py --vocab 151674       # tiny model with a Qwen2-sized vocabulary
    python benchmarks/train_step.py --shape 1b --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {  # text hidden, layers, heads, kv heads, intermediate; vision hidden, layers
    "tiny": None,
    "1b": dict(
        text_hidden=1536,
        text_layers=28,
        text_heads=12,
        text_kv_heads=2,
        text_intermediate=8960,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
    ),
}


def build(workdir: Path, shape: str, vocab: int | None, pairs: int) -> None:
    """Synthetic data, the model (random weights), gold pairs with reference log-probs."""
    from dataclasses import replace

    from mpo.synth import generate, solution_pairs
    from mpo.tiny_model import TinyModelSpec, build_tiny_model

    generate(workdir / "synth", count=max(2, (pairs + 4) // 4), seed=0, heldout_fraction=0.0)
    spec = TinyModelSpec()
    if SHAPES[shape]:
        spec = replace(spec, **SHAPES[shape])
    if vocab:
        spec = replace(spec, model_vocab_size=vocab)
    build_tiny_model(workdir / "model", seed=0, spec=spec)
    solution_pairs(workdir / "synth", workdir / "pairs")


def child_ours(workdir: Path, args: argparse.Namespace, reference: str) -> dict[str, float]:
    import torch

    from mpo.ref_logps import compute_reference_logps
    from mpo.train import TrainConfig, train

    ref_seconds = 0.0
    if reference == "precomputed":
        started = time.perf_counter()
        report = compute_reference_logps(
            workdir / "pairs",
            workdir / "model",
            max_length=args.max_length,
            batch_size=args.batch,
            device=args.device,
        )
        pairs = report.counts["pairs_computed"] + report.counts["pairs_from_store"]
        ref_seconds = (time.perf_counter() - started) / pairs if pairs else 0.0
    stamps: list[float] = []
    config = TrainConfig(
        batch_size=args.batch,
        max_steps=args.steps,
        max_length=args.max_length,
        reference=reference,
        device=args.device,
        learning_rate=1e-5,
        seed=0,
    )
    out = workdir / f"ours-{reference}"
    shutil.rmtree(out, ignore_errors=True)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampler = RssPeak()
    sampler.start()
    train(
        workdir / "pairs",
        workdir / "model",
        out,
        config,
        on_step=lambda _r: stamps.append(time.perf_counter()),
    )
    return {
        "steps_per_s": _rate(stamps, args.skip),
        "ref_s_per_pair": ref_seconds,
        **_peak(args.device, sampler),
    }


def child_trl(workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from datasets import Image as ImageFeature
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from mpo.pair_data import PairTable

    sampler = RssPeak()  # from before the model loads, as for ours
    sampler.start()
    pairs = PairTable.read(workdir / "pairs")
    rows = {
        "images": [[p] for p, *_ in pairs.images],
        "prompt": [[{"role": "user", "content": q.replace("<image>", "").strip()}] for q in pairs.prompts],
        "chosen": [[{"role": "assistant", "content": c}] for c in pairs.chosen],
        "rejected": [[{"role": "assistant", "content": r}] for r in pairs.rejected],
    }
    dataset = Dataset.from_dict(rows).cast_column("images", [ImageFeature()])
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(workdir / "model", dtype=dtype)
    processor = AutoProcessor.from_pretrained(workdir / "model")
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):  # type: ignore[no-untyped-def]
            stamps.append(time.perf_counter())

    config = DPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-5,
        loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0],
        beta=0.1,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=args.device == "cpu",
        bf16=args.device == "cuda",
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=processor, callbacks=[Stamp()]
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"steps_per_s": _rate(stamps, args.skip), "ref_s_per_pair": 0.0, **_peak(args.device, sampler)}


def _rate(stamps: list[float], skip: int) -> float:
    timed = stamps[skip:]
    return (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")


class RssPeak:
    """Peak resident memory above the level at ``start`` (model loaded), sampled every 2 ms.

    The process's lifetime peak (ru_maxrss) is dominated by torch itself on a tiny
    model; what training adds on top is what the trainers differ in.
    """

    def __init__(self) -> None:
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self) -> None:
        self.base = self.peak = self.rss()
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return (max(self.peak, self.rss()) - self.base) / 2**20


def _peak(device: str, sampler: RssPeak) -> dict[str, float]:
    above = sampler.stop()
    if device == "cuda":
        import torch

        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_mib": above, "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


ROWS = {
    "ours-precomputed": "ours (precomputed ref)",
    "ours-online": "ours (online ref)",
    "trl": "TRL DPOTrainer",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mpo-bench-train"))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--vocab", type=int, default=None, help="pad the model's vocabulary to this size")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the timing")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--child", choices=sorted(ROWS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        work = args.workdir
        result = (
            child_trl(work, args) if args.child == "trl" else child_ours(work, args, args.child.split("-")[1])
        )
        print("RESULT " + json.dumps(result))
        return

    build(args.workdir, args.shape, args.vocab, args.pairs)
    results = {}
    for child in ROWS:
        command = [sys.executable, __file__, "--child", child, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            print(f"{child} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results[child] = json.loads(line.removeprefix("RESULT "))

    print(
        f"\nshape {args.shape}, vocab {args.vocab or 'tokenizer'}, device {args.device}, batch {args.batch} pairs, "
        f"{args.steps} steps ({args.skip} warm-up), max_length {args.max_length}"
    )
    print(f"{'trainer':<26}{'steps/s':>10}{'peak MiB':>12}{'speed vs TRL':>15}{'memory vs TRL':>15}")
    trl = results.get("trl")
    for child, label in ROWS.items():
        if child not in results:
            continue
        r = results[child]
        speed = f"{r['steps_per_s'] / trl['steps_per_s']:.2f}x" if trl else "-"
        memory = f"{r['peak_mib'] / trl['peak_mib']:.2f}x" if trl else "-"
        print(f"{label:<26}{r['steps_per_s']:>10.2f}{r['peak_mib']:>12.0f}{speed:>15}{memory:>15}")
    if "ours-precomputed" in results:
        print(
            f"reference pass (mpo ref-logps, once per dataset, incl. loading the model): "
            f"{results['ours-precomputed']['ref_s_per_pair'] * 1000:.1f} ms per pair"
        )
    print(
        "peak MiB: CUDA max allocated, or on CPU the resident memory added from before the model loads "
        "to the end of training"
    )


if __name__ == "__main__":
    main()
