"""DVC stage `vectorize`: corpus (data.source) -> vocabulary.json, train.npy, val.npy."""

import argparse
from pathlib import Path

from charrnn.config import load_params
from charrnn.files import remove_leftovers
from charrnn.errors import exit_on_user_error
from charrnn.vectorize import vectorize


@exit_on_user_error
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--cache", type=Path, required=True, help="download cache for URL sources")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    data = load_params(args.params, "data")
    remove_leftovers(args.out)
    result = vectorize(data, args.out, args.cache)
    print(f"vocabulary: {len(result.vocabulary)} symbols; train {result.train_chars:,} chars, "
          f"val {result.val_chars:,} chars -> {args.out}")


if __name__ == "__main__":
    main()
