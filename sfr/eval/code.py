"""Code evaluation: HumanEval / MBPP pass@k with the generated programs run in the sandbox.

Data formats (detected from the records):

* **HumanEval** (``.jsonl`` or ``.jsonl.gz``): ``task_id, prompt, entry_point, canonical_solution, test``.
* **MBPP sanitized** (``.json`` list, or ``.jsonl``): ``task_id, prompt, code, test_imports, test_list``
  (the original MBPP's ``text`` is accepted in place of ``prompt``).

Prompts (:func:`build_prompt`), two styles:

* ``"completion"`` (base models). HumanEval: the problem's ``prompt`` as is (signature + docstring);
  the model continues the function body (Chen et al. 2021). MBPP: the task prompt of Austin et al.
  2021 (the format of their few-shot prompt, used zero-shot: without the three worked examples)::

      You are an expert Python programmer, and here is your task: {prompt} Your code should pass these tests:

      {test_list, one per line}
      [BEGIN]

  and the model writes the code, ended by ``[DONE]``.
* ``"chat"`` (instruction-tuned models; a one-message chat rendered by the tokenizer's chat template).
  HumanEval: "Complete the following Python function ..." with the prompt in a fenced block;
  MBPP: the task and its tests, asking for the code in a ```python block. ``"auto"`` picks chat when
  the tokenizer has a chat template.

Post-processing (:func:`extract_code`): the first fenced code block when there is one; else, in
completion style, the text up to the first stop sequence (:data:`HUMANEVAL_STOP`,
:data:`MBPP_STOP`). Program assembly (:func:`assemble_program`): HumanEval ``prompt + completion +
test + "check(entry_point)"`` (if the extracted code defines the entry point itself, it follows the
prompt and replaces its stub); MBPP ``test_imports + code + asserts``.
"""
from __future__ import annotations

import gzip
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from sfr.checks import check_int
from sfr.eval.metrics import pass_at_k
from sfr.eval.sandbox import check_program, sandbox_mode

PROMPT_STYLES = ("auto", "completion", "chat")
# Codex paper (Chen et al. 2021) stop sequences for HumanEval completions
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
MBPP_STOP = ("[DONE]", "\n[BEGIN]", "\nassert", "\nprint(", '\nif __name__', "\n```")
MBPP_PROMPT = ("You are an expert Python programmer, and here is your task: {prompt} "
               "Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")
MBPP_CHAT_PROMPT = ("{prompt}\nYour code should pass these tests:\n\n{tests}\n\n"
                    "Write the Python code in a single ```python code block.")
HUMANEVAL_CHAT_PROMPT = ("Complete the following Python function. Reply with the complete function in a "
                         "single ```python code block.\n\n```python\n{prompt}```")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclass
class CodeProblem:
    """One benchmark problem. ``kind``: "humaneval" or "mbpp"; ``tests``: test code (HumanEval: the
    ``check`` function; MBPP: the assert lines joined)."""

    task_id: str
    kind: str
    prompt: str
    tests: str
    entry_point: str | None = None
    canonical_solution: str | None = None
    test_imports: list[str] = field(default_factory=list)


def _read_records(path: Path) -> list[dict]:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read code data {str(path)!r}: {exc}") from exc
    from sfr.data import parse_json, parse_json_lines

    if text.lstrip().startswith("["):
        records = parse_json(text, repr(str(path)))
    else:
        records, _ = parse_json_lines(text.splitlines(), repr(str(path)))
    if not records or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{str(path)!r} holds no problem records (expected JSON objects)")
    return records


# The embedded default (``--data`` omitted): a few small problems of our own in the HumanEval format, so
# that ``sfr eval code`` runs offline with no data set. Far too easy to rank real models: use HumanEval /
# MBPP for that.
EMBEDDED_PROBLEMS = [
    {"task_id": "sfr/0", "entry_point": "add_one",
     "prompt": 'def add_one(x: int) -> int:\n    """Return x plus one.\n    >>> add_one(1)\n    2\n    """\n',
     "canonical_solution": "    return x + 1\n",
     "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-5) == -4\n"},
    {"task_id": "sfr/1", "entry_point": "reverse_words",
     "prompt": 'def reverse_words(text: str) -> str:\n    """Return the words of text in reverse order, separated by '
               'single spaces.\n    >>> reverse_words("arr matey ahoy")\n    \'ahoy matey arr\'\n    """\n',
     "canonical_solution": "    return ' '.join(reversed(text.split()))\n",
     "test": "def check(candidate):\n    assert candidate('arr matey ahoy') == 'ahoy matey arr'\n"
             "    assert candidate('  one  ') == 'one'\n    assert candidate('') == ''\n"},
    {"task_id": "sfr/2", "entry_point": "count_vowels",
     "prompt": 'def count_vowels(text: str) -> int:\n    """Count the vowels (a, e, i, o, u, either case) in text.\n'
               '    >>> count_vowels("Bon appetit")\n    4\n    """\n',
     "canonical_solution": "    return sum(ch in 'aeiouAEIOU' for ch in text)\n",
     "test": "def check(candidate):\n    assert candidate('Bon appetit') == 4\n    assert candidate('BEEP') == 2\n"
             "    assert candidate('xyz') == 0\n"},
    {"task_id": "sfr/3", "entry_point": "running_max",
     "prompt": 'def running_max(values: list) -> list:\n    """The maximum of values[:i + 1] for every i.\n'
               '    >>> running_max([1, 3, 2, 5])\n    [1, 3, 3, 5]\n    """\n',
     "canonical_solution": "    out = []\n    for v in values:\n        out.append(v if not out else max(out[-1], v))\n"
                           "    return out\n",
     "test": "def check(candidate):\n    assert candidate([1, 3, 2, 5]) == [1, 3, 3, 5]\n    assert candidate([]) == []\n"
             "    assert candidate([-2, -7]) == [-2, -2]\n"},
    {"task_id": "sfr/4", "entry_point": "is_palindrome",
     "prompt": 'def is_palindrome(text: str) -> bool:\n    """Whether text reads the same backwards, ignoring case and '
               'non-letters.\n    >>> is_palindrome("Never odd or even")\n    True\n    """\n',
     "canonical_solution": "    letters = [ch.lower() for ch in text if ch.isalpha()]\n    return letters == letters[::-1]\n",
     "test": "def check(candidate):\n    assert candidate('Never odd or even') is True\n"
             "    assert candidate('pirate') is False\n    assert candidate('') is True\n"},
]


def load_problems(path=None, limit: int | None = None) -> list[CodeProblem]:
    """Load HumanEval or MBPP problems from ``path`` (format detected from the record keys); ``None``:
    the embedded default (:data:`EMBEDDED_PROBLEMS`)."""
    check_int("limit", limit, optional=True)
    if path is None:
        records, path = [dict(r) for r in EMBEDDED_PROBLEMS][:limit], Path("<embedded>")
    else:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"code data file {str(path)!r} does not exist or is not a file")
        records = _read_records(path)[:limit]
    problems = []
    for record in records:
        problem = code_problem(record)
        if problem is None:
            raise ValueError(f"unknown code data format in {str(path)!r}: record keys {sorted(record)}; expected "
                             "HumanEval (task_id, prompt, entry_point, test) or MBPP (task_id, prompt, test_list)")
        problems.append(problem)
    return problems


def code_problem(record: dict) -> CodeProblem | None:
    """The :class:`CodeProblem` of a HumanEval or MBPP record (detected from its keys), else None."""
    keys = set(record)
    if {"task_id", "prompt", "entry_point", "test"} <= keys:
        return CodeProblem(str(record["task_id"]), "humaneval", record["prompt"], record["test"],
                           record["entry_point"], record.get("canonical_solution"))
    if {"task_id", "test_list"} <= keys and ({"prompt"} <= keys or {"text"} <= keys):
        return CodeProblem(str(record["task_id"]), "mbpp", record.get("prompt") or record["text"],
                           "\n".join(record["test_list"]), None, record.get("code"),
                           list(record.get("test_imports") or []))
    return None


def training_example(problem: CodeProblem) -> dict:
    """``{"prompt", "completion", "task_id"}`` for fine-tuning on a problem (``sfr prepare`` / ``sfr train``
    read HumanEval and MBPP files this way): the completion-style prompt of :func:`build_prompt` and the
    reference solution (HumanEval: the function body ``canonical_solution``; MBPP: the ``code``).
    ``ValueError`` for a problem without a reference solution."""
    if not problem.canonical_solution:
        field_name = "canonical_solution" if problem.kind == "humaneval" else "code"
        raise ValueError(f"code problem {problem.task_id!r} has no reference solution ({field_name!r}) to train on")
    return {"prompt": build_prompt(problem, "completion"), "completion": problem.canonical_solution,
            "task_id": problem.task_id}


def build_prompt(problem: CodeProblem, style: str = "completion"):
    """The model input for ``problem``: a string (completion style) or a one-message chat list."""
    if style not in ("completion", "chat"):
        raise ValueError(f"style must be 'completion' or 'chat', got {style!r}")
    if problem.kind == "humaneval":
        if style == "completion":
            return problem.prompt
        return [{"role": "user", "content": HUMANEVAL_CHAT_PROMPT.format(prompt=problem.prompt)}]
    template = MBPP_PROMPT if style == "completion" else MBPP_CHAT_PROMPT
    text = template.format(prompt=problem.prompt.strip(), tests=problem.tests)
    return text if style == "completion" else [{"role": "user", "content": text}]


def _truncate(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def extract_code(problem: CodeProblem, completion: str, style: str = "completion") -> str:
    """The code in a raw model ``completion``: first fenced block, else text up to a stop sequence."""
    fenced = _FENCE.search(completion)
    # a completion-style HumanEval body starts with indentation; a fence after it ends the code
    if fenced and (style == "chat" or completion.lstrip().startswith("```")):
        return fenced.group(1)
    if style == "chat":
        return completion
    return _truncate(completion, HUMANEVAL_STOP if problem.kind == "humaneval" else MBPP_STOP)


def assemble_program(problem: CodeProblem, code: str) -> str:
    """The full test program for one extracted ``code`` sample (see the module docstring)."""
    if problem.kind == "humaneval":
        defines_entry = re.search(rf"^def {re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE)
        # the prompt alone (signature + docstring) is valid Python, so a full function that follows it
        # simply replaces the stub; otherwise the code continues the prompt's function body
        body = problem.prompt + "\n" + code if defines_entry else problem.prompt + code
        return f"{body}\n\n{problem.tests}\n\ncheck({problem.entry_point})\n"
    imports = "\n".join(problem.test_imports)
    return f"{imports}\n{code}\n\n{problem.tests}\n"


def score_completions(problems: Sequence[CodeProblem], completions: Sequence[Sequence[str]],
                      k: Sequence[int] = (1, 5, 10), style: str = "completion", timeout: float = 3.0,
                      sandbox: str = "auto", workers: int | None = None, progress: bool = True) -> dict:
    """Run every completion's program in the sandbox and estimate pass@k (no model involved).

    ``completions[i]`` are the raw samples for ``problems[i]`` (post-processed by :func:`extract_code`).
    Returns a JSON-serialisable dict: ``pass_at_k`` (``{"pass@1": mean over problems, ...}``),
    ``problems`` (per problem: ``task_id``, ``n``, ``c``, its pass@k, status counts and per-sample
    statuses), ``sandbox`` (the mode used) and the settings. ``ValueError`` if any ``k`` exceeds a
    problem's number of samples.
    """
    from tqdm.auto import tqdm

    if len(problems) != len(completions):
        raise ValueError(f"completions must hold one list per problem: {len(problems)} problems, "
                         f"{len(completions)} completion lists")
    ks = sorted({int(v) for v in k})
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be positive ints, got {list(k)}")
    for problem, samples in zip(problems, completions):
        if isinstance(samples, str) or len(samples) < ks[-1]:
            raise ValueError(f"k={ks[-1]} > n={0 if isinstance(samples, str) else len(samples)} samples for "
                             f"{problem.task_id}: pass@k needs at least k samples per problem")
    jobs = [(p, i, assemble_program(problem, extract_code(problem, text, style)))
            for p, (problem, samples) in enumerate(zip(problems, completions)) for i, text in enumerate(samples)]
    mode = sandbox_mode(sandbox)
    results = [[None] * len(samples) for samples in completions]
    with ThreadPoolExecutor(max_workers=workers or max(1, os.cpu_count() or 1)) as pool:
        futures = {pool.submit(check_program, program, timeout, mode=sandbox): (p, i) for p, i, program in jobs}
        for future in tqdm(futures, total=len(futures), desc="running tests", disable=not progress, unit="prog"):
            p, i = futures[future]
            results[p][i] = future.result()
    per_problem = []
    for problem, samples in zip(problems, results):
        n, c = len(samples), sum(r.passed for r in samples)
        statuses = [r.status for r in samples]
        failure = next((r.reason for r in samples if not r.passed), "")
        per_problem.append({"task_id": problem.task_id, "n": n, "c": c,
                            **{f"pass@{v}": pass_at_k(n, c, v) for v in ks},
                            "status_counts": {s: statuses.count(s) for s in sorted(set(statuses))},
                            "statuses": statuses, "first_failure": failure})
    summary = {f"pass@{v}": sum(row[f"pass@{v}"] for row in per_problem) / len(per_problem) for v in ks}
    return {"pass_at_k": summary, "num_problems": len(per_problem), "k": ks, "sandbox": mode,
            "timeout": timeout, "style": style, "problems": per_problem}


def evaluate_code(model_or_path, data_path=None, n: int = 10, k: Sequence[int] = (1, 5, 10), temperature: float = 0.8,
                  top_p: float = 0.95, max_new_tokens: int = 512, limit: int | None = None, batch_size: int = 8,
                  seed: int = 0, prompt_style: str = "auto", timeout: float = 3.0, sandbox: str = "auto",
                  workers: int | None = None, tokenizer=None, backend: str = "auto", progress: bool = True) -> dict:
    """Sample ``n`` completions per problem from a model and score them (:func:`score_completions`).

    ``model_or_path``: a loaded ``PreTrainedModel`` (then pass ``tokenizer``), a directory / hub id,
    or ``"sfr-tiny"``. ``backend``: see :func:`sfr.eval.generation.resolve_backend`. Returns the
    :func:`score_completions` dict plus the sampling settings.
    """
    ks = sorted({int(v) for v in k})
    check_int("n", n)
    if ks and ks[-1] > n:
        raise ValueError(f"k={ks[-1]} > n={n}: pass@k needs at least k samples per problem (raise --n)")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    problems = load_problems(data_path, limit)
    sandbox_mode(sandbox)  # fail before sampling if the sandbox cannot run
    from sfr.eval.generation import load_model, resolve_backend, sample

    model_name = str(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else type(model_or_path).__name__
    chosen = resolve_backend(backend, model_or_path if model_or_path is not None else "sfr-tiny")
    if chosen == "vllm":  # pragma: no cover - vLLM is not installed here
        from transformers import AutoTokenizer

        from sfr.tiny_lm import resolve_model_name_or_path

        model, tokenizer = str(model_or_path), AutoTokenizer.from_pretrained(resolve_model_name_or_path(model_or_path))
    elif isinstance(model_or_path, (str, os.PathLike)) or model_or_path is None:
        model, tokenizer = load_model(model_or_path)
    else:
        if tokenizer is None:
            raise ValueError("pass tokenizer= when model_or_path is a loaded model")
        model = model_or_path
    style = prompt_style
    if style == "auto":
        style = "chat" if getattr(tokenizer, "chat_template", None) else "completion"
    prompts = [build_prompt(problem, style) for problem in problems]
    completions = sample(model, tokenizer, prompts, n=n, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, backend=chosen,
                         progress=progress)
    report = score_completions(problems, completions, k=ks, style=style, timeout=timeout, sandbox=sandbox,
                               workers=workers, progress=progress)
    report.update(model=model_name, data="<embedded>" if data_path is None else str(data_path), n=n,
                  temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, backend=chosen)
    for row, samples in zip(report["problems"], completions):
        row["completions"] = list(samples)
    return report
