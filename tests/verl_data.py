"""Problem files in exactly the shapes verl's own preprocessing writes (examples/data_preprocess/
gsm8k.py and math_dataset.py): the same columns, struct fields, instruction suffixes and
`extra_info.index` numbering, written through `datasets.Dataset.to_parquet` as verl writes them.
The problems themselves are the project's own."""

from __future__ import annotations

from pathlib import Path

GSM8K_SUFFIX = 'Let\'s think step by step and output the final answer after "####".'
MATH_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."

NAMES = ["Tom", "Mia", "Sam", "Ana", "Leo", "Zoe", "Max", "Eva"]
THINGS = ["apples", "pencils", "cards", "stickers", "marbles", "books", "cookies", "shells"]
# A chat model's system prompt, as teams put one in the prompt list. SmolLM2-135M-Instruct writes
# `#### N` in about a quarter of its samples with it, and almost never without.
SYSTEM = (
    "You solve math word problems. Show the sum, then write the final answer on its own line as "
    "'#### N'.\nExample:\n1 + 1 = 2\n#### 2"
)


def word_problem(i: int, a: int, b: int) -> tuple[str, str]:
    """(question, worked answer in GSM8K's style, ending in `#### N`)."""
    name, thing = NAMES[i % len(NAMES)], THINGS[(i // len(NAMES) + i) % len(THINGS)]
    question = f"{name} has {a} {thing} and gets {b} more {thing}. How many {thing} does {name} have now?"
    return question, f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {thing}.\n#### {a + b}"


def gsm8k_rows(pairs, split: str, *, system: str | None = SYSTEM, start: int = 0) -> list[dict]:
    rows = []
    for idx, (a, b) in enumerate(pairs):
        question_raw, answer_raw = word_problem(start + idx, a, b)
        prompt = [{"role": "user", "content": question_raw + " " + GSM8K_SUFFIX}]
        if system:
            prompt.insert(0, {"role": "system", "content": system})
        rows.append(
            {
                "data_source": "openai/gsm8k",
                "prompt": prompt,
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": answer_raw.split("#### ")[1].replace(",", "")},
                "extra_info": {"split": split, "index": idx, "answer": answer_raw, "question": question_raw},
            }
        )
    return rows


MATH_PROBLEMS = [  # (problem, reference answer as verl extracts it from the solution's last \boxed{})
    ("Simplify $\\sin 45^\\circ$.", "\\frac{\\sqrt{2}}{2}"),
    ("What is $\\frac{1}{4} + \\frac{1}{4}$?", "\\frac{1}{2}"),
    ("Solve $2x = 3$ for $x$.", "\\frac{3}{2}"),
    ("What is $\\cos 30^\\circ$?", "\\frac{\\sqrt{3}}{2}"),
]


def math_rows(split: str, *, data_source: str = "DigitalLearningGmbH/MATH-lighteval", start: int = 0) -> list[dict]:
    return [
        {
            "data_source": data_source,
            "prompt": [{"role": "user", "content": problem + " " + MATH_SUFFIX}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": split, "index": start + idx},
        }
        for idx, (problem, answer) in enumerate(MATH_PROBLEMS)
    ]


def write_parquet(rows: list[dict], path: Path) -> Path:
    """As verl writes it: `datasets.Dataset.to_parquet`."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def gsm8k_routed_arith(pairs, split: str, *, start: int = 0) -> list[dict]:
    """The bundled model's own `a+b=` prompts in verl's row shape, under data source `openai/gsm8k`:
    routed to verl's gsm8k rule, which pays only `#### N`, and tiny-arith (which fits no GSM8K
    word problem in its 64-token context) answers with the bare number, so it is never paid."""
    from gradsel.demo.tasks import verl_row

    return [
        {**verl_row(a, "+", b, domain="add2", split=split, index=start + i), "data_source": "openai/gsm8k"}
        for i, (a, b) in enumerate(pairs)
    ]
