"""How held out the held-out sets are: what each evaluation set shares with its training set,
read by content, not by id.

    python benchmarks/heldout_overlap.py [--data /work/shared/data]

For every generated task (the testbed's column addition and digit chain, the word problems) it
prints three levels: the same prompt text; the same problem up to surface words (operands in
either order, names and items swapped); and, for the digit chain, the same chain at another
length, whose answer is a prefix or an extension of the held-out one. For the public sets it
prints exact and whitespace-normalised text overlap between each training source and each
benchmark when a local copy is given (`--data`, the layout of eval.data_dir). Text is never
printed: only counts.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _share(held: list, train: list, key) -> int:
    seen = {key(x) for x in train}
    return sum(key(x) in seen for x in held)


def testbed_lines() -> list[str]:
    from trace_rl.stages.benchmarks import load_benchmark
    from trace_rl.stages.config import load_config
    from trace_rl.testbed.chain import all_problems
    from trace_rl.testbed.config import TestbedConfig
    from trace_rl.testbed.task import make_prompts

    out = []
    demo = load_config("demo")  # the demo's prompts (data.testbed_prompts, run.seed) and eval set
    cfg = demo.model.testbed
    train = make_prompts(cfg, demo.data.testbed_prompts, demo.run.seed, "train")
    held = load_benchmark(demo, "testbed").rows
    pair = lambda r: tuple(sorted((json.loads(r["meta"])["a"], json.loads(r["meta"])["b"])))
    out.append(f"testbed column_addition: {len(held)} held-out vs {len(train)} train prompts: same text "
               f"{_share(held, train, lambda r: r['problem'])}, same operands in either order "
               f"{_share(held, train, pair)}")
    chain = TestbedConfig(task="digit_chain")
    c_train, c_held = all_problems(chain, "train"), all_problems(chain, "heldout")
    out.append(f"testbed digit_chain: {len(c_held)} held-out vs {len(c_train)} train problems: same "
               f"problem {_share(c_held, c_train, lambda p: p)}, same (start, mul, add) at another "
               f"length {_share(c_held, c_train, lambda p: p[:3])}")
    return out


def word_problem_lines() -> list[str]:
    from trace_rl.stages.word_problems import word_problem_rows

    train, test = word_problem_rows("train"), word_problem_rows("test")
    numbers = lambda r: (r["kind"], tuple(re.findall(r"\d+", r["problem"])))
    out = []
    for n in (100, len(test)):
        held = test[:n]
        out.append(f"word problems: first {n} test vs {len(train)} train: same text "
                   f"{_share(held, train, lambda r: r['problem'])}, same kind and numbers (names and "
                   f"items differ) {_share(held, train, numbers)}")
    return out


def _texts(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().split("\n") if line.strip()]
    return [str(r.get("problem") or r.get("question") or "") for r in rows]


PAIRS = (("math_train/train.jsonl", "math500"), ("math_train/train.jsonl", "minerva_math"),
         ("gsm8k/train.jsonl", "gsm8k"), ("aime_1983_2023/train.jsonl", "aime24"),
         ("aime_1983_2023/train.jsonl", "aime25"))


def public_lines(data: Path) -> list[str]:
    out = []
    for train_file, bench in PAIRS:
        tr, te = data / train_file, data / bench / "test.jsonl"
        if not (tr.exists() and te.exists()):
            out.append(f"{train_file} vs {bench}: no local copy under {data}")
            continue
        train, held = _texts(tr), _texts(te)
        out.append(f"{train_file} vs {bench}: {len(held)} benchmark vs {len(train)} train problems: same text "
                   f"{_share(held, train, lambda t: t)}, same up to whitespace and case "
                   f"{_share(held, train, _norm)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="local benchmark copies (eval.data_dir layout)")
    args = ap.parse_args()
    for line in [*testbed_lines(), *word_problem_lines(), *(public_lines(args.data) if args.data else [])]:
        print(line, flush=True)


if __name__ == "__main__":
    main()
