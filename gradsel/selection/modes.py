"""Selection modes: one record per way of ranking the candidates, in the shape of the rewards'
`REGISTRY`. A new mode is one `Mode` in `REGISTRY` (plus its test): `--mode`'s choices, its `--help`
prose, `docs/cli.md` and the report's comparison all read the records.

A mode's score function gets the candidates (`CandidateColumns`: columns of the scores table, in
store order) and returns one float per candidate, higher ranking first; ties are
broken by problem id in `select`, so every mode is deterministic. The modes that honour `--target`
rank by `ModeInputs.aligned`, the alignment the target chose (select.mode_score_array); the others
read the columns they need themselves.

numpy is imported inside the functions: the CLI reads these records to build its `--help`, and a
bare `gradsel --help` need not load numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gradsel.store.vectors import VectorSet

if TYPE_CHECKING:
    import numpy as np


class CandidateColumns(Protocol):
    """The columns of the candidates a mode may read: select.Candidates has them (and is not
    imported here, since select imports this module)."""

    ids: list[str]
    pass_rate: np.ndarray  # the share of a problem's k rollouts paid more than 0
    score_cos: np.ndarray
    score_dot: np.ndarray
    consistency: np.ndarray  # judge consistency
    breaks_contract: np.ndarray


@dataclass(frozen=True)
class ModeInputs:
    """What a mode may rank by."""

    candidates: CandidateColumns
    aligned: np.ndarray  # the alignment --target chose for a mode that honours it; else score_cos
    train: VectorSet  # the candidates' stored vectors (and their FAISS index), for the modes that read them
    fetch: int  # a mode that queries the index needs at least the `fetch` best of each query scored
    index: str  # --index: the FAISS index kind
    seed: int  # --seed, for the seeded orders


# ModeInputs -> one float per candidate, in the candidates' order, higher ranking first
ScoreFn = Callable[[ModeInputs], "np.ndarray"]


@dataclass(frozen=True)
class Mode:
    name: str
    help: str  # one line, the words after the name in `--help` ("Modes: NAME HELP; ...")
    score: ScoreFn
    honours_target: bool = False  # --target chooses the alignment it ranks by (mean, max or subspace)
    # The scores column of the alignment with the validation gradient it ranks by where it reads
    # one as stored (under --target mean for a mode that honours the target): a store that estimated
    # it from the sketches gets a warning (select.warn_if_sketch_alignment). None: reads none.
    alignment_column: str | None = None
    # Whether `gradsel report` shows what it would keep. Not a mode that builds a FAISS index (a
    # report should not pay for one), nor one whose selection another compared mode already makes:
    # band over its default band (0, 1) is random's order, variance accgreedy's.
    compared: bool = True


def judge_reliability(c: CandidateColumns) -> np.ndarray:
    """How far each candidate's rewards can be trusted, in [0, 1]: its judge consistency, and 0,
    the lowest, where it breaks its judge's contract. A binary judge that compares an answer with
    one reference pays at most one answer class per problem, so two paid answers prove the judge
    did not read them, however consistent it looked on the pairs that happened to repeat an answer
    (rare at k = 8 on a model that seldom repeats itself)."""
    import numpy as np

    return np.where(c.breaks_contract, 0.0, c.consistency)


def _reliable(x: ModeInputs):
    return x.aligned - 2 * (1 - judge_reliability(x.candidates))


def _simacc(x: ModeInputs):
    import numpy as np

    p = x.candidates.pass_rate
    return np.where(x.aligned > -np.inf, x.aligned * 4 * p * (1 - p), -np.inf)


def _seeded_order(x: ModeInputs):
    """A seeded random order of the ids, the same for the same ids and seed, as descending scores."""
    import random

    import numpy as np

    ids = sorted(x.candidates.ids)
    random.Random(f"gradsel-select/{x.seed}").shuffle(ids)
    rank = {pid: -i for i, pid in enumerate(ids)}
    return np.array([rank[pid] for pid in x.candidates.ids], dtype=np.float64)


def _learnalign(x: ModeInputs):
    import numpy as np

    from gradsel.selection.index import index_alignment
    from gradsel.selection.targets import mean_direction

    found = index_alignment(x.train, x.index, mean_direction(x.train)[None], x.fetch)
    return np.array([found[pid] for pid in x.candidates.ids], dtype=np.float64)


def _variance(x: ModeInputs):
    # The variance of a problem's 0/1 reward, p(1-p) with p its pass rate: the share of its k
    # rollouts paid more than 0 (the scores' pass_rate), which for a 0/1 judge is its mean reward
    # and stays in [0, 1] for a judge that pays -1 or 1 (math_dapo, where the mean reward would not).
    # p(1-p) = 1/4 - (p - 1/2)^2 falls as |p - 1/2| grows, so it orders the candidates exactly as
    # accgreedy does; what differs is the score, on the variance's scale (--min-score, --annotate).
    p = x.candidates.pass_rate
    return p * (1 - p)


REGISTRY: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode(
            "reliable",
            "(the default) is the alignment below minus 2 x (1 - judge consistency), so problems whose judge "
            "gave identical answers different rewards sink, and those whose binary one-reference judge paid two "
            "different answers (its contract broken) get the lowest judge consistency, 0",
            _reliable,
            honours_target=True,
            alignment_column="score_cos",
        ),
        Mode(
            "gradalign",
            "is the paper's cosine with the validation gradient",
            lambda x: x.aligned,
            honours_target=True,
            alignment_column="score_cos",
        ),
        Mode(
            "dot",
            "is the inner product with the validation gradient",
            lambda x: x.candidates.score_dot,
            alignment_column="score_dot",
        ),
        Mode("accgreedy", "puts pass rates nearest 0.5 first", lambda x: -abs(x.candidates.pass_rate - 0.5)),
        Mode("band", "takes a pass-rate band in seeded random order", _seeded_order, compared=False),
        Mode("simacc", "is cosine x 4p(1-p)", _simacc, honours_target=True, alignment_column="score_cos"),
        Mode(
            "learnalign", "is the cosine with the pool's mean gradient (no validation set)", _learnalign, compared=False
        ),
        Mode("random", "is seeded", _seeded_order),
        Mode(
            "variance",
            "is the pass rate's p(1-p), the learnability prior of LILO and LearnAlign (accgreedy's order, "
            "on the scale --min-score reads)",
            _variance,
            compared=False,
        ),
    )
}
MODES = tuple(REGISTRY)  # --mode's choices, in --help's order
