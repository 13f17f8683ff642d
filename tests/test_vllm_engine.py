"""vLLM generating for real (the vllm-cpu build in .venv-vllm): ``make test-engines``.

One engine for the module (an engine start costs about a minute on 2 cores), built through
our adapter from the tiny InternVL-hf model with ``max_dynamic_patch=6``. Elsewhere these
tests skip (vLLM is not in the dev environment), or fail when ``MPO_REQUIRE_ENGINES`` names
vllm, as ``make test-engines`` sets it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from mpo.engines.base import FINISHED, GenerationRequest, SamplingParams
from mpo.sampling import read_prompts
from mpo.schemas import PROMPTS, SAMPLES, read_dir, write_table

pytestmark = pytest.mark.engines

ENGINE_OPTIONS = {"max_model_len": 2048, "max_dynamic_patch": 6, "dtype": "float32", "max_num_seqs": 32}


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir: Path):
    if "vllm" not in os.environ.get("MPO_REQUIRE_ENGINES", "").split(","):
        pytest.importorskip("vllm", reason="vLLM runs in .venv-vllm: make test-engines")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from mpo.engines import load_engine

    engine = load_engine("vllm", str(tiny_model_dir), **ENGINE_OPTIONS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def count_image(synth_dir: Path) -> str:
    return str(sorted((synth_dir / "images" / "synth_count").glob("*.png"))[0])


def test_n_completions_per_request_with_finish_reasons(vllm_engine, count_image: str) -> None:
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8)
    requests = [
        GenerationRequest(f"r{i}", "<image>\nHow many circles?", (count_image,), params=params, seed=8 * i)
        for i in range(3)
    ]
    out = vllm_engine.generate(requests)
    assert [len(o) for o in out] == [4, 4, 4]
    completions = [c for o in out for c in o]
    assert all(c.finish_reason in FINISHED and 1 <= c.num_tokens <= 8 for c in completions)
    assert any(c.finish_reason == "length" and c.num_tokens == 8 for c in completions)
    assert len({c.text for c in out[0]}) > 1  # the n children draw different samples


def test_seeded_samples_repeat_across_calls_and_batches(vllm_engine, count_image: str) -> None:
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12)

    def request(seed: int, question: str = "<image>\nHow many circles?") -> GenerationRequest:
        return GenerationRequest(f"s{seed}", question, (count_image,), params=params, seed=seed)

    alone = vllm_engine.generate([request(40)])[0]
    batched = vllm_engine.generate([request(7, "<image>\nWhat colour?"), request(40), request(90)])
    assert batched[1] == alone
    assert vllm_engine.generate([request(41)])[0] != alone


@pytest.mark.parametrize("with_image", [False, True], ids=["without_image", "with_image"])
def test_dropout_prompt_ends_in_the_cut_and_is_continued(
    vllm_engine, count_image: str, with_image: bool
) -> None:
    from vllm import SamplingParams as VLLMSamplingParams

    from mpo.engines import vllm as vl
    from mpo.sampling import prefix_by_tokens

    answer = "There are three red circles and one blue square in the picture."
    prefix = prefix_by_tokens(answer, 0.5, vllm_engine.tokenizer)
    request = GenerationRequest(
        "d",
        "<image>\nDescribe the picture." if with_image else "Describe the picture.",
        (count_image,) if with_image else (),
        assistant_prefix=prefix,
        params=SamplingParams(n=1, temperature=0.7, max_tokens=10),
        seed=3,
    )
    # The adapter's own call, one level down, to read the prompt vLLM rendered.
    rendered = vllm_engine.llm.chat(
        [vl.chat_messages(request)],
        VLLMSamplingParams(max_tokens=4, temperature=0),
        add_generation_prompt=False,
        continue_final_message=True,
        use_tqdm=False,
    )[0]
    assert rendered.prompt.endswith("<|im_start|>assistant\n" + prefix)
    assert ("<IMG_CONTEXT>" in rendered.prompt) == with_image
    (completion,) = vllm_engine.generate([request])[0]
    assert completion.finish_reason in FINISHED and completion.num_tokens >= 1


def test_image_tokens_follow_max_dynamic_patch(vllm_engine, tmp_path: Path) -> None:
    """A 448 px image on the 224 px tiny model: the engine's max_dynamic_patch=6 gives 4 tiles + a
    thumbnail (5 x 64 tokens); one tile (the processor's knobs per request) gives 64."""
    from vllm import SamplingParams as VLLMSamplingParams

    from mpo.engines import vllm as vl

    Image.new("RGB", (448, 448), "red").save(tmp_path / "big.png")
    messages = vl.chat_messages(GenerationRequest("i", "<image>\nWhat colour?", (str(tmp_path / "big.png"),)))
    context = vllm_engine.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    greedy = VLLMSamplingParams(max_tokens=1, temperature=0)

    def image_tokens(**kwargs) -> int:
        output = vllm_engine.llm.chat([messages], greedy, use_tqdm=False, **kwargs)[0]
        return sum(token == context for token in output.prompt_token_ids)

    assert image_tokens() == 320
    assert image_tokens(mm_processor_kwargs={"crop_to_patches": False, "max_patches": 1}) == 64


def few_prompts(prompts_dir: Path, out: Path) -> Path:
    """Three closed and two open prompts of the session's ingested prompts, as a prompts folder."""
    frame = read_prompts(prompts_dir)
    few = pl.concat(
        [frame.filter(pl.col("kind") == "closed").head(3), frame.filter(pl.col("kind") == "open").head(2)]
    )
    write_table(few.to_arrow().cast(PROMPTS), out / "part-00000.parquet")
    return out


def test_mpo_sample_with_vllm_writes_the_transformers_engines_contract(
    vllm_engine, tiny_model_dir: Path, prompts_dir: Path, tmp_path: Path
) -> None:
    """The whole `mpo sample` stage, once per engine, on the same prompts: same tables, keys and seeds."""
    prompts = few_prompts(prompts_dir, tmp_path / "prompts")
    stores = {}
    for engine, options in (("vllm", ENGINE_OPTIONS), ("transformers", {"max_dynamic_patch": 6})):
        out = tmp_path / engine
        command = [
            sys.executable,
            "-m",
            "mpo.cli",
            "sample",
            "--prompts",
            str(prompts),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--engine",
            engine,
            "--n",
            "4",
            "--max-tokens",
            "16",
            "--temperature",
            "1.0",
            "--prompts-per-shard",
            "2",
        ]
        command += [arg for key, value in options.items() for arg in ("--engine-option", f"{key}={value}")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        stores[engine] = {
            store.name.split("-")[0]: pl.from_arrow(read_dir(store, SAMPLES))
            for store in sorted(out.iterdir())
        }
    assert set(stores["vllm"]) == set(stores["transformers"]) == {"correctness", "dropout_ntp"}
    keys = ["prompt_id", "sample_index", "seed", "prompt_version", "source", "prefix"]
    for stage in ("correctness", "dropout_ntp"):
        vllm_rows, hf_rows = stores["vllm"][stage], stores["transformers"][stage]
        assert vllm_rows.schema == hf_rows.schema
        assert vllm_rows.select(keys).sort(keys).equals(hf_rows.select(keys).sort(keys))
        assert vllm_rows["finish_reason"].is_in(list(FINISHED)).all()
        assert (vllm_rows["sampling_config"].str.contains('"engine": "vllm"')).all()
    assert stores["vllm"]["correctness"].height == 3 * 4 and stores["vllm"]["dropout_ntp"].height == 2
