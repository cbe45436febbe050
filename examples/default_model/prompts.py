"""Build the prompt sets for the default model's stream training (issue: lossless SmolLM2).

Training prompts (permissive licences only): wwdc25 train (MIT), WikiSQL train (BSD-3/MIT),
E2E dev MRs (CC BY-SA 4.0). wwdc25 train holds 271 distinct prompts in 1,800 rows and
`ss-mlx distill` answers each distinct prompt once: about 1,070 distinct prompts in all.
Held out for evaluation, never trained on: Vicuna-bench (Apache-2.0),
wwdc25 valid and IFEval (Apache-2.0; `prompts_eval48.jsonl` takes 16 of each of the three).
DialogSum is not used (non-commercial licence).

    python examples/default_model/prompts.py --data ../shared/data --out work/default_model
"""

import argparse
import csv
import json
import random
from pathlib import Path

E2E_TEMPLATE = "Write a short restaurant description from these facts: {mr}"
SQL_TEMPLATE = "{context}\nWrite the SQL query that answers the question."


def wwdc(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def wikisql(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            text = json.loads(line)["text"]
            out.append(SQL_TEMPLATE.format(context=text.split("\nA:")[0]))
    return out


def e2e(path: Path) -> list[str]:
    with path.open(newline="") as f:
        mrs = list(dict.fromkeys(row["mr"] for row in csv.DictReader(f)))
    return [E2E_TEMPLATE.format(mr=mr) for mr in mrs]


def vicuna(path: Path) -> list[str]:
    return [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]


def write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="work/default_model")
    p.add_argument("--n-wwdc", type=int, default=1800)
    p.add_argument("--n-sql", type=int, default=400)
    p.add_argument("--n-e2e", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    data, out = Path(args.data), Path(args.out)
    rng = random.Random(args.seed)

    def pick(items: list[str], n: int, source: str) -> list[dict]:
        items = list(items)
        rng.shuffle(items)
        return [{"prompt": t, "source": source} for t in items[:n]]

    wwdc_train = wwdc(data / "chat/wwdc25_train.jsonl")
    train = (
        pick(wwdc_train, args.n_wwdc, "wwdc25")
        + pick(wikisql(data / "wikisql/train.jsonl"), args.n_sql, "wikisql")
        + pick(e2e(data / "e2e/devset.csv"), args.n_e2e, "e2e")
    )
    rng.shuffle(train)
    heldout = [{"prompt": t, "source": "vicuna"} for t in vicuna(
        data / "chat/vicuna_bench_questions.jsonl")]
    # wwdc25 valid repeats some train prompts (48 of its 144 rows): those are not held out.
    seen = set(wwdc_train)
    heldout += [{"prompt": t, "source": "wwdc25_valid"} for t in dict.fromkeys(wwdc(
        data / "chat/wwdc25_valid.jsonl")) if t not in seen]
    write(train, out / "prompts_train.jsonl")
    write(heldout, out / "prompts_heldout.jsonl")
    # The stream evaluation set: 16 prompts from each held-out source (open chat, Apple-dev
    # chat, instruction following), fixed by seed 0 whatever --seed says.
    ifeval = [json.loads(line)["prompt"] for line in
              (data / "prompts/eval_ifeval.jsonl").read_text().splitlines() if line.strip()]
    pick16 = random.Random(0)
    eval48 = []
    for rows in (
        [r for r in heldout if r["source"] == "vicuna"],
        [r for r in heldout if r["source"] == "wwdc25_valid"],
        [{"prompt": t, "source": "ifeval"} for t in ifeval],
    ):
        eval48 += pick16.sample(rows, 16)
    write(eval48, out / "prompts_eval48.jsonl")
    print(f"{len(train)} training prompts, {len(heldout)} held-out prompts, "
          f"{len(eval48)} stream-evaluation prompts -> {out}")  # fmt: skip


if __name__ == "__main__":
    main()
