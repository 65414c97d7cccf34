"""The shared R1 parser and each grader, against tables of tricky
completions (the reward hacks of spec A.5)."""

import pytest

from nanoseek.tasks import get_task, make_completion, parse_completion, parse_int, wire
from nanoseek.tasks.countdown import InvalidExpression, evaluate

R = "<think>let me add</think>\n"  # a well-formed reasoning prefix


# -- the format parser -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, prefilled, answer, fmt, violation",
    [
        (R + "<answer>42</answer>", None, "42", 1.0, None),
        # prompt prefilled with <think>
        ("let me add</think>\n<answer>42</answer>", None, "42", 1.0, None),
        ("let me add</think>\n<answer>42</answer>", True, "42", 1.0, None),
        # the opening tag is missing
        ("let me add</think>\n<answer>42</answer>", False, "42", 0.75, "think_tags"),
        # a second <think> after the prefilled one
        (R + "<answer>42</answer>", True, "42", 0.75, "think_tags"),
        (
            "  \n" + R + "<answer> 42 </answer>\n\n",
            None,
            "42",
            1.0,
            None,
        ),  # whitespace around is fine
        ("<answer>42</answer>", None, "42", 0.5, "think_tags"),  # right answer, no reasoning at all
        ("<think></think><answer>42</answer>", None, "42", 0.75, "empty_think"),
        ("<think> \n </think><answer>42</answer>", None, "42", 0.75, "empty_think"),
        # two think blocks
        ("<think>a</think><think>b</think><answer>42</answer>", None, "42", 0.5, "think_tags"),
        # nested think
        ("<think>a<think>b</think></think><answer>42</answer>", None, "42", 0.5, "think_tags"),
        (R + "So the answer is <answer>42</answer>", None, "42", 0.75, "text_before_answer"),
        (R + "The answer is 42.", None, None, 0.5, "no_answer"),  # answer outside the tags
        (R + "<answer></answer>", None, None, 0.75, "empty_answer"),
        (R + "<answer>   </answer>", None, None, 0.75, "empty_answer"),
        # several guesses
        (R + "<answer>41</answer><answer>42</answer>", None, None, 0.5, "repeated_answer_tags"),
        # TinyZero#66
        (R + "<answer>42</answer>" + "</answer>" * 200, None, None, 0.5, "repeated_answer_tags"),
        # nested answer
        (R + "<answer><answer>42</answer></answer>", None, None, 0.5, "repeated_answer_tags"),
        (R + "<answer>42</answer> or maybe 43", None, None, 0.5, "trailing_text"),
        (R + "<answer>42</answer><think>more</think>", None, None, 0.25, "answer_inside_think"),
        ("<think>hmm <answer>42</answer></think>", None, None, 0.5, "answer_inside_think"),
        (R + "<answer>" + "4" * 300 + "</answer>", None, None, 0.75, "answer_too_long"),
        ("", None, None, 0.0, "no_answer"),
        ("42", None, None, 0.0, "no_answer"),
    ],
)
def test_parse_completion_rules(text, prefilled, answer, fmt, violation):
    parsed = parse_completion(text, think_prefilled=prefilled)
    assert parsed.answer == answer
    assert parsed.format == pytest.approx(fmt)
    assert (violation in parsed.violations) if violation else parsed.violations == ()


def test_make_completion_round_trips():
    for prefilled in (False, True):
        text = make_completion("step 1\nstep 2", "17", think_prefilled=prefilled)
        parsed = parse_completion(text, think_prefilled=prefilled)
        assert (parsed.think, parsed.answer, parsed.format) == ("step 1\nstep 2", "17", 1.0)


@pytest.mark.parametrize(
    "text, value",
    [
        ("42", 42),
        (" -7 ", -7),
        ("+5", 5),
        ("1,234", 1234),
        ("1,234,567", 1234567),
        ("1 234 567", 1234567),
        ("１２３", 123),
        ("\u221212", -12),
        ("007", 7),
        ("12, 13", None),
        ("12 or 13", None),
        ("about 12", None),
        ("12.0", None),
        ("1,23", None),
        ("1,234 567", None),
        ("1e3", None),
        ("", None),
        ("twelve", None),
        ("12 13", None),
        ("--3", None),
    ],
)
def test_parse_int(text, value):
    assert parse_int(text) == value


def test_parse_int_units():
    assert parse_int("12 apples", ("apples",)) == 12
    assert parse_int("12个", ("个",)) == 12
    assert parse_int("12 pears", ("apples",)) is None
    assert parse_int("12 apples apples", ("apples",)) is None


# -- arithmetic ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arith_problem():
    task = get_task("arithmetic")
    return task.problem(
        key="1000+234",
        lang="en",
        prompt="What is 1000 + 234?",
        answer="1234",
        reasoning="...",
        a=1000,
        b=234,
        op="+",
    )


@pytest.mark.parametrize(
    "answer, accuracy",
    [
        ("1234", 1.0),
        ("1,234", 1.0),
        ("1 234", 1.0),
        ("１２３４", 1.0),
        # partial credit, units first
        ("1235", 0.5 * 3 / 4),
        ("1334", 0.5 * 3 / 4),
        ("4321", 0.0),
        ("9999", 0.0),
        ("123", 0.0),
        ("12340", 0.0),
        ("-1234", 0.0),  # wrong length or sign: nothing
        ("1233, 1234, 1235", 0.0),
        ("1234 or 1235", 0.0),
        ("1234.0", 0.0),
        ("x=1234", 0.0),
    ],
)
def test_arithmetic_answers(arith_problem, answer, accuracy):
    reward = get_task("arithmetic").grade(arith_problem, R + f"<answer>{answer}</answer>")
    assert reward.accuracy == pytest.approx(accuracy)
    assert reward.correct == (accuracy == 1.0)


def test_arithmetic_partial_credit_can_be_turned_off(arith_problem):
    assert (
        get_task("arithmetic", partial_credit=False)
        .grade(arith_problem, R + "<answer>1235</answer>")
        .accuracy
        == 0
    )


def test_reward_total_uses_the_weights(arith_problem):
    no_think = "<answer>1234</answer>"  # accuracy 1, format 0.5
    assert get_task("arithmetic").grade(arith_problem, no_think).total == pytest.approx(
        1.0 + 0.1 * 0.5
    )
    task = get_task("arithmetic", accuracy_weight=2.0, format_weight=0.5)
    assert task.grade(arith_problem, no_think).total == pytest.approx(2.0 + 0.5 * 0.5)


def test_a_hacked_completion_never_beats_an_honest_one(arith_problem):
    task = get_task("arithmetic")
    honest = task.grade(arith_problem, R + "<answer>1234</answer>").total
    hacks = [
        R + "<answer>1234</answer>" * 3,
        R + "<answer>1234</answer></answer>",
        R + "<answer></answer>",
        R + "<answer>1234 1234</answer>",
        "<answer>1234</answer> 1234",
        R + "1234",
        "<think>1234</think>",
    ]
    for hack in hacks:
        assert task.grade(arith_problem, hack).total < honest, hack


# -- countdown -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def countdown_problem():
    task = get_task("countdown")
    return task.problem(
        key="[2, 3, 7, 9]->50",
        lang="en",
        prompt="...",
        answer="(7 + 9) * 3 + 2",
        reasoning="...",
        numbers=[2, 9, 7, 3],
        target=50,
    )


@pytest.mark.parametrize(
    "answer",
    [
        "(7 + 9) * 3 + 2",
        "(7+9)*3+2",
        "(7 + 9) × 3 + 2",
        "2 + 3 * (9 + 7)",
        "((7 + 9) * 3) + 2",
        "(7 + 9) * 3 + 2 = 50",
        "(7 + 9) * 3 + 2 =50",
    ],
)
def test_countdown_accepts_correct_forms(countdown_problem, answer):
    assert get_task("countdown").score(countdown_problem, answer) == (1.0, None)


@pytest.mark.parametrize(
    "answer, accuracy, reason",
    [
        ("(9 + 7) * 3", 0.1, "wrong_value"),  # 48: well formed, uses given numbers, misses
        ("9 * 7 - 3 - 2", 0.1, "wrong_value"),
        ("(" * 45 + "2" + ")" * 45, 0.1, "wrong_value"),  # deep nesting is harmless
        (
            "(7 + 9) * 3 + 2 = 51",
            0.0,
            "bad_equation",
        ),  # "= target" is accepted, and only the target
        ("(7 + 9) * 3 + 2 = 50 = 50", 0.0, "bad_equation"),
        ("(9 - 2) * 7 + 3 - 2", 0.0, "numbers_not_given_or_reused"),  # 2 used twice
        ("7 * 7 + 3 - 2", 0.0, "numbers_not_given_or_reused"),  # 7 used twice
        ("50", 0.0, "numbers_not_given_or_reused"),  # a number that was not given
        ("(7 + 9) * 3 + 2 * 1", 0.0, "numbers_not_given_or_reused"),
        ("9 / (3 - 3)", 0.0, "invalid_expression: division by zero"),
        ("9 / (7 - 2 - 3 - 2)", 0.0, "invalid_expression: division by zero"),
        ("9 ** 7", 0.0, "invalid_expression: not allowed: Pow"),  # powers: huge-exponent attempts
        ("9 ** 9 ** 9 ** 9", 0.0, "invalid_expression: not allowed: Pow"),
        ("-2 + 9 * 7 - 3", 0.0, "invalid_expression: not allowed: USub"),
        ("9 // 2", 0.0, "invalid_expression: not allowed: FloorDiv"),
        ("2.0 * 25", 0.0, "invalid_expression: characters"),
        ("__import__('os').system('true')", 0.0, "invalid_expression: characters"),
        ("(7 + 9) * 3 + 2, 9 * 7", 0.0, "invalid_expression: characters"),  # a list of guesses
        ("(2 + 3", 0.0, "invalid_expression: syntax"),
        ("02 * 25", 0.0, "invalid_expression: syntax"),
        ("(" * 60 + "2" + ")" * 60, 0.0, "invalid_expression: too long"),
    ],
)
def test_countdown_rejections(countdown_problem, answer, accuracy, reason):
    assert get_task("countdown").score(countdown_problem, answer) == (accuracy, reason)


def test_countdown_numbers_count_as_a_multiset():
    task = get_task("countdown")
    p = task.problem(
        key="k", lang="en", prompt="", answer="9 * 2", reasoning="", numbers=[2, 2, 9], target=18
    )
    assert task.score(p, "9 * 2") == (1.0, None)  # a subset of the numbers is enough
    assert task.score(p, "9 * 2 * 2 / 2")[0] == 0.0  # 2 is given twice, used three times
    assert task.score(p, "9 / (2 - 2)")[0] == 0.0


def test_evaluate_is_exact():
    assert evaluate("1 / 3 * 3") == (1, [1, 3, 3])  # rational arithmetic: no float rounding
    with pytest.raises(InvalidExpression):
        evaluate("(1).__class__")


def test_countdown_full_completion_in_chinese():
    task = get_task("countdown")
    p = task.generate(1, seed=5, difficulty=2, lang="zh")[0]
    assert "组成一个等于" in p.prompt
    assert task.grade(p, f"<think>试一试</think>\n<answer>{p.answer}</answer>").correct
    assert task.grade(p, f"<think>试一试</think>\n答案是 {p.answer}").accuracy == 0.0


# -- word problems ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_word_problem_answers(lang):
    task = get_task("word_problems")
    for p in task.generate(30, seed=2, difficulty=2, lang=lang):
        unit = p.metadata["units"][0]
        value = int(p.answer)
        assert task.grade(p, R + f"<answer>{value}</answer>").correct
        assert task.grade(p, R + f"<answer>{value} {unit}</answer>").correct
        assert task.grade(p, R + f"<answer>{value}{unit}</answer>").correct
        assert task.grade(p, R + f"<answer>{value + 1}</answer>").accuracy == 0.0
        assert task.grade(p, R + f"<answer>{value}, {value + 1}</answer>").accuracy == 0.0
        assert task.grade(p, R + f"<answer>{value} {value}</answer>").accuracy == 0.0


# -- passkey ---------------------------------------------------------------------------------------


def test_passkey_exact_match_only():
    task = get_task("passkey")
    p = task.make(2000, 0.5, key="48213")
    assert task.grade(p, R + "<answer>48213</answer>").correct
    assert task.grade(p, R + "<answer>４８２１３</answer>").correct  # full-width digits
    for wrong in ("4821", "482130", "48213 48213", "The pass key is 48213", "48213."):
        assert task.grade(p, R + f"<answer>{wrong}</answer>").accuracy == 0.0, wrong


# -- code: values on the grading channel ----------------------------------------------------------


def test_values_cross_the_channel_as_plain_data():
    """The code grader decodes what the candidate's process sends into fresh builtin objects, each
    type kept apart (a tuple stays a tuple, True stays True), and nothing else."""
    values = [
        None,
        True,
        0,
        -7,
        2**80,
        1.5,
        float("inf"),
        "x\n",
        b"\x00",
        [1, (2, 3)],
        {"a": {1: {2}}},
        frozenset({1}),
        (),
    ]
    decoded = wire.decode(wire.encode(values))
    assert decoded == values
    assert [type(v) for v in decoded] == [type(v) for v in values]


@pytest.mark.parametrize(
    "line",
    [
        '{"tuple": 1}',
        '{"evil": []}',
        '{"tuple": [], "set": []}',
        '{"dict": [[1]]}',
        '{"set": [[1]]}',
        "[" * 100 + "]" * 100,
        "1e999999x",
    ],
)
def test_channel_rejects_what_is_not_an_encoded_value(line):
    with pytest.raises((ValueError, TypeError)):
        wire.decode(line)


@pytest.mark.parametrize(
    "value",
    [
        type("Yes", (int,), {})(1),
        type("Yes", (str,), {})("a"),
        type("L", (list,), {})(),
        object(),
        iter([1]),
    ],
)
def test_channel_refuses_other_types(value):
    with pytest.raises(TypeError):
        wire.encode(value)
