"""Every extraction and verifier rule, and the reference pipeline's bugs, pinned."""

import pytest

from mpo.answers import (
    Verdict,
    VerifyMode,
    anls_similarity,
    choice_letter,
    extract_answer,
    is_correct,
    judge,
    last_boxed,
    normalize_text,
    parse_number,
)

# ------------------------------------------------------------- extraction


def test_en_splits_on_the_last_trigger() -> None:
    response = "Answer: maybe 4.\nLet me recount.\nFinal answer: 5"
    assert extract_answer(response, "en") == "5"
    assert extract_answer("I think... Final Answer: blue.", "en") == "blue"
    assert extract_answer("Final answer: 3\nThat is all.", "en") == "3"
    assert extract_answer("Final answer: \\boxed{7}", "en") == "7"


def test_zh_triggers() -> None:
    assert extract_answer("数一数。答案: 3", "zh") == "3"
    assert extract_answer("数一数。答案：红色", "zh") == "红色"


def test_boxed_is_brace_matched_and_last() -> None:
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{2} and \\boxed{unclosed") == "2"
    assert extract_answer("Reasoning.\nAnswer: \\boxed{42}", "en_v2") == "42"


def test_en_v2_without_boxed_is_a_format_failure() -> None:
    # The reference took these as answers.
    assert extract_answer("Reasoning.\nAnswer: 42", "en_v2") is None


def test_r1_needs_closed_think_then_boxed() -> None:
    assert extract_answer("<think>3 circles \\boxed{9}</think> So \\boxed{3}", "r1") == "3"
    assert extract_answer("<think>still thinking \\boxed{3}", "r1") is None
    assert extract_answer("<think>x</think> The answer is 3", "r1") is None


@pytest.mark.parametrize(
    "response", ["", "I am not sure.", "Final answer:", "Final answer:   \n", "Final answer: ."]
)
def test_no_parsable_answer_is_a_format_failure(response: str) -> None:
    assert extract_answer(response, "en") is None
    assert judge(response, "3", "en", VerifyMode.EXACT) == (Verdict.FORMAT_FAILURE, None)


# ------------------------------------------------------------- exact (VQA normalisation)


@pytest.mark.parametrize(
    "prediction,gold",
    [
        ("Red", "red"),
        ("the red one", "red one"),
        ("Two", "2"),
        ("yes.", "Yes"),
        ("1,000", "1000"),
        ("**blue**", "blue"),
        ("A dog", "dog"),
    ],
)
def test_exact_match_after_normalisation(prediction: str, gold: str) -> None:
    assert is_correct(prediction, gold, VerifyMode.EXACT)


@pytest.mark.parametrize("prediction,gold", [("12", "2"), ("2.5", "2"), ("red", "reddish"), ("no", "yes")])
def test_exact_mismatch(prediction: str, gold: str) -> None:
    assert not is_correct(prediction, gold, VerifyMode.EXACT)


def test_normalisation_keeps_decimal_points() -> None:
    assert normalize_text("It is 2.5.") == "it is 2.5"


# ------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    "prediction", ["B", "(B)", "B.", "B)", "**B**", "B. 3", "b", "Option B", "(B) three"]
)
def test_choice_letter_forms(prediction: str) -> None:
    assert choice_letter(prediction) == "B"
    assert is_correct(prediction, "B", VerifyMode.CHOICE)
    assert is_correct(prediction, "(B)", VerifyMode.CHOICE)


def test_choice_letters_reach_n() -> None:
    assert is_correct("N", "N", VerifyMode.CHOICE) and choice_letter("O") is None


def test_choice_wrong_letter() -> None:
    assert not is_correct("C", "B", VerifyMode.CHOICE)


@pytest.mark.parametrize("prediction,gold", [("2.5", "2"), ("3.14", "3")])
def test_reference_bug_choice_cut_at_period(prediction: str, gold: str) -> None:
    """The reference cut any answer whose 2nd char is '.' to its 1st char: 2.5 -> 2 was correct."""
    for mode in VerifyMode:
        if mode is not VerifyMode.ANLS:
            assert not is_correct(prediction, gold, mode), mode


# ------------------------------------------------------------- numeric


@pytest.mark.parametrize(
    "prediction,gold",
    [
        ("12.0", "12"),
        ("3/10", "0.3"),
        ("30%", "30"),
        ("90°", "90"),
        ("90 degrees", "90"),
        ("5 cm", "5"),
        ("$1,200", "1200"),
        ("three", "3"),
        ("-4", "-4"),
        ("0.33333", "1/3"),
    ],
)
def test_numeric_equal(prediction: str, gold: str) -> None:
    assert is_correct(prediction, gold, VerifyMode.NUMERIC, rel_tol=1e-4)


@pytest.mark.parametrize(
    "prediction,gold", [("12", "2"), ("2.5", "2"), ("0.3", "3"), ("seven", "6"), ("none", "5")]
)
def test_numeric_not_equal(prediction: str, gold: str) -> None:
    assert not is_correct(prediction, gold, VerifyMode.NUMERIC)


def test_parse_number_edge_cases() -> None:
    assert parse_number("no number") is None
    assert parse_number("1/0") is None
    assert parse_number("between 3 and 4, so 4") == 4.0


# ------------------------------------------------------------- ANLS


def test_anls_is_similarity_not_distance() -> None:
    assert anls_similarity("invoice 123", "invoice 123") == 1.0
    assert anls_similarity("Invoice  123", "invoice 123") == 1.0
    assert anls_similarity("zzzz", "invoice 123") == pytest.approx(0.0)
    assert is_correct("invoice 124", "invoice 123", VerifyMode.ANLS)  # similarity 10/11


def test_reference_bug_anls_inverted() -> None:
    """The reference used max(acc, dist/len): 'zzzz' came out correct for 'invoice 123'."""
    assert not is_correct("zzzz", "invoice 123", VerifyMode.ANLS)


def test_anls_threshold_and_several_golds() -> None:
    assert anls_similarity("abcd", "abxy") == 0.5
    assert is_correct("abcd", "abxy", VerifyMode.ANLS)
    assert not is_correct("abcd", "axyz", VerifyMode.ANLS)
    assert is_correct("total", ["sum", "Total"], VerifyMode.ANLS)


# ------------------------------------------------------------- judge


def test_reference_bug_answer_fix_never_rewrites() -> None:
    """The reference rewrote a wrong '12' into the gold '2' inside a rejected response."""
    response = "I count twelve.\nFinal answer: 12"
    verdict, answer = judge(response, "2", "en", VerifyMode.NUMERIC)
    assert verdict is Verdict.WRONG and answer == "12"
    assert response == "I count twelve.\nFinal answer: 12"


def test_judge_correct() -> None:
    assert judge("Two circles.\nFinal answer: 2", "2", "en", "numeric") == (Verdict.CORRECT, "2")


def test_auto_mode_follows_the_gold_answers_shape() -> None:
    from mpo.answers import auto_mode

    assert [
        auto_mode(g)
        for g in ("B", "(c)", "12", "-3.5", "3/10", "45 degrees", "$5", "Route 66", "red", "A cat")
    ] == [
        "choice",
        "choice",
        "numeric",
        "numeric",
        "numeric",
        "numeric",
        "numeric",
        "exact",
        "exact",
        "exact",
    ]
    assert (
        is_correct("12.0", "12", "auto")
        and is_correct("B", "(b)", "auto")
        and not is_correct("66", "Route 66", "auto")
    )
