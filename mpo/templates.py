"""Chain-of-thought prompt templates (InternVL's MPO pipeline), kept as data.

A dataset picks its template by id (``prompt_version`` in the samples table). Before
templating, the short-answer instructions that VQA datasets append are stripped (they
would contradict "reason step by step"), and a single ``<image>`` placeholder is moved
to the front of the question.
"""

from __future__ import annotations

import re

IMAGE_PLACEHOLDER = "<image>"

TEMPLATES: dict[str, str] = {
    "en": (
        "Your task is to answer the question below. Give step by step reasoning before you answer, "
        'and when you\'re ready to answer, please use the format "Final answer: .."\n\n'
        "Question:\n\n{question}"
    ),
    "en_v2": (
        "{question}\nAnswer the preceding question. The last line of your response should follow this "
        "format: 'Answer: \\boxed{{$FINAL_ANSWER}}' (without quotes), where 'FINAL_ANSWER' is your "
        "conclusion based on the reasoning provided. If you are uncertain or the problem is too complex, "
        "make a reasoned guess based on the information provided. Avoid repeating steps indefinitely—"
        "provide your best guess even if unsure. Think step by step logically, considering all relevant "
        "information before answering."
    ),
    "r1": (
        "{question}\nFirst think about the reasoning process in the mind, enclosed within <think> </think> "
        "tags, and then put the final answer within \\boxed{{}}."
    ),
    "zh": (
        '你的任务是回答下面的问题。请先逐步推理，然后再给出答案，回答时请使用格式"答案: .."\n\n问题:\n\n{question}'
    ),
}

SHORT_ANSWER_INSTRUCTIONS: tuple[str, ...] = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Answer with the option letter from the given choices directly.",
    "Please answer Yes or No.",
    "Please answer yes or no.",
    "Answer the question with a single word.",
    "Please put your final answer within \\boxed{}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "请直接回答选项字母。",
    "请用一个单词或短语回答问题。",
)


def strip_short_answer_instructions(question: str) -> str:
    """Remove the short-answer instructions listed above, wherever they stand."""
    for instruction in SHORT_ANSWER_INSTRUCTIONS:
        question = question.replace(instruction, "")
    return re.sub(r"\n{3,}", "\n\n", question).strip()


def apply_template(question: str, template: str) -> str:
    """Return the CoT prompt for ``question`` under template id ``template``."""
    if template not in TEMPLATES:
        raise KeyError(f"unknown prompt template {template!r}; known: {sorted(TEMPLATES)}")
    cleaned = strip_short_answer_instructions(question)
    has_single_image = cleaned.count(IMAGE_PLACEHOLDER) == 1
    body = cleaned.replace(IMAGE_PLACEHOLDER, "").strip() if has_single_image else cleaned
    prompt = TEMPLATES[template].format(question=body)
    return f"{IMAGE_PLACEHOLDER}\n{prompt}" if has_single_image else prompt
