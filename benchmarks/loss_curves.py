"""The loss curves of DVC experiments in one PNG: the README's picture, redrawn by this command.

    python benchmarks/loss_curves.py main wide-lstm dropout-0.2 --out benchmarks/loss_curves.png

Each name is a git branch or a DVC experiment (as ``dvc exp show`` names them); its training loss
(``metrics/steps.csv``, every ``train.log_every_steps`` steps) and validation loss
(``metrics/history.csv``, every epoch) are read from its commit and drawn against characters trained,
with its ``eval_val_loss`` (``metrics/evaluate.json``) in the legend.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
from pathlib import Path


def revisions() -> dict[str, str]:
    """{name: commit} of the branches and experiments ``dvc exp show`` lists."""
    out = {}
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json", "--all-branches"], capture_output=True,
                                      text=True, check=True).stdout)
    for entry in shown:
        if entry.get("name"):
            out[entry["name"]] = entry["rev"]
        for exp in entry.get("experiments") or []:
            for rev in exp["revs"]:
                if rev.get("name"):
                    out[rev["name"]] = rev["rev"]
    return out


def read_at(rev: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="branches or experiments to draw")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/loss_curves.png"))
    parser.add_argument("--title", default="char-rnn: loss against characters trained")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    revs = revisions()
    unknown = [name for name in args.names if name not in revs]
    if unknown:
        raise SystemExit(f"error: not a branch or experiment of `dvc exp show`: {', '.join(unknown)}")
    figure, axes = plt.subplots(figsize=(9, 5), dpi=100)
    for index, name in enumerate(args.names):
        color = f"C{index}"
        steps = list(csv.DictReader(io.StringIO(read_at(revs[name], "metrics/steps.csv"))))
        epochs = list(csv.DictReader(io.StringIO(read_at(revs[name], "metrics/history.csv"))))
        final = json.loads(read_at(revs[name], "metrics/evaluate.json"))["eval_val_loss"]
        axes.plot([int(r["chars"]) for r in steps], [float(r["loss"]) for r in steps], color=color, alpha=0.45,
                  linewidth=1, label=f"{name}: training loss")
        axes.plot([int(r["chars"]) for r in epochs], [float(r["val_loss"]) for r in epochs], color=color,
                  marker="o", linewidth=2, label=f"{name}: validation loss (eval_val_loss {final:.4f})")
    axes.set_xlabel("characters trained")
    axes.set_ylabel("cross-entropy (nats/char)")
    axes.set_ylim(top=min(axes.get_ylim()[1], 3.5))
    axes.set_title(args.title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, metadata={"Software": None})  # no version stamp: same curves, same bytes
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
