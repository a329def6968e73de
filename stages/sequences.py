"""DVC stage `sequences`: ids -> sharded TFRecord (input, target) windows + manifest.json."""

import argparse
from pathlib import Path

from charrnn.config import load_params
from charrnn.files import remove_leftovers
from charrnn.errors import exit_on_user_error
from charrnn.quiet import importing_tensorflow, quiet_python_logs
from charrnn.threads import configure_threads, threads_from_env


@exit_on_user_error
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vectorized", type=Path, required=True, help="output of `vectorize`")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    config = load_params(args.params, "sequences")
    remove_leftovers(args.out)
    threads_from_env()  # a bad CHARRNN_THREADS fails before TensorFlow loads
    with importing_tensorflow():  # TensorFlow takes ~10 s to load: params and server first
        from charrnn.sequences import build_sequences
    quiet_python_logs()
    configure_threads()

    manifest = build_sequences(args.vectorized, args.out, config.seq_length, config.shard_size_mb)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['windows']:,} sequences in {len(info['shards'])} shard(s)")


if __name__ == "__main__":
    main()
