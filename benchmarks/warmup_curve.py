"""Held-out greedy accuracy of the tiny model along a supervised warm-up.

Why: the demo's MPO stage can only lift accuracy where the starting model already reads
the image a little. This script shows where on the warm-up curve that begins: it builds
the tiny model, warms it up on synthetic data (``mpo.tiny_model.warmup``, cosine schedule
over ``--steps``), and every ``--every`` steps saves a checkpoint and evaluates it
greedily on the held-out split with the pipeline's own evaluation (templates, answer
extraction, verifiers). Prints one table row per checkpoint.

    python benchmarks/warmup_curve.py --out /tmp/curve --steps 1500 --every 250
    python benchmarks/warmup_curve.py --out /tmp/curve --steps 800 --every 200 --lr 3e-3 \
        --datasets synth_colour,synth_count,synth_choice,synth_describe
    python benchmarks/warmup_curve.py --out /tmp/curve --steps 1000 --every 500 --seed 2 \
        --vision-lr-scale 10 --prior-bias 0.5 --prior-in-reasoning \
        --datasets synth_colour,synth_count,synth_choice,synth_describe     # the demo's warm-up
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    from mpo.engines.hf import TransformersEngine
    from mpo.evaluate import evaluate_accuracy
    from mpo.ingest import ingest
    from mpo.pairs import PairingConfig
    from mpo.sampling import SamplingConfig
    from mpo.synth import TASKS, VERIFY_MODES, generate
    from mpo.tiny_model import (
        TinyModelSpec,
        build_model,
        build_processor,
        build_tokenizer,
        warmup,
        warmup_examples,
    )

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="work folder (data, checkpoints, evaluations)"
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--vision-lr-scale",
        type=float,
        default=1.0,
        help="learning-rate multiplier of vision tower + projector",
    )
    parser.add_argument(
        "--prior-bias",
        type=float,
        default=0.0,
        help="share of closed examples taught the dataset's most common answer (the demo: 0.5)",
    )
    parser.add_argument(
        "--prior-in-reasoning",
        action="store_true",
        help="those examples name it in their steps too (the demo does)",
    )
    parser.add_argument("--image-size", type=int, default=224, help="vision tower input (the demo: 224)")
    parser.add_argument("--count", type=int, default=400, help="prompts per dataset (30%% held out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default=",".join(TASKS))
    args = parser.parse_args()
    datasets = tuple(args.datasets.split(","))

    data, warm, heldout = args.out / "data", args.out / "warmup-data", args.out / "heldout"
    generate(data, count=args.count, seed=args.seed, heldout_fraction=0.3, datasets=datasets)
    generate(warm, count=500, seed=args.seed + 1, heldout_fraction=0.0, datasets=datasets)
    ingest(data / "meta_heldout.json", heldout)

    spec = TinyModelSpec(args.image_size)
    tokenizer = build_tokenizer(spec, args.seed)
    processor = build_processor(spec, tokenizer)
    model = build_model(spec, tokenizer, args.seed)
    closed = [d for d in datasets if d in VERIFY_MODES]
    print("| step | s | loss | " + " | ".join(closed) + " |")
    print("| ---: | ---: | ---: |" + " ---: |" * len(closed))
    started = time.perf_counter()

    def checkpoint(step: int, loss: float) -> None:
        if (step + 1) % args.every:
            return
        folder = args.out / f"step-{step + 1}"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        engine = TransformersEngine(str(folder))
        table = evaluate_accuracy(
            engine,
            heldout / "prompts",
            args.out / "eval",
            SamplingConfig(),
            PairingConfig(verify_modes=VERIFY_MODES),
            max_tokens=48,
        )
        engine.close()
        cells = " | ".join(f"{table[d].accuracy:.1%}" if d in table else "-" for d in closed)
        print(f"| {step + 1} | {time.perf_counter() - started:.0f} | {loss:.3f} | {cells} |", flush=True)

    examples = warmup_examples(
        warm, prior_bias=args.prior_bias, seed=args.seed, prior_in_reasoning=args.prior_in_reasoning
    )
    warmup(
        model,
        processor,
        examples,
        args.steps,
        args.seed,
        lr=args.lr,
        vision_lr_scale=args.vision_lr_scale,
        on_step=checkpoint,
    )


if __name__ == "__main__":
    main()
