"""What a user gets from the built wheel: run by .ci/run with the python of a fresh virtual
environment where only the wheel (and torch) is installed, from an empty folder, so that
nothing of the repository's source is importable.

It checks that grainfx imports from site-packages, that ``grainfx --help`` works, that the
README's first Python example runs, and that ``grainfx compress`` and ``grainfx predict`` work
on a tiny random model folder with a tokenizer.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
GRAINFX = Path(sys.executable).parent / "grainfx"
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "film", "the", "plot"]


def run(*args: str) -> str:
    result = subprocess.run([str(GRAINFX), *args], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        sys.exit(f"grainfx {args[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def tiny_model_folder(folder: Path) -> None:
    """A random-init BERT classifier and its word-level tokenizer, as save_pretrained writes."""
    import transformers as T

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    T.BertTokenizerFast(vocab=vocab).save_pretrained(folder)
    config = T.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
    )
    T.BertForSequenceClassification(config).save_pretrained(folder)


def main() -> None:
    import grainfx

    where = Path(grainfx.__file__).resolve()
    if "site-packages" not in where.parts:
        sys.exit(f"grainfx was imported from {where}, not from the installed wheel")
    if "compress" not in run("--help"):
        sys.exit("grainfx --help does not list the compress command")
    example = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
    exec(compile(example, "README.md's first Python example", "exec"), {})

    tiny_model_folder(Path("model"))
    with open("data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(32):
            writer.writerow([f"the {WORDS[i % 6]} movie", int(i % 6 < 3)])
    run(*"compress model --data data.csv --out out --sparsity 0.5 --steps 2 --quiet".split())
    lines = run("predict", "out", "--data", "data.csv").splitlines()
    if len(lines) != 32:
        sys.exit(f"grainfx predict gave {len(lines)} lines for 32 rows")
    print(f"wheel check passed: grainfx from {where.parent}")


if __name__ == "__main__":
    main()
