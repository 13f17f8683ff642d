"""Build a tiny InternVL-hf model offline: tokenizer, config, processor, random weights.

No model hub is reachable, so tests and the demo use a model this module makes from a
config: a byte-level BPE tokenizer trained on text the synthetic tasks produce, a
``InternVLForConditionalGeneration`` with a qwen2 text model (~1.4M parameters) and the
standard ``InternVLProcessor``. The result loads with ``AutoModelForImageTextToText``
and ``AutoProcessor`` under ``HF_HUB_OFFLINE=1``, exactly like a real checkpoint.

An optional supervised warm-up on ``mpo synth`` data gives the model some skill, so that
its samples are right sometimes and wrong sometimes, which is what MPO needs.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mpo import synth
from mpo.chat import Encoded, collate, encode
from mpo.templates import TEMPLATES, apply_template

IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO]

# ChatML; an image item renders as one <IMG_CONTEXT>, which the processor expands into
# <img> + image_seq_length x <IMG_CONTEXT> + </img>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the tiny model. image_size / patch_size must be even (pixel shuffle 0.5)."""

    image_size: int = 224
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 384
    vocab_size: int = 2048  # BPE vocabulary the tokenizer is trained to (at most)
    max_position_embeddings: int = 2048
    model_vocab_size: int | None = None  # pad the embedding table past the tokenizer (timing a real vocab)

    @property
    def image_seq_length(self) -> int:
        grid = self.image_size // self.patch_size
        if grid % 2:
            raise ValueError(f"image_size/patch_size must be even for pixel shuffle, got {grid}")
        return (grid // 2) ** 2


MAX_TOKEN_CHARS = 12  # longest merged token: phrase-sized, not whole memorised sentences


def _tokenizer_corpus(seed: int) -> Iterator[str]:
    """Text the model will read and write: synthetic questions, solutions, templates."""
    for dataset, task in synth.TASKS.items():
        for index in range(300):
            row = task(random.Random(f"tokenizer/{seed}/{dataset}/{index}")).fields
            for key in ("question", "solution", "chosen", "answer"):
                value = row.get(key)
                if isinstance(value, str):
                    yield value
                    if key == "question":
                        for template in TEMPLATES:
                            yield apply_template(value, template)
    yield "Yes No A B C D E F G H I J K L M N 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20"


def build_tokenizer(spec: TinyModelSpec, seed: int) -> Any:
    """Train a byte-level BPE and wrap it as a transformers fast tokenizer.

    Merges may cross spaces (up to ``MAX_TOKEN_CHARS`` characters, digits always alone):
    a model this small on a CPU costs time per token, and the CoT template and worked
    solutions repeat the same phrases, so phrase-sized tokens make every sequence ~35%
    shorter (warm-up, sampling, training and evaluation all get faster) while numbers
    stay one digit per token.
    """
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=MAX_TOKEN_CHARS,
        show_progress=False,
    )
    core.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=PAD,
        model_max_length=spec.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": VIDEO,
        },
    )


def build_processor(spec: TinyModelSpec, tokenizer: Any) -> Any:
    """The standard InternVLProcessor: one tile per image (no dynamic crops)."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    size = {"height": spec.image_size, "width": spec.image_size}
    # The processor's defaults set crop_to_patches=True; max_patches=1 keeps one tile.
    image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=False, min_patches=1, max_patches=1)
    video_processor = InternVLVideoProcessor(size=size)
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=spec.image_seq_length,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(spec: TinyModelSpec, tokenizer: Any, seed: int) -> Any:
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    config = InternVLConfig(
        vision_config={
            "hidden_size": spec.vision_hidden,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "intermediate_size": spec.vision_hidden * 4,
            "image_size": [spec.image_size, spec.image_size],
            "patch_size": [spec.patch_size, spec.patch_size],
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": max(len(tokenizer), spec.model_vocab_size or 0),
            "hidden_size": spec.text_hidden,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "intermediate_size": spec.text_intermediate,
            "max_position_embeddings": spec.max_position_embeddings,
            "tie_word_embeddings": True,
            "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END),
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        image_seq_length=spec.image_seq_length,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )
    model = InternVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@dataclass(frozen=True)
class WarmupExample:
    question: str
    image_path: Path
    response: str


def warmup_examples(
    synth_dir: Path,
    template: str = "en",
    prior_bias: float = 0.0,
    seed: int = 0,
    prior_in_reasoning: bool = False,
) -> list[WarmupExample]:
    """Supervised targets from the train split: worked solutions and descriptions.

    ``prior_bias`` is the share of closed examples whose final answer line is replaced by
    the dataset's most common answer (the worked steps stay as they are). It gives the
    starting model a language-prior shortcut like the ones real VLMs learn from skewed
    SFT data: it learns to read the image, yet its greedy answer leans to one label.
    Correctness-based pairs of its own samples are what MPO uses to repair exactly that.
    """
    if not 0.0 <= prior_bias <= 1.0:
        raise ValueError(f"prior_bias must lie in [0, 1], got {prior_bias}")
    rng = random.Random(seed)
    meta = json.loads((synth_dir / "meta.json").read_text())
    examples = []
    for entry in meta.values():
        root = Path(entry["root"])
        rows = [json.loads(line) for line in Path(entry["annotation"]).read_text().splitlines()]
        answers = Counter(str(row["answer"]) for row in rows if "solution" in row)
        for row in rows:
            if "solution" in row:
                response = str(row["solution"])
                if answers and rng.random() < prior_bias:
                    prior = answers.most_common(1)[0][0]
                    response = (
                        synth.as_if_answered(response, str(row["answer"]), prior)
                        if prior_in_reasoning
                        else synth.with_final_answer(response, prior)
                    )
                examples.append(
                    WarmupExample(apply_template(row["question"], template), root / row["image"], response)
                )
            elif row.get("chosen"):
                examples.append(WarmupExample(row["question"], root / row["image"], row["chosen"]))
    if not examples:
        raise ValueError(f"no warm-up examples found under {synth_dir}")
    return examples


def warmup(
    model: Any,
    processor: Any,
    examples: list[WarmupExample],
    steps: int,
    seed: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    warmup_steps: int = 20,
    vision_lr_scale: float = 1.0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Plain supervised fine-tuning (cross-entropy on responses), AdamW + warmup/cosine.

    ``vision_lr_scale`` multiplies the learning rate of the vision tower and the projector:
    from random weights the language model learns the answers' text prior long before it
    learns to read the image, and a faster-moving vision side brings reading forward.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cache: dict[int, Encoded] = {}

    def encoded(index: int) -> Encoded:
        if index not in cache:
            ex = examples[index]
            with Image.open(ex.image_path) as image:
                cache[index] = encode(processor, ex.question, [image.convert("RGB")], ex.response)
        return cache[index]

    vision = [p for name, p in model.named_parameters() if not name.startswith("model.language_model.")]
    vision_ids = {id(p) for p in vision}
    text = [p for p in model.parameters() if id(p) not in vision_ids]
    optimizer = torch.optim.AdamW(
        [{"params": text, "lr": lr}, {"params": vision, "lr": lr * vision_lr_scale}], weight_decay=0.0
    )

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    pad_id = processor.tokenizer.pad_token_id
    for step in range(steps):
        batch = collate([encoded(rng.randrange(len(examples))) for _ in range(batch_size)], pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return losses


@dataclass(frozen=True)
class WarmupRecipe:
    """How the tiny model is taught before the pipeline sees it (0 steps: random weights).

    The pipeline only has something to sample, judge and pair once the model answers
    some prompts right, so the demo warms it up with plain supervised learning first.
    """

    steps: int = 0
    lr: float = 1e-3
    vision_lr_scale: float = 1.0
    prior_bias: float = (
        0.0  # share of closed examples taught the dataset's most common answer (warmup_examples)
    )
    prior_in_reasoning: bool = (
        False  # those examples also state the prior in their steps (synth.as_if_answered)
    )

    def summary(self) -> dict[str, Any]:
        """The recipe under ``warmup_*`` keys, as ``tiny_model.json`` records it."""
        return {f"warmup_{key}": value for key, value in asdict(self).items()}


def build_tiny_model(
    out: Path,
    seed: int = 0,
    synth_dir: Path | None = None,
    spec: TinyModelSpec | None = None,
    recipe: WarmupRecipe = WarmupRecipe(),
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Build, optionally warm up, and save the tiny model to ``out``; return a summary."""
    spec = spec or TinyModelSpec()
    tokenizer = build_tokenizer(spec, seed)
    processor = build_processor(spec, tokenizer)
    model = build_model(spec, tokenizer, seed)
    losses: list[float] = []
    if recipe.steps:
        if synth_dir is None:
            raise ValueError("warm-up needs synthetic data: pass synth_dir (mpo synth output)")
        examples = warmup_examples(
            Path(synth_dir),
            prior_bias=recipe.prior_bias,
            seed=seed,
            prior_in_reasoning=recipe.prior_in_reasoning,
        )
        losses = warmup(
            model,
            processor,
            examples,
            recipe.steps,
            seed,
            lr=recipe.lr,
            vision_lr_scale=recipe.vision_lr_scale,
            on_step=on_step,
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "image_size": spec.image_size,
        "image_seq_length": spec.image_seq_length,
        **recipe.summary(),
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "seed": seed,
    }
    (out / "tiny_model.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def ensure_tiny_model(
    out: Path,
    seed: int,
    recipe: WarmupRecipe,
    spec: TinyModelSpec,
    datasets: tuple[str, ...],
    warmup_count: int,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """The tiny model at ``out`` built with this recipe: kept when ``tiny_model.json`` records the same
    recipe (so every finished stage that used it stays valid), else built, warmed up on its own
    synthetic images (``seed + 1``, ``warmup_count`` per dataset), and recorded."""
    from mpo.io import atomic_write_text

    wanted = {
        **recipe.summary(),
        "seed": seed,
        "datasets": list(datasets),
        "warmup_count": warmup_count,
        "image_size": spec.image_size,
    }
    recorded = out / "tiny_model.json"
    previous = json.loads(recorded.read_text()) if recorded.exists() else {}
    if previous and all(previous.get(key) == value for key, value in wanted.items()):
        return dict(previous)
    warmup_data = out.parent / f"{out.name}-warmup-data"
    if recipe.steps:
        synth.generate(
            warmup_data, count=warmup_count, seed=seed + 1, heldout_fraction=0.0, datasets=datasets
        )
    summary = build_tiny_model(
        out,
        seed=seed,
        synth_dir=warmup_data if recipe.steps else None,
        spec=spec,
        recipe=recipe,
        on_step=on_step,
    )
    summary.update(wanted)
    atomic_write_text(recorded, json.dumps(summary, indent=2) + "\n")
    return summary
