"""vLLM / lmdeploy request shaping. The engines' own request objects are built where the
packages are installed (GPU machines); elsewhere those tests skip with the reason."""

from pathlib import Path

import pytest
from PIL import Image

from mpo.engines import lmdeploy as lmd
from mpo.engines import load_engine
from mpo.engines import vllm as vl
from mpo.engines.base import GenerationRequest, SamplingParams

PARAMS = SamplingParams(n=4, temperature=0.7, top_k=50, top_p=1.0, max_tokens=4096)


def test_vllm_sampling_kwargs_always_set_max_tokens_and_seed() -> None:
    kwargs = vl.sampling_kwargs(PARAMS, seed=320, stop_token_ids=[2, 5])
    assert kwargs == {"n": 4, "temperature": 0.7, "top_p": 1.0, "top_k": 50, "max_tokens": 4096, "seed": 320,
                      "stop_token_ids": [2, 5]}
    assert vl.sampling_kwargs(SamplingParams(top_k=0), 0)["top_k"] == -1


def test_vllm_engine_kwargs() -> None:
    kwargs = vl.engine_kwargs("m", max_images=3, max_dynamic_patch=6, tensor_parallel_size=2)
    assert kwargs["limit_mm_per_prompt"] == {"image": 3} and kwargs["enable_prefix_caching"] is True
    assert kwargs["mm_processor_kwargs"] == {"max_dynamic_patch": 6} and kwargs["tensor_parallel_size"] == 2
    assert kwargs["trust_remote_code"] is False


def test_stop_tokens_from_tokenizer(hf_engine) -> None:
    tokenizer = hf_engine.tokenizer
    ids = vl.stop_token_ids(tokenizer)
    assert ids == sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")})


def test_messages_carry_images_in_placeholder_order(tmp_path: Path) -> None:
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    request = GenerationRequest("r", "<image> or <image>?", (str(tmp_path / "a.png"), str(tmp_path / "b.png")),
                                assistant_prefix="The first")
    messages = vl.chat_messages(request)
    items = messages[0]["content"]
    assert [i["type"] for i in items] == ["image_pil", "text", "image_pil", "text"]
    assert items[0]["image_pil"].getpixel((0, 0)) == (255, 0, 0) and messages[1]["role"] == "assistant"
    lmd_items = lmd.chat_messages(request)[0]["content"]
    assert lmd_items[2] == {"type": "image_url", "image_url": {"url": str(tmp_path / "b.png")}}


def test_lmdeploy_fans_out_n_with_sampling_on() -> None:
    configs = lmd.generation_kwargs(PARAMS, seed=96)
    assert len(configs) == 4 and [c["random_seed"] for c in configs] == [96, 97, 98, 99]
    assert all(c["n"] == 1 and c["do_sample"] and c["max_new_tokens"] == 4096 for c in configs)
    assert lmd.generation_kwargs(SamplingParams(temperature=0), 0)[0]["do_sample"] is False


def test_vllm_builds_real_sampling_params() -> None:
    vllm = pytest.importorskip("vllm", reason="vLLM is a GPU extra (pip install '.[vllm]')")
    params = vllm.SamplingParams(**vl.sampling_kwargs(PARAMS, 64, [7]))
    assert params.n == 4 and params.max_tokens == 4096 and params.seed == 64


def test_lmdeploy_builds_real_generation_configs() -> None:
    lmdeploy = pytest.importorskip("lmdeploy", reason="lmdeploy is a GPU extra (pip install '.[lmdeploy]')")
    configs = [lmdeploy.GenerationConfig(**k) for k in lmd.generation_kwargs(PARAMS, 0)]
    assert configs[1].random_seed == 1 and configs[0].do_sample


def test_unknown_engine_is_named() -> None:
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        load_engine("sglang", "m")
