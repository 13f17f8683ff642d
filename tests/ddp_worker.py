"""Run by tests under `torchrun --nproc-per-node 2`: train a few steps, append each rank's δ per step.

Arguments: PAIRS MODEL OUT BATCH_SIZE STEPS [ddp|fsdp] [STOP_AFTER]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mpo.train import TrainConfig, train


def main() -> None:
    pairs, model, out, batch_size, steps = (
        sys.argv[1],
        sys.argv[2],
        Path(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
    )
    strategy = sys.argv[6] if len(sys.argv) > 6 else "ddp"
    stop_after = int(sys.argv[7]) if len(sys.argv) > 7 else None
    rank = os.environ.get("RANK", "0")
    config = TrainConfig(
        learning_rate=1e-3,
        batch_size=batch_size,
        max_steps=steps,
        max_length=512,
        warmup_ratio=0.0,
        parallel=strategy,
    )
    log = out / f"delta-rank{rank}.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        train(
            pairs,
            model,
            out,
            config,
            stop_after=stop_after,
            on_step=lambda r: handle.write(json.dumps({"step": r["step"], "delta": r["delta"]}) + "\n"),
        )


if __name__ == "__main__":
    main()
