"""The values every choice option accepts, declared once: the library checks them, and the CLI
turns each into an Enum so that `--help` lists them."""

MODES = ("reliable", "gradalign", "dot", "accgreedy", "band", "simacc", "learnalign", "random")
TARGETS = ("auto", "mean", "max", "subspace")
FORMATS = ("verl", "jsonl", "openrlhf", "ids")
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
