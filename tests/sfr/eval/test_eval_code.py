import gzip
import json
import math

import pytest

from sfr.eval.code import assemble_program, build_prompt, evaluate_code, extract_code, load_problems, score_completions

pytestmark = [pytest.mark.filterwarnings("ignore:sandbox:RuntimeWarning")]

HUMANEVAL_RECORD = {
    "task_id": "Toy/0",
    "prompt": 'def add_one(x: int) -> int:\n    """Return x plus one.\n    >>> add_one(1)\n    2\n    """\n',
    "entry_point": "add_one",
    "canonical_solution": "    return x + 1\n",
    "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-5) == -4\n",
}
MBPP_RECORD = {
    "task_id": 901,
    "prompt": "Write a function to return the square root of the sum of squares of two numbers.",
    "code": "import math\ndef hypot2(a, b):\n    return math.sqrt(a * a + b * b)",
    "test_imports": ["import math"],
    "test_list": ["assert math.isclose(hypot2(3, 4), 5.0)", "assert hypot2(0, 0) == 0"],
}


@pytest.fixture
def toy_files(tmp_path):
    he = tmp_path / "he.jsonl.gz"
    with gzip.open(he, "wt") as f:
        f.write(json.dumps(HUMANEVAL_RECORD) + "\n")
    mbpp = tmp_path / "mbpp.json"
    mbpp.write_text(json.dumps([MBPP_RECORD]))
    return he, mbpp


def test_load_and_assemble_toy_records(toy_files):
    (he,), (mb,) = load_problems(toy_files[0]), load_problems(toy_files[1])
    assert he.kind == "humaneval" and he.entry_point == "add_one" and mb.kind == "mbpp" and mb.task_id == "901"
    program = assemble_program(he, "    return x + 1\n")
    assert program.startswith(HUMANEVAL_RECORD["prompt"]) and program.rstrip().endswith("check(add_one)")
    assert assemble_program(mb, "def hypot2(a, b): pass").startswith("import math\ndef hypot2")
    assert build_prompt(he) == HUMANEVAL_RECORD["prompt"]
    text = build_prompt(mb)
    assert text.startswith("You are an expert Python programmer, and here is your task: Write a function")
    assert "Your code should pass these tests:\n\nassert math.isclose" in text and text.endswith("[BEGIN]\n")
    chat = build_prompt(mb, "chat")
    assert chat[0]["role"] == "user" and "```python" in chat[0]["content"]


def test_extract_code_stop_sequences_and_fences(toy_files):
    (he,), (mb,) = load_problems(toy_files[0]), load_problems(toy_files[1])
    assert extract_code(he, "    return x + 1\n\ndef unrelated():\n    pass\n") == "    return x + 1\n"
    assert extract_code(he, "    return x + 1\n\nprint(add_one(3))") == "    return x + 1\n"
    assert extract_code(mb, "def f():\n    return 1\n[DONE]\nmore text") == "def f():\n    return 1\n"
    reply = "Sure! Here it is:\n```python\ndef add_one(x):\n    return x + 1\n```\nHope it helps."
    assert extract_code(he, reply, "chat") == "def add_one(x):\n    return x + 1\n"
    assert extract_code(mb, "```\nprint(1)\n```", "completion") == "print(1)\n"


def test_score_completions_counts_and_pass_at_k(toy_files):
    problems = load_problems(toy_files[0]) + load_problems(toy_files[1])
    he_samples = ["    return x + 1\n", "    return x + 2\n", "    import os\n    os._exit(0)\n",
                  "    while True:\n        pass\n", "    return x + 1\n"]
    mbpp_samples = [MBPP_RECORD["code"], "def hypot2(a, b):\n    return a + b", "def hypot2(a, b) return",
                    MBPP_RECORD["code"] + "\nexit(0)", "```python\n" + MBPP_RECORD["code"] + "\n```"]
    report = score_completions(problems, [he_samples, mbpp_samples], k=(1, 2, 5), timeout=1.5, progress=False)
    he_row, mb_row = report["problems"]
    assert (he_row["n"], he_row["c"]) == (5, 2)
    assert he_row["statuses"] == ["passed", "failed", "failed", "timeout", "passed"]
    assert (mb_row["n"], mb_row["c"]) == (5, 2)
    assert mb_row["statuses"] == ["passed", "failed", "error", "failed", "passed"]
    assert he_row["pass@2"] == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    assert report["pass_at_k"]["pass@1"] == pytest.approx(0.4) and report["pass_at_k"]["pass@5"] == 1.0
    assert report["sandbox"] in ("bwrap", "rlimit")
    json.dumps(report)  # JSON-serialisable
    with pytest.raises(ValueError, match="k=10 > n=5"):
        score_completions(problems, [he_samples, mbpp_samples], k=(1, 10), progress=False)


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")
    weird = tmp_path / "weird.jsonl"
    weird.write_text(json.dumps({"question": "?", "answer": 42}) + "\n")
    with pytest.raises(ValueError, match="unknown code data format"):
        load_problems(weird)
    broken = tmp_path / "broken.json"
    broken.write_text("[{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_problems(broken)
    broken_line = tmp_path / "broken.jsonl"  # a JSON-lines file with a bad third line: that line is named
    broken_line.write_text("\n".join([json.dumps({"task_id": "a"}), json.dumps({"task_id": "b"}), '{"task_id": "c,}']))
    with pytest.raises(ValueError, match=r'broken.jsonl.: line 3 is not valid JSON \(.*\): \{"task_id": "c,\}$'):
        load_problems(broken_line)
    with pytest.raises(ValueError, match="k=10 > n=5"):
        evaluate_code("sfr-tiny", weird, n=5, k=(1, 10))


@pytest.mark.parametrize("name", ["humaneval/HumanEval.jsonl.gz", "mbpp/sanitized-mbpp.json"])
def test_canonical_solutions_pass_and_wrong_ones_fail(shared_data, name):
    path = shared_data / name
    if not path.exists():
        pytest.skip(f"{path} not found")
    problems = load_problems(path, limit=6)
    assert len(problems) == 6
    right = [[p.canonical_solution] for p in problems]
    wrong = [["    return None\n" if p.kind == "humaneval" else "def nothing():\n    return None\n"] for p in problems]
    good = score_completions(problems, right, k=(1,), timeout=5.0, progress=False)
    assert good["pass_at_k"]["pass@1"] == 1.0, [r["first_failure"] for r in good["problems"]]
    bad = score_completions(problems, wrong, k=(1,), timeout=5.0, progress=False)
    assert bad["pass_at_k"]["pass@1"] == 0.0


def test_embedded_problems_canonical_solutions_pass_and_wrong_ones_fail():
    from sfr.eval.code import EMBEDDED_PROBLEMS

    problems = load_problems(None)
    assert [p.task_id for p in problems] == [r["task_id"] for r in EMBEDDED_PROBLEMS] and len(problems) == 5
    assert all(p.kind == "humaneval" for p in problems) and len(load_problems(None, limit=2)) == 2
    # as a completion-style model would answer (the body), and as a chat model would (the whole function)
    bodies = [[p.canonical_solution, "    pass\n"] for p in problems]
    report = score_completions(problems, bodies, k=(1, 2), timeout=5.0, progress=False)
    assert [row["statuses"] for row in report["problems"]] == [["passed", "failed"]] * 5
    assert report["pass_at_k"] == {"pass@1": 0.5, "pass@2": 1.0}
    whole = [["```python\n" + p.prompt + p.canonical_solution + "```"] for p in problems]
    assert score_completions(problems, whole, k=(1,), style="chat", timeout=5.0,
                             progress=False)["pass_at_k"]["pass@1"] == 1.0


def test_rlimit_fallback_warns_that_isolation_is_weaker(monkeypatch):
    from sfr.eval import sandbox

    if not sandbox.sandbox_available("rlimit"):
        pytest.skip("rlimit sandbox not usable here")
    monkeypatch.setattr(sandbox, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="weaker isolation"):
        result = sandbox.check_program("print('ok')\n", mode="rlimit")
    assert result.passed and result.sandbox == "rlimit"
