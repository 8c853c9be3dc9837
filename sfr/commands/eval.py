"""``sfr eval dialogue`` and ``sfr eval code``: the command line of :mod:`sfr.eval`."""
from __future__ import annotations

import argparse
import sys

from sfr.checks import check_no_earlier_results, check_output_dir

OVERWRITE_HELP = ("replace the results of an earlier run in --out (default: an --out that holds results.json "
                  "or report.md is an error)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _k_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k must be comma-separated integers like 1,5,10, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"--k values must be positive, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="{dialogue,code}")
    dialogue = sub.add_parser(
        "dialogue", help="sample replies from one or more models; report diversity, style fidelity and quality",
        description="Sample --samples replies per prompt of --data (the final assistant turn of each conversation "
                    "is its reference reply) from each --model, and report distinct-1/2, "
                    "self-BLEU, embedding diversity, persona-classifier style accuracy, style-marker rate and mode "
                    "coverage/entropy/TV vs the known mode frequencies (embedded corpus), and quality proxies: each "
                    "model's held-out NLL of the reference replies, the samples' NLL under --reference-model, exact "
                    "valid-reply/on-topic rates (embedded corpus) and an optional --judge. Data: JSONL/JSON in the "
                    "messages or prompt/completion format, or the Synthetic-Persona-Chat CSV. "
                    "Writes results.json, samples.json, report.md and metrics.png to --out.",
        epilog="examples:\n"
               "  sfr eval dialogue --model runs/sft --model runs/sfr            # embedded eval split\n"
               "  sfr eval dialogue --model runs/sfr --data ../shared/data/synthetic-persona-chat/test.csv \\\n"
               "      --limit 50 --samples 8 --reference-model sfr-tiny\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    dialogue.add_argument("--model", action="append", required=True, metavar="DIR",
                          help="model directory, hub id or 'sfr-tiny'; repeat to compare models side by side")
    dialogue.add_argument("--data", default=None, metavar="FILE",
                          help="dialogue data: JSONL/JSON (messages or prompt/completion) or Synthetic-Persona-Chat "
                               "CSV (default: the embedded corpus' eval split)")
    dialogue.add_argument("--samples", type=_positive_int, default=8, help="replies per prompt (default 8)")
    dialogue.add_argument("--max-new-tokens", type=_positive_int, default=64, help="default 64")
    dialogue.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    dialogue.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    dialogue.add_argument("--limit", type=_positive_int, default=None,
                          help="use only N unique prompts, spread over personas and conversations (chosen "
                               "with --seed) (default: all)")
    dialogue.add_argument("--batch-size", type=_positive_int, default=16,
                          help="sequences per generate call (default %(default)s)")
    dialogue.add_argument("--seed", type=int, default=0,
                          help="sampling seed, the same for every model (default %(default)s)")
    dialogue.add_argument("--encoder", default=None,
                          help="sentence encoder for embedding metrics (default all-MiniLM-L6-v2, offline)")
    dialogue.add_argument("--reference-model", default=None, metavar="DIR",
                          help="'base' model scoring the replies' NLL (a fluency proxy) (default: none, not computed)")
    dialogue.add_argument("--no-heldout-nll", action="store_true",
                          help="skip each model's NLL of the reference replies (a quality proxy; on by default)")
    dialogue.add_argument("--judge", default=None, metavar="MODULE:FUNCTION",
                          help="external judge: a callable judge(prompt_messages, reply) -> float, averaged as "
                               "judge_score (e.g. an LLM-as-judge you write); MODULE is imported with the current "
                               "directory first on sys.path, so my_judges:score finds ./my_judges.py "
                               "(default: no judge)")
    dialogue.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto",
                          help="sampling backend; auto = vLLM when installed and CUDA is up, else transformers "
                               "(default %(default)s)")
    dialogue.add_argument("--out", default="eval-dialogue", metavar="DIR",
                          help="output directory (default %(default)s)")
    dialogue.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    code = sub.add_parser(
        "code", help="pass@k on HumanEval / MBPP with generated programs run in a sandbox",
        description="Sample --n completions per problem of a HumanEval (.jsonl[.gz]) or MBPP sanitized (.json) file, "
                    "run each program with its tests in a sandbox (bubblewrap when usable, else rlimits without network), and "
                    "report unbiased pass@k. Writes results.json, report.md and pass_at_k.png to --out.")
    code.add_argument("--model", action="append", required=True, metavar="DIR",
                      help="model directory, hub id or 'sfr-tiny'; repeat to compare models side by side")
    code.add_argument("--data", default=None, metavar="FILE",
                      help="HumanEval.jsonl[.gz] or MBPP (sanitized-mbpp.json) format (default: 5 small embedded "
                           "problems in the HumanEval format, a smoke test)")
    code.add_argument("--n", type=_positive_int, default=10, help="samples per problem (default 10)")
    code.add_argument("--k", type=_k_list, default=[1, 5, 10], help="comma-separated k values (default 1,5,10)")
    code.add_argument("--temperature", type=float, default=0.8, help="default 0.8")
    code.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    code.add_argument("--max-new-tokens", type=_positive_int, default=512, help="default 512")
    code.add_argument("--prompt-style", choices=("auto", "completion", "chat"), default="auto",
                      help="auto: chat when the tokenizer has a chat template (default %(default)s)")
    code.add_argument("--limit", type=_positive_int, default=None, help="use only the first N problems (default: all)")
    code.add_argument("--batch-size", type=_positive_int, default=8,
                      help="sequences per generate call (default %(default)s)")
    code.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model (default %(default)s)")
    code.add_argument("--timeout", type=float, default=3.0, help="seconds per program (default 3)")
    code.add_argument("--sandbox", choices=("auto", "bwrap", "rlimit"), default="auto",
                      help="isolation: bwrap (namespaces, read-only root, no network) or rlimit (weaker: rlimits "
                           "and a network namespace of its own where one can be created, else WITH the network); "
                           "auto = bwrap when usable, else rlimit without network, else an error (default %(default)s)")
    code.add_argument("--workers", type=_positive_int, default=None, help="programs run in parallel (default: CPUs)")
    code.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto",
                      help="sampling backend; auto = vLLM when installed and CUDA is up, else transformers "
                           "(default %(default)s)")
    code.add_argument("--out", default="eval-code", metavar="DIR", help="output directory (default %(default)s)")
    code.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.set_defaults(eval_parser=parser)
    parser.command_parsers, parser.command_dest = {"dialogue": dialogue, "code": code}, "eval_command"


def main(args) -> int:
    command = getattr(args, "eval_command", None)
    if command is None:
        args.eval_parser.print_help()
        return 2
    try:
        check_output_dir(args.out, "--out")  # before any sampling: a bad --out must not cost the run
        check_no_earlier_results(args.out, args.overwrite)
        _check_models(args)
        if command == "code":
            return _code(args)
        return _dialogue(args)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:  # bad input, unloadable model, no sandbox
        print(f"sfr eval {command}: error: {exc}", file=sys.stderr)
        return 2


def _check_models(args) -> None:
    """Every --model, --reference-model and --encoder that cannot load: one line, in seconds, before
    any sampling (:func:`sfr.loading.check_model`, :func:`sfr.encoder.check_encoder`)."""
    from sfr.loading import check_model

    for model in args.model:
        check_model(model, "--model")
    if getattr(args, "reference_model", None) is not None:
        check_model(args.reference_model, "--reference-model")
    if args.eval_command == "dialogue":  # its embedding metrics always need the encoder
        from sfr.encoder import check_encoder

        check_encoder(args.encoder, "--encoder")


def _code(args) -> int:
    from sfr.eval.code import evaluate_code
    from sfr.eval.report import write_code_report

    if max(args.k) > args.n:
        raise ValueError(f"--k {max(args.k)} > --n {args.n}: pass@k needs at least k samples per problem")
    by_model = {}
    for model in args.model:
        name = model if model not in by_model else f"{model} ({len(by_model)})"
        by_model[name] = evaluate_code(model, args.data, n=args.n, k=args.k, temperature=args.temperature,
                                       top_p=args.top_p, max_new_tokens=args.max_new_tokens, limit=args.limit,
                                       batch_size=args.batch_size, seed=args.seed, prompt_style=args.prompt_style,
                                       timeout=args.timeout, sandbox=args.sandbox, workers=args.workers,
                                       backend=args.backend)
    written = write_code_report(by_model if len(by_model) > 1 else next(iter(by_model.values())), args.out)
    print(open(written["report.md"], encoding="utf-8").read())
    print("wrote " + ", ".join(written.values()))
    return 0


def _dialogue(args) -> int:
    from sfr.eval.dialogue import evaluate_dialogue
    from sfr.eval.report import write_dialogue_report

    data = args.data
    if data is None:
        from sfr.corpus import default_corpus_path

        data = default_corpus_path("eval")
    from sfr.eval.dialogue import load_judge

    judge = load_judge(args.judge) if args.judge else None
    if args.samples < 2:
        raise ValueError("--samples must be at least 2 (diversity needs several replies per prompt)")
    results = evaluate_dialogue(args.model, data, samples=args.samples, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, limit=args.limit,
                                batch_size=args.batch_size, seed=args.seed, encoder=args.encoder,
                                reference_model=args.reference_model, judge=judge,
                                heldout_nll=not args.no_heldout_nll, backend=args.backend)
    written = write_dialogue_report(results, args.out)
    print(open(written["report.md"], encoding="utf-8").read())
    print("wrote " + ", ".join(written.values()))
    return 0
