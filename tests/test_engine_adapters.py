"""vLLM / lmdeploy request shaping, and contract tests against the real packages' classes.

The lmdeploy tests run wherever ``pip install --no-deps lmdeploy`` imports (the Makefile puts
it in the dev environment; its engines need CUDA, its classes do not). They skip elsewhere,
or fail when ``MPO_REQUIRE_ENGINES`` names lmdeploy. vLLM runs for real in
``tests/test_vllm_engine.py`` (``make test-engines``).
"""

import inspect
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mpo.engines import lmdeploy as lmd
from mpo.engines import load_engine
from mpo.engines import vllm as vl
from mpo.engines.base import Completion, GenerationRequest, SamplingParams, finish_reason, stop_token_ids
from mpo.engines.tiles import processor_kwargs
from mpo.sampling import prefix_by_tokens

PARAMS = SamplingParams(n=4, temperature=0.7, top_k=50, top_p=1.0, max_tokens=4096)


def import_engine(name: str):
    """The engine package, skipped where it is not installed unless MPO_REQUIRE_ENGINES names it."""
    if name in os.environ.get("MPO_REQUIRE_ENGINES", "").split(","):
        return __import__(name)
    return pytest.importorskip(
        name, reason=f"{name} is not installed here (see the Makefile's engine targets)"
    )


def model_with_architecture(folder: Path, architecture: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return str(folder)


def test_vllm_sampling_kwargs_always_set_max_tokens_and_seed() -> None:
    kwargs = vl.sampling_kwargs(PARAMS, seed=320, stop_token_ids=[2, 5])
    assert kwargs == {
        "n": 4,
        "temperature": 0.7,
        "top_p": 1.0,
        "top_k": 50,
        "max_tokens": 4096,
        "seed": 320,
        "stop_token_ids": [2, 5],
    }
    assert vl.sampling_kwargs(SamplingParams(top_k=0), 0)["top_k"] == -1


def test_max_dynamic_patch_maps_to_each_model_formats_own_knobs(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert processor_kwargs(str(tiny_model_dir), 6) == {
        "crop_to_patches": True,
        "min_patches": 1,
        "max_patches": 6,
    }
    assert processor_kwargs(str(tiny_model_dir), 1)["crop_to_patches"] is False
    assert processor_kwargs(str(tiny_model_dir), None) == {}
    original = model_with_architecture(tmp_path / "original", "InternVLChatModel")
    assert processor_kwargs(original, 6) == {"max_dynamic_patch": 6}
    other = model_with_architecture(tmp_path / "qwen", "Qwen2VLForConditionalGeneration")
    with pytest.raises(ValueError, match="applies to InternVL models.*Qwen2VLForConditionalGeneration"):
        processor_kwargs(other, 6)


def test_vllm_engine_kwargs_map_tiles_and_pass_other_llm_arguments(tiny_model_dir: Path) -> None:
    kwargs = vl.engine_kwargs(
        str(tiny_model_dir),
        max_images=3,
        max_dynamic_patch=6,
        tensor_parallel_size=2,
        dtype="float32",
        enforce_eager=True,
        max_num_seqs=8,
        hf_overrides={"x": 1},
    )
    assert kwargs["limit_mm_per_prompt"] == {"image": 3} and kwargs["enable_prefix_caching"] is True
    assert kwargs["mm_processor_kwargs"] == {"crop_to_patches": True, "min_patches": 1, "max_patches": 6}
    assert (kwargs["dtype"], kwargs["enforce_eager"], kwargs["max_num_seqs"]) == ("float32", True, 8)
    assert kwargs["hf_overrides"] == {"x": 1} and kwargs["tensor_parallel_size"] == 2
    assert kwargs["trust_remote_code"] is False
    explicit = vl.engine_kwargs(
        str(tiny_model_dir), max_dynamic_patch=6, mm_processor_kwargs={"max_patches": 2}
    )
    assert explicit["mm_processor_kwargs"]["max_patches"] == 2
    assert "mm_processor_kwargs" not in vl.engine_kwargs(str(tiny_model_dir))


def test_transformers_engine_image_tokens_follow_max_dynamic_patch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A 448 px image on the 224 px tiny model: 4 tiles + a thumbnail at 6, one tile at 1 (64 tokens each)."""
    from mpo.engines.hf import TransformersEngine

    Image.new("RGB", (448, 448), "red").save(tmp_path / "big.png")
    request = GenerationRequest("r", "<image>\nWhat colour?", (str(tmp_path / "big.png"),))
    counts = {}
    for tiles in (1, 6):
        engine = TransformersEngine(str(tiny_model_dir), device="cpu", max_dynamic_patch=tiles)
        context = engine.processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        counts[tiles] = int((engine.encode_prompts([request])["input_ids"] == context).sum())
    assert counts == {1: 64, 6: 320}


def test_stop_tokens_from_tokenizer(hf_engine) -> None:
    tokenizer = hf_engine.tokenizer
    ids = stop_token_ids(tokenizer)
    assert ids == sorted(
        {tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    )


def test_finish_reasons_other_than_stop_or_length_are_kept_by_name() -> None:
    assert [finish_reason(r) for r in ("stop", "length", "abort", "error", "repetition", None)] == [
        "stop",
        "length",
        "abort",
        "error",
        "repetition",
        "error",
    ]


def test_messages_carry_images_in_placeholder_order(tmp_path: Path) -> None:
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    request = GenerationRequest(
        "r",
        "<image> or <image>?",
        (str(tmp_path / "a.png"), str(tmp_path / "b.png")),
        assistant_prefix="The first",
    )
    messages = vl.chat_messages(request)
    items = messages[0]["content"]
    assert [i["type"] for i in items] == ["image_pil", "text", "image_pil", "text"]
    assert items[0]["image_pil"].getpixel((0, 0)) == (255, 0, 0) and messages[1]["role"] == "assistant"
    lmd_items = lmd.chat_messages(request)[0]["content"]
    assert lmd_items[2] == {"type": "image_url", "image_url": {"url": str(tmp_path / "b.png")}}


def test_lmdeploy_fans_out_n_with_sampling_on() -> None:
    configs = lmd.generation_kwargs(PARAMS, seed=96, stop_token_ids=[3])
    assert len(configs) == 4 and [c["random_seed"] for c in configs] == [96, 97, 98, 99]
    assert all(c["n"] == 1 and c["do_sample"] and c["max_new_tokens"] == 4096 for c in configs)
    assert configs[0]["stop_token_ids"] == [3]
    assert lmd.generation_kwargs(SamplingParams(temperature=0), 0)[0]["do_sample"] is False


def test_lmdeploy_refuses_a_temperature_it_cannot_sample_by_name() -> None:
    with pytest.raises(ValueError, match="temperature <= 2, got 2.5"):
        lmd.generation_kwargs(SamplingParams(temperature=2.5), 0)


def test_vllm_builds_real_sampling_params() -> None:
    vllm = import_engine("vllm")
    params = vllm.SamplingParams(**vl.sampling_kwargs(PARAMS, 64, [7]))
    assert params.n == 4 and params.max_tokens == 4096 and params.seed == 64


# --- lmdeploy: the real package's classes --------------------------------------------------------


def test_lmdeploy_generation_configs_build_from_our_options() -> None:
    lmdeploy = import_engine("lmdeploy")
    configs = [lmdeploy.GenerationConfig(**k) for k in lmd.generation_kwargs(PARAMS, 0, [5])]
    assert configs[1].random_seed == 1 and configs[0].do_sample and configs[0].stop_token_ids == [5]
    with pytest.raises(AssertionError):  # why generation_kwargs checks the bound itself
        lmdeploy.GenerationConfig(temperature=2.5)


def test_lmdeploy_backend_configs_build_from_our_options() -> None:
    lmdeploy = import_engine("lmdeploy")
    turbomind = lmdeploy.TurbomindEngineConfig(
        **lmd.backend_kwargs(tp=2, session_len=4096, max_batch_size=64)
    )
    assert (turbomind.tp, turbomind.session_len, turbomind.max_batch_size) == (2, 4096, 64)
    assert turbomind.enable_prefix_caching
    pytorch = lmdeploy.PytorchEngineConfig(**lmd.backend_kwargs(device_type="ascend"))
    assert pytorch.device_type == "ascend" and pytorch.enable_prefix_caching


def test_lmdeploy_pipeline_gets_trust_remote_code_and_its_backend_config(tiny_model_dir: Path) -> None:
    lmdeploy = import_engine("lmdeploy")
    kwargs = lmd.pipeline_kwargs(str(tiny_model_dir), "pytorch", True, session_len=1024)
    bound = inspect.signature(lmdeploy.pipeline).bind(**kwargs)  # every key is a pipeline() parameter
    assert bound.arguments["trust_remote_code"] is True
    assert isinstance(kwargs["backend_config"], lmdeploy.PytorchEngineConfig)
    assert kwargs["backend_config"].session_len == 1024
    with pytest.raises(ValueError, match="unknown lmdeploy backend 'sglang'"):
        lmd.pipeline_kwargs(str(tiny_model_dir), "sglang", False)


def test_lmdeploy_pipeline_has_no_tokenizer_so_dropout_cuts_with_the_models_own(tiny_model_dir: Path) -> None:
    """lmdeploy >= 0.12: no ``Pipeline.tokenizer``, and its Tokenizer takes no add_special_tokens."""
    import_engine("lmdeploy")
    from lmdeploy.pipeline import Pipeline
    from lmdeploy.tokenizer import Tokenizer

    assert not hasattr(Pipeline, "tokenizer")
    assert "add_special_tokens" not in inspect.signature(Tokenizer.__call__).parameters
    engine = object.__new__(
        lmd.LMDeployEngine
    )  # the pipeline itself needs CUDA: build only the tokenizer part
    engine.tokenizer = lmd.load_tokenizer(str(tiny_model_dir))
    text = "A red circle sits to the left of two small blue squares."
    prefix = prefix_by_tokens(text, 0.5, engine.tokenizer)
    assert 0 < len(prefix) < len(text) and text.startswith(prefix)


def test_lmdeploy_continues_the_dropout_prefix_with_its_own_chat_template(tiny_model_dir: Path) -> None:
    import_engine("lmdeploy")
    from lmdeploy.model import get_chat_template

    template = get_chat_template(str(tiny_model_dir))
    request = GenerationRequest("r", "Describe the picture.", assistant_prefix="A red circle and")
    prompt = template.messages2prompt(lmd.chat_messages(request))
    assert prompt.endswith("<|im_start|>assistant\nA red circle and")  # no end-of-turn: the model continues


def test_lmdeploy_loads_local_image_paths(tmp_path: Path) -> None:
    import_engine("lmdeploy")
    from lmdeploy.vl.utils import load_image

    Image.new("RGB", (32, 16), "blue").save(tmp_path / "a.png")
    request = GenerationRequest("r", "<image>\nColour?", (str(tmp_path / "a.png"),))
    url = lmd.chat_messages(request)[0]["content"][0]["image_url"]["url"]
    assert load_image(url).size == (32, 16)


def test_lmdeploy_responses_fan_in_with_their_finish_reasons(tiny_model_dir: Path) -> None:
    """generate() over lmdeploy's real Response objects: n per request, in order, failures kept by name.
    The pipeline is replaced by one that answers with those objects (its engines need CUDA)."""
    import_engine("lmdeploy")
    from lmdeploy.messages import Response

    reasons = iter(["stop", "length", "abort", "error", "stop", "stop"])
    engine = object.__new__(lmd.LMDeployEngine)
    engine.stop_ids = [1]
    engine.pipe = lambda prompts, gen_config: [
        Response(text=f"r{i}", generate_token_len=i + 1, input_token_len=3, finish_reason=next(reasons))
        for i in range(len(prompts))
    ]
    requests = [
        GenerationRequest("a", "q?", params=SamplingParams(n=4)),
        GenerationRequest("b", "q?", params=SamplingParams(n=2)),
    ]
    out = engine.generate(requests)
    assert [len(o) for o in out] == [4, 2]
    assert out[0][2] == Completion("r2", 3, "abort") and out[0][3].finish_reason == "error"
    assert out[1][0] == Completion("r4", 5, "stop")


def test_unknown_engine_is_named() -> None:
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        load_engine("sglang", "m")
