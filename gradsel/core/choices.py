"""The values every choice option accepts, declared once: the library checks them, and the CLI
turns each into an Enum so that `--help` lists them. The selection modes and output formats are
not here: each is a record (gradsel.selection.modes, gradsel.selection.formats), and its name is
read from there."""

TARGETS = ("auto", "mean", "max", "subspace")
INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq")
ADVANTAGES = ("grpo", "drgrpo")
LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
VAL_AGGS = ("batch", "mean-normalized")
ALIGNMENTS = ("sketch", "lowrank", "exact")
DTYPES = ("float32", "bfloat16", "float16")
REGIMES = ("clean", "noisy", "imbalance", "low-utility", "wrong-answer")  # the demo data's (demo.tasks)
ENGINES = ("auto", "vllm", "hf")
SPLITS = ("train", "val")
HASH_MODES = ("sha256", "fast")
EXECUTORS = ("local", "ray")
FEATURES = ("projected", "head", "exact")
TRAINERS = ("verl",)  # `gradsel handoff`


def english_list(values, last: str = " and ") -> str:
    """'a', 'a and b', 'a, b and c' (`last` joins the last two): choices named in a help or a hint."""
    values = list(values)
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + last + values[-1]
