"""DVC stage `sequences`: ids -> sharded TFRecord (input, target) windows + manifest.json."""

import argparse
from pathlib import Path

from charrnn.config import load_params
from charrnn.errors import exit_on_user_error
from charrnn.prologue import before_tensorflow, loading_tensorflow


@exit_on_user_error
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vectorized", type=Path, required=True, help="output of `vectorize`")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    config = load_params(args.params, "sequences")
    before_tensorflow(args.out)
    with loading_tensorflow():
        from charrnn.sequences import build_sequences

    manifest = build_sequences(args.vectorized, args.out, config.seq_length, config.shard_size_mb)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['windows']:,} sequences in {len(info['shards'])} shard(s)")


if __name__ == "__main__":
    main()
