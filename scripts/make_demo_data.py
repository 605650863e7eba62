"""Write the embedded demo dataset: two-digit addition as JSONL prompt/answer pairs.

    python scripts/make_demo_data.py            # writes data/addition/{train,test}.jsonl

Deterministic: all 10,000 pairs (a, b) with 0 <= a, b <= 99 are shuffled with a fixed seed;
500 go to the held-out test split, the rest to train. Prompts are "ab+cd=" with both operands
zero-padded to two digits, answers the sum zero-padded to three ("07+35=" -> "042"), so every
example has the same length and a character-level tokenizer suffices.
"""

import argparse
import json
import random
from pathlib import Path

SEED = 1234
TEST_SIZE = 500


def examples():
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(SEED).shuffle(pairs)
    rows = [{"prompt": f"{a:02d}+{b:02d}=", "answer": f"{a + b:03d}"} for a, b in pairs]
    return rows[TEST_SIZE:], rows[:TEST_SIZE]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data" / "addition"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = examples()
    for name, rows in (("train", train), ("test", test)):
        with open(out / f"{name}.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        print(f"{out / (name + '.jsonl')}: {len(rows)} examples")


if __name__ == "__main__":
    main()
