"""Peak memory and speed of ``sfr prepare --stream`` (and of the in-memory prepare) on synthetic corpora.

Each corpus is the embedded persona corpus's records repeated to N records, every user turn made unique
(``(#i)``), so tokenisation sees N distinct examples; ``--unique-replies`` also makes every reply unique,
so every segment must be encoded (an encoder-bound run). Each prepare runs in a fresh process, whose
peak resident memory (``ru_maxrss``) is reported with records/s: at the end of the streaming pass
(``peak_rss_mb_streaming``) and over the whole run (``peak_rss_mb``: saving reads the written rows back
through a memory map, whose file pages count as resident while touched)::

    python -m bench.prepare_memory --records 100000 1000000            # streamed, replies repeat
    python -m bench.prepare_memory --records 20000 --unique-replies    # encoder throughput
    python -m bench.prepare_memory --records 100000 --in-memory        # sfr.targets.prepare, for comparison
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
started = time.perf_counter()
data, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "stream":
    from sfr.streaming import prepare_streaming
    result = prepare_streaming(data, out, progress=False)
else:
    from sfr.targets import prepare
    result = prepare(data, out, progress=False)
seconds = time.perf_counter() - started
counts = result.metadata["counts"]
print(json.dumps({"mode": mode, "records": counts["records"], "anchors": counts["anchors"],
                  "encoded_segments": counts["unique_segments"], "seconds": round(seconds, 1),
                  "records_per_s": round(counts["records"] / seconds, 1),
                  "encode_windows_per_s": result.metadata["throughput"]["encode_windows_per_s"],
                  "peak_rss_mb_streaming": result.metadata.get("streaming", {}).get("peak_rss_mb_streaming"),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def write_corpus(path: Path, records: int, unique_replies: bool) -> None:
    from sfr.corpus import build_corpus

    base = build_corpus("train")
    with open(path, "w") as file:
        for i in range(records):
            record = json.loads(json.dumps(base[i % len(base)]))
            for message in record["messages"]:
                if message["role"] == "user" or (unique_replies and message["role"] == "assistant"):
                    message["content"] += f" (#{i})"
            file.write(json.dumps(record) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[100_000], help="corpus sizes (default 100000)")
    parser.add_argument("--unique-replies", action="store_true", help="make every reply, hence segment, unique")
    parser.add_argument("--in-memory", action="store_true", help="run sfr.targets.prepare instead of the streamed one")
    parser.add_argument("--work", default=None, help="folder for the corpora and outputs (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for n in args.records:
            data = Path(work) / f"corpus-{n}.jsonl"
            started = time.perf_counter()
            write_corpus(data, n, args.unique_replies)
            print(f"# wrote {n} records ({data.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
            mode = "memory" if args.in_memory else "stream"
            done = subprocess.run([sys.executable, "-c", CHILD, str(data), str(Path(work) / f"out-{n}"), mode],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            print(done.stdout.strip().splitlines()[-1], flush=True)
            data.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
