"""MPO data engine library: data, models, sampling, pairing, training (no Prefect here)."""

import os

# Polars' allocator (jemalloc) keeps freed pages for 10 s by default, so a stage that works
# chunk after chunk (pairing) holds every chunk's garbage at its peak. Returning them after
# 100 ms took the 1M-sample pairing benchmark's peak from 800-855 MiB to ~710 MiB at the same
# speed (benchmarks/README.md). Read when polars is first imported, hence here, before any
# module of ours imports it; a value the user set wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:100,muzzy_decay_ms:0")
