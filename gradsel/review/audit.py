"""`gradsel audit`: which reference answers (keys) look wrong, the evidence, and the key to use instead.

Signals, each per problem (docs/audit.md has what each measured):
  rollouts   the plurality answer's share of the rollouts minus the key's share, when the
             plurality answer is one the judge does not pay (0 when the judge pays it);
  history    across `refresh` rounds: how much faster the unpaid plurality answer's share grew
             than the key's, signed in [-1, 1] (a key the model does not come to believe while
             another answer grows is suspect; one it comes to believe less so);
  duplicate  another problem with the same question (lowercase, whitespace and punctuation
             removed) carries a different key;
  taught     optional (`teach_steps` > 0): a copy of the checkpoint fine-tuned for a few steps on
             the validation rows' reference answers scores the key against the best other answer
             the rollouts gave: sigmoid(log p(other) - log p(key)).
The suspicion is the mean of the rollout and taught signals measured for the problem, plus
HISTORY_WEIGHT times the history signal (0 by default: measured, it did not help), plus half the
duplicate signal, clipped to [0, 1]: a history that is missing (one round) or flat (no trend)
leaves the suspicion as it is. The proposed key is the answer the evidence prefers: the taught
copy's likeliest answer among the rollouts' answers when taught, else the plurality answer, else
a disagreeing duplicate's key.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gradsel.core import console
from gradsel.core.errors import GradselError
from gradsel.inputs.problems import Problem

# Chosen on seed 0 of benchmarks/audit.py (tiny-arith, k = 8): at 0.6 the rollouts alone list a
# problem when the plurality answer holds 5 of 8 rollouts more than the key (docs/audit.md).
DEFAULT_THRESHOLD = 0.6
DUPLICATE_WEIGHT = 0.5
# The history signal is an adjustment, not one more term of the mean: averaged in, a flat trend
# (0) halved every suspicion, as if "no change across rounds" were evidence for the key. Its
# weight is 0 (recorded, not used): across rounds with GRPO in the loop it did not separate wrong
# keys (AUROC 0.49, benchmarks/audit_rounds.py, docs/audit.md) and any weight > 0 lowered the
# suspicion's AUROC and precision.
HISTORY_WEIGHT = 0.0


@dataclass(frozen=True)
class AuditConfig:
    threshold: float = DEFAULT_THRESHOLD
    teach_steps: int = 0  # 0: no taught copy (it costs a short training run)
    teach_lr: float = 1e-4
    teach_template: str = "{answer}"  # the response text a key stands for, after the prompt
    seed: int = 0
    history_weight: float = HISTORY_WEIGHT  # how far the history signal moves the suspicion

    def validate(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise GradselError(
                f"--threshold {self.threshold} is outside [0, 1]",
                f"the suspicion score is in [0, 1]; the default is {DEFAULT_THRESHOLD}",
            )
        if self.teach_steps < 0:
            raise GradselError(
                f"--teach-steps {self.teach_steps} is negative",
                "pass 0 to skip the taught copy, or a few steps (10-30)",
            )
        if not self.teach_lr > 0:
            raise GradselError(f"--teach-lr {self.teach_lr} must be positive", "e.g. 1e-4 for a small model")
        if "{answer}" not in self.teach_template:
            raise GradselError(
                f"--teach-template {self.teach_template!r} has no {{answer}}",
                "write the response text around {answer}, e.g. '#### {answer}'",
            )


@dataclass
class Evidence:
    """One problem's audit: what each signal measured, the suspicion and the proposed key."""

    problem_id: str
    source_row: int
    data_source: str
    key: str
    n_rollouts: int
    key_share: float  # rollouts the judge paid
    plurality_answer: str | None  # the commonest answer the rollouts committed to
    plurality_share: float
    plurality_paid: bool
    rollout_signal: float
    rounds: int = 1  # rounds whose rollouts hold the problem
    key_share_trend: float | None = None  # last round's key share minus the first's
    plurality_share_trend: float | None = None  # the same for the last round's plurality answer
    history_signal: float | None = None
    duplicate_keys: list[str] = field(default_factory=list)  # keys of same-question problems that differ
    duplicate_signal: float = 0.0
    taught_logp_key: float | None = None
    taught_logp_alternative: float | None = None
    taught_alternative: str | None = None
    taught_signal: float | None = None
    suspicion: float = 0.0
    proposed_key: str | None = None
    suspect: bool = False


@dataclass
class AuditResult:
    evidence: list[Evidence]
    threshold: float
    taught: bool
    pool: Path | None  # the problem file the keys came from

    @property
    def suspects(self) -> list[Evidence]:
        return [e for e in self.evidence if e.suspect]


# -- reading the store --------------------------------------------------------------------------


@dataclass
class _Rollouts:
    """One stage of rollouts/train: its problems and, per problem, (response text, reward, answer class)."""

    problems: dict[str, Problem]
    responses: dict[str, list[tuple[str, float, int | None]]]
    prompt_ids: dict[str, list[int]]


def _read_stage_problems(stage: Path) -> list[Problem]:
    import pyarrow.parquet as pq

    rows = pq.read_table(stage / "problems.parquet").to_pylist()
    return [
        Problem(
            problem_id=r["problem_id"],
            source_row=r["source_row"],
            prompt=json.loads(r["prompt_messages_json"]),
            ground_truth=r["ground_truth"],
            data_source=r["data_source"] or "",
            reward_style=r["reward_style"] or "",
            extra_info=json.loads(r["extra_info_json"] or "{}"),
        )
        for r in rows
    ]


def _read_stage(stage: Path) -> _Rollouts | None:
    from gradsel.rollout.stage import read_rollout_shard
    from gradsel.store.directory import shard_done

    if not (stage / "problems.parquet").is_file():
        return None
    problems = {p.problem_id: p for p in _read_stage_problems(stage)}
    responses: dict[str, list] = {}
    prompt_ids: dict[str, list[int]] = {}
    i = 0
    while shard_done(stage, i):
        t = read_rollout_shard(stage, i, ["problem_id", "prompt_token_ids", "response_text", "reward", "answer_class"])
        for pid, ids, text, reward, cls in zip(*(t.column(c).to_pylist() for c in t.column_names)):
            responses.setdefault(pid, []).append((text, reward, cls))
            prompt_ids.setdefault(pid, ids)
        i += 1
    return _Rollouts(problems, responses, prompt_ids)


def store_stages(root: Path) -> tuple[list[_Rollouts], dict]:
    """The train rollouts of a store, oldest round first (one stage for a store without rounds),
    and the top manifest."""
    from gradsel.pipeline.rounds import round_dir
    from gradsel.store.directory import existing_store

    manifest = existing_store(root).read_manifest()
    dirs = (
        [round_dir(root, e["round"]) / "rollouts" / "train" for e in manifest.get("rounds", [])]
        if manifest.get("rounds_store")
        else [root / "rollouts" / "train"]
    )
    stages = [s for s in (_read_stage(d) for d in dirs) if s is not None and s.responses]
    if not stages:
        raise GradselError(
            f"store {root} holds no train rollouts to audit",
            "make them with `gradsel rollout --split train` or `gradsel score`",
        )
    return stages, manifest


# -- signals ------------------------------------------------------------------------------------


def normalise_question(problem: Problem) -> str:
    """The question as near-duplicates share it: the user turns' text, NFKC, lowercase, without
    punctuation, whitespace collapsed."""
    text = " ".join(m["content"] for m in problem.messages() if m.get("role") != "system")
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    # Whitespace collapsed, and none beside a symbol: "12 + 7 =" and "12+7=" are one question.
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" ?([^\w ]) ?", r"\1", text)


def _answers(problem: Problem, responses, reward_override: str | None) -> list[str | None]:
    """Each response's answer as its judge reads it (rewards.answer_judge)."""
    from gradsel.rewards.registry import answer_judge, resolve_reward

    judge = answer_judge(resolve_reward(problem, reward_override), problem)
    return [judge.answer(text) for text, _, _ in responses]


def rollout_evidence(problem: Problem, responses, reward_override: str | None) -> dict:
    """The key's share of the rollouts (paid ones) against the plurality answer class's share."""
    n = len(responses)
    answers = _answers(problem, responses, reward_override)
    counts: Counter = Counter(cls for _, _, cls in responses if cls is not None)
    key_share = sum(r > 0 for _, r, _ in responses) / n if n else 0.0
    if not counts:
        return {
            "n_rollouts": n,
            "key_share": key_share,
            "plurality_answer": None,
            "plurality_share": 0.0,
            "plurality_paid": False,
            "rollout_signal": 0.0,
            "answers": {},
        }
    top = max(counts.values())
    plurality = min(c for c, k in counts.items() if k == top)  # ties: the first answer seen
    first_answer = {}
    for (text, r, cls), a in zip(responses, answers):
        if cls is not None and cls not in first_answer and a is not None:
            first_answer[cls] = a
    paid = any(r > 0 for _, r, cls in responses if cls == plurality)
    share = top / n
    # Every distinct unpaid answer with its share: the candidates for a better key.
    unpaid = {
        first_answer[c]: k / n
        for c, k in counts.items()
        if c in first_answer and not any(r > 0 for _, r, cl in responses if cl == c)
    }
    return {
        "n_rollouts": n,
        "key_share": key_share,
        "plurality_answer": first_answer.get(plurality),
        "plurality_share": share,
        "plurality_paid": paid,
        "rollout_signal": 0.0 if paid else max(0.0, share - key_share),
        "answers": unpaid,
    }


def _canonical(problem: Problem, answer: str, reward_override: str | None) -> str:
    from gradsel.rewards.registry import answer_judge, resolve_reward

    judge = answer_judge(resolve_reward(problem, reward_override), problem)
    key = judge.key(answer) if judge.key is not None else None
    return key if key is not None else answer.strip()


def history_evidence(pid: str, stages: list[_Rollouts], reward_override: str | None) -> dict:
    """Across rounds holding the problem, first round to last: the change of the key's share, and
    where the last round's plurality answer is one the judge does not pay, the change of that
    answer's share and the history signal, (plurality growth - key growth) clipped to [-1, 1].
    No signal (None, neutral) with fewer than two rounds or a paid plurality."""
    seen = [s for s in stages if pid in s.responses]
    if len(seen) < 2:
        return {"rounds": len(seen)}
    problem = seen[-1].problems[pid]

    def key_share(stage: _Rollouts) -> float:
        resp = stage.responses[pid]
        return sum(r > 0 for _, r, _ in resp) / len(resp)

    k0, k1 = key_share(seen[0]), key_share(seen[-1])
    out = {"rounds": len(seen), "key_share_trend": k1 - k0}
    last = rollout_evidence(problem, seen[-1].responses[pid], reward_override)
    if last["plurality_answer"] is None or last["plurality_paid"]:
        return out
    target = _canonical(problem, last["plurality_answer"], reward_override)

    def plurality_share(stage: _Rollouts) -> float:
        resp = stage.responses[pid]
        answers = _answers(problem, resp, reward_override)
        return sum(a is not None and _canonical(problem, a, reward_override) == target for a in answers) / len(resp)

    p0, p1 = plurality_share(seen[0]), plurality_share(seen[-1])
    return {**out, "plurality_share_trend": p1 - p0, "history_signal": min(1.0, max(-1.0, (p1 - p0) - (k1 - k0)))}


def duplicate_evidence(
    problems: list[Problem], answers: dict[str, list[str]], canonical
) -> dict[str, tuple[list[str], float]]:
    """problem id -> (the differing keys of the problems with the same normalised question, best
    supported first; the duplicate signal). The group's rollouts are pooled: a key that fewer of
    them give than another key of the group scores 1, a tie 0.5, the best supported key 0."""
    groups: dict[str, list[Problem]] = {}
    for p in problems:
        groups.setdefault(normalise_question(p), []).append(p)
    out: dict[str, tuple[list[str], float]] = {}
    for members in groups.values():
        keys = {canonical(p, p.ground_truth) for p in members}
        if len(keys) < 2:
            continue
        pooled = Counter(a for p in members for a in answers.get(p.problem_id, []))
        for p in members:
            own = canonical(p, p.ground_truth)
            others = {
                canonical(q, q.ground_truth): q.ground_truth for q in members if canonical(q, q.ground_truth) != own
            }
            ranked = sorted(others, key=lambda k: (-pooled[k], k))
            best = pooled[ranked[0]]
            signal = 1.0 if best > pooled[own] else 0.5 if best == pooled[own] else 0.0
            out[p.problem_id] = ([others[k] for k in ranked], signal)
    return out


# -- the taught copy ----------------------------------------------------------------------------


def _sequences(tok, prompt_ids: list[int], texts: list[str]) -> list[tuple[list[int], int]]:
    """prompt + response ids for each text (its tokens, then EOS), with where the response starts."""
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            ids = ids + [tok.eos_token_id]
        out.append((list(prompt_ids) + ids, len(prompt_ids)))
    return out


def _response_logps(lm, seqs: list[tuple[list[int], int]], pad_id: int, batch: int = 64) -> list[float]:
    """Sum of log p(response token | prefix) for each sequence (right-padded batches)."""
    import torch

    out = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (s, _) in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for j, (s, start) in enumerate(chunk):
            targets = torch.tensor(s[start:])
            out.append(float(logp[j, start - 1 : len(s) - 1].gather(-1, targets[:, None]).sum()))
    return out


def teach_copy(model_path: Path, val: list[tuple[list[int], str]], cfg: AuditConfig):
    """A copy of the checkpoint after `cfg.teach_steps` full-batch AdamW steps of supervised
    fine-tuning on the validation rows' reference answers (prompt ids, key). Full-parameter:
    small models; the step count and learning rate are the audit's options (docs/audit.md)."""
    import torch

    from gradsel.inputs.models import load_causal_lm, load_tokenizer

    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(model_path)
    lm = load_causal_lm(model_path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    seqs = [s for ids, key in val for s in _sequences(tok, ids, [cfg.teach_template.format(answer=key)])]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)  # loss on the answer tokens only
    for j, (s, start) in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s)
        mask[j, : len(s)] = 1
        labels[j, start : len(s)] = torch.tensor(s[start:])
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.teach_lr, weight_decay=0.0)
    for step in range(cfg.teach_steps):
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        console.debug(f"audit: teach step {step + 1}/{cfg.teach_steps}, loss {loss.item():.4f}")
    lm.eval()
    return tok, lm, pad


# -- the audit ----------------------------------------------------------------------------------


def audit_stages(
    stages: list[_Rollouts],
    cfg: AuditConfig,
    *,
    reward_override: str | None = None,
    model_path: Path | None = None,
    val: list[tuple[list[int], str]] | None = None,
    pool: Path | None = None,
) -> AuditResult:
    """Every problem of the latest stage holding it, with its evidence; `val` (prompt ids, key)
    and `model_path` are needed when cfg.teach_steps > 0."""
    latest: dict[str, tuple[Problem, list, list[int]]] = {}
    for stage in stages:
        for pid, resp in stage.responses.items():
            latest[pid] = (stage.problems[pid], resp, stage.prompt_ids[pid])
    order = sorted(latest, key=lambda pid: (latest[pid][0].source_row, pid)) if len(stages) == 1 else sorted(latest)

    def canonical(problem: Problem, answer: str) -> str:
        return _canonical(problem, answer, reward_override)

    answers = {
        pid: [
            canonical(latest[pid][0], a)
            for a in _answers(latest[pid][0], latest[pid][1], reward_override)
            if a is not None
        ]
        for pid in order
    }
    dups = duplicate_evidence([latest[pid][0] for pid in order], answers, canonical)
    evidence, alternatives = [], []
    for pid in order:
        problem, resp, _ = latest[pid]
        roll = rollout_evidence(problem, resp, reward_override)
        alternatives.append(roll.pop("answers"))
        e = Evidence(
            problem_id=pid,
            source_row=problem.source_row,
            data_source=problem.data_source,
            key=problem.ground_truth,
            **roll,
        )
        for name, value in history_evidence(pid, stages, reward_override).items():
            setattr(e, name, value)
        if pid in dups:
            e.duplicate_keys, e.duplicate_signal = dups[pid]
        evidence.append(e)
    taught = cfg.teach_steps > 0
    if taught:
        if model_path is None or not val:
            raise GradselError(
                "--teach-steps needs validation rows and the store's checkpoint",
                "score the store with --val, pass --val, or use --teach-steps 0",
            )
        _taught_signals(evidence, alternatives, [latest[e.problem_id][2] for e in evidence], model_path, val, cfg)
    for e in evidence:
        e.suspicion = suspicion(e, cfg.history_weight)
        e.suspect = e.suspicion >= cfg.threshold and e.suspicion > 0
        if taught and e.taught_alternative is not None and e.taught_signal > 0.5:
            e.proposed_key = e.taught_alternative
        elif e.plurality_answer is not None and not e.plurality_paid:
            e.proposed_key = e.plurality_answer
        elif e.duplicate_keys and e.duplicate_signal == 1.0:
            e.proposed_key = e.duplicate_keys[0]
        elif taught and e.taught_alternative is not None:
            e.proposed_key = e.taught_alternative
    return AuditResult(evidence, cfg.threshold, taught, pool)


def suspicion(e: Evidence, history_weight: float = HISTORY_WEIGHT) -> float:
    """The mean of the snapshot signals (rollouts, taught), moved by the history signal where there
    is one, plus the duplicate signal's share, in [0, 1]."""
    signals = [e.rollout_signal] + ([e.taught_signal] if e.taught_signal is not None else [])
    history = history_weight * e.history_signal if e.history_signal is not None else 0.0
    return min(1.0, max(0.0, sum(signals) / len(signals) + history + DUPLICATE_WEIGHT * e.duplicate_signal))


def _taught_signals(
    evidence: list[Evidence],
    alternatives: list[dict],
    prompt_ids: list[list[int]],
    model_path: Path,
    val,
    cfg: AuditConfig,
) -> None:
    tok, lm, pad = teach_copy(model_path, val, cfg)
    seqs, spans = [], []
    for e, alts, ids in zip(evidence, alternatives, prompt_ids):
        texts = [e.key] + [a for a in alts if a.strip() != e.key.strip()] + e.duplicate_keys
        spans.append((len(seqs), texts))
        seqs += _sequences(tok, ids, [cfg.teach_template.format(answer=t) for t in texts])
    logps = _response_logps(lm, seqs, pad)
    for e, (start, texts) in zip(evidence, spans):
        scores = logps[start : start + len(texts)]
        e.taught_logp_key = scores[0]
        if len(texts) == 1:
            e.taught_signal = 0.0
            continue
        best = max(range(1, len(texts)), key=lambda i: (scores[i], -i))
        e.taught_alternative, e.taught_logp_alternative = texts[best], scores[best]
        e.taught_signal = 1.0 / (1.0 + math.exp(-(scores[best] - scores[0])))


def evidence_rows(result: AuditResult, *, suspects_only: bool = True) -> list[dict]:
    return [asdict(e) for e in (result.suspects if suspects_only else result.evidence)]


def val_rows_from_store(
    root: Path, manifest: dict, model_path: Path, val_file: Path | None
) -> list[tuple[list[int], str]]:
    """(prompt ids, key) of the validation rows: `val_file` when given, else the store's val rollouts'
    problems (a rounds store: its recorded --val file)."""
    from gradsel.inputs.models import load_tokenizer
    from gradsel.inputs.problems import read_problems
    from gradsel.rollout.prompts import encode_prompts

    if val_file is None and manifest.get("rounds_store"):
        val_file = Path(manifest["run"]["val"])
    if val_file is not None:
        problems = read_problems(val_file).problems
    else:
        stage = root / "rollouts" / "val"
        if not (stage / "problems.parquet").is_file():
            raise GradselError(
                f"store {root} holds no validation rows to teach with", "pass --val FILE, or --teach-steps 0"
            )
        problems = _read_stage_problems(stage)
    return list(zip(encode_prompts(load_tokenizer(model_path), problems), [p.ground_truth for p in problems]))


def store_checkpoint(root: Path, manifest: dict) -> Path:
    """The checkpoint the store's latest rollouts were made with."""
    from gradsel.inputs.snapshot import Snapshot, loadable_path
    from gradsel.pipeline.rounds import latest_round_store
    from gradsel.store.directory import Store

    sub = Store(latest_round_store(root))
    snap = sub.read_manifest().get("snapshot")
    if not snap:
        raise GradselError(f"store {root} records no checkpoint", "rerun `gradsel rollout` into it")
    return loadable_path(sub, Snapshot.from_dict(snap))


def pool_of(root: Path, manifest: dict) -> Path | None:
    """The problem file the store's train rollouts were read from (a rounds store: its pool)."""
    if manifest.get("rounds_store"):
        return Path(manifest["run"]["pool"])
    path = manifest.get("rollouts", {}).get("train", {}).get("problems_file")
    return Path(path) if path else None


# -- --fix --------------------------------------------------------------------------------------


def fixed_pool(pool: Path, changes: dict[str, tuple[str, str]], *, answer_key: str | None = None):
    """The pool with each changed problem's key replaced, everything else as the file holds it:
    for JSON lines the bytes of every unchanged line; for Parquet an Arrow table of the same
    schema. `changes`: problem id -> (audited key, new key). Refuses a pool whose key is not the
    audited one (the pool changed since its rollouts)."""
    from gradsel.inputs.problems import answer_field, is_jsonl, jsonl_lines, read_problems

    problems = {p.problem_id: p for p in read_problems(pool, answer_key=answer_key).problems}
    missing = [pid for pid in changes if pid not in problems]
    if missing:
        raise GradselError(
            f"{len(missing)} audited problems are not in {pool} (e.g. {missing[0]!r})",
            "pass the pool the store was made from with --pool (and its --answer-key, if any)",
        )
    moved = [pid for pid, (old, _) in changes.items() if problems[pid].ground_truth != old]
    if moved:
        raise GradselError(
            f"the key of {moved[0]!r} in {pool} is {problems[moved[0]].ground_truth!r}, "
            f"the store's rollouts were judged against {changes[moved[0]][0]!r}",
            "the pool changed since the rollouts: roll it out again, or pass the original with --pool",
        )
    by_row = {problems[pid].source_row: new for pid, (_, new) in changes.items()}
    if is_jsonl(pool):
        lines = jsonl_lines(pool.read_bytes())
        for row, key in by_row.items():
            obj = json.loads(lines[row])
            path = answer_field(obj, answer_key)
            _set(obj, path, key)
            lines[row] = json.dumps(obj, ensure_ascii=False).encode()
        return b"".join(line + b"\n" for line in lines)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pool)
    first = table.slice(0, 1).to_pylist()[0]
    path = answer_field(first, answer_key).split(".")
    return _replace_column(table, path, by_row, pa)


def _set(obj: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        obj = obj[p]
    old = obj[parts[-1]]
    # Keep the JSON type of a numeric key where the new one is a number too.
    if isinstance(old, (int, float)) and not isinstance(old, bool) and re.fullmatch(r"-?\d+", value.strip()):
        obj[parts[-1]] = int(value)
    else:
        obj[parts[-1]] = value


def _replace_column(table, path: list[str], by_row: dict[int, str], pa):
    """The table with the (nested) field at `path` replaced at rows `by_row`, same schema."""

    def replace(array, parts):
        if len(parts) == 0:
            values = array.to_pylist()
            for row, key in by_row.items():
                try:
                    values[row] = type(values[row])(key) if isinstance(values[row], (int, float)) else key
                except ValueError:
                    raise GradselError(
                        f"the proposed key {key!r} of row {row} does not fit the pool's {array.type} key column",
                        "fix that row by hand, or raise --threshold",
                    ) from None
            return pa.array(values, array.type)
        struct = array
        children = [struct.field(i) for i in range(struct.type.num_fields)]
        names = [struct.type.field(i).name for i in range(struct.type.num_fields)]
        i = names.index(parts[0])
        children[i] = replace(children[i], parts[1:])
        return pa.StructArray.from_arrays(
            children,
            fields=[struct.type.field(j) for j in range(len(names))],
            mask=struct.is_null() if struct.null_count else None,
        )

    i = table.schema.get_field_index(path[0])
    column = table.column(i).combine_chunks()
    return table.set_column(i, table.schema.field(i), replace(column, path[1:]))


# -- the command --------------------------------------------------------------------------------

OUT_SUFFIXES = (".parquet", ".jsonl")


def _check_output_path(path: Path, what: str, force: bool) -> None:
    if path.exists() and path.is_dir():
        raise GradselError(f"{what} {path} is a directory", "pass a file path")
    if path.exists() and not force:
        raise GradselError(f"{what} {path} exists", "pass --force to overwrite it, or choose another path")
    if not path.parent.is_dir():
        raise GradselError(f"{what} {path}: directory {path.parent} does not exist", "create it first")


def check_outputs(out: Path | None, fix: Path | None, pool: Path | None, force: bool) -> None:
    """Every refusal before any work, so a refused run writes nothing."""
    from gradsel.inputs.problems import is_jsonl

    if out is not None:
        if out.suffix.lower() not in OUT_SUFFIXES:
            raise GradselError(
                f"--out {out}: unknown format {out.suffix or '(no suffix)'}", "end it in .parquet or .jsonl"
            )
        _check_output_path(out, "--out", force)
    if fix is not None:
        if pool is None:
            raise GradselError(
                "--fix needs the pool the store was made from, and the store records none", "pass it with --pool"
            )
        if not pool.is_file():
            raise GradselError(f"the pool {pool} does not exist", "pass the pool the store was made from with --pool")
        if fix.resolve() == pool.resolve():
            raise GradselError(f"--fix {fix} is the pool itself", "the audit never edits the pool: choose another path")
        if is_jsonl(fix) != is_jsonl(pool):
            want = "a .jsonl" if is_jsonl(pool) else "a .parquet"
            raise GradselError(f"--fix {fix} is not in the pool's format", f"give it {want} suffix, as {pool.name} has")
        _check_output_path(fix, "--fix", force)
        _check_output_path(changes_path(fix), "--fix's change list", force)
        if out is not None and out.resolve() in (fix.resolve(), changes_path(fix).resolve()):
            raise GradselError("--out and --fix name the same file", "choose two paths")


def changes_path(fix: Path) -> Path:
    return fix.with_name(fix.name + ".changes.jsonl")


def _reward_override(manifest: dict) -> str | None:
    if manifest.get("rounds_store"):
        return manifest["run"]["ro"].get("reward")
    return manifest.get("rollouts", {}).get("train", {}).get("reward")


def run_audit(
    store: Path,
    cfg: AuditConfig,
    *,
    out: Path | None = None,
    fix: Path | None = None,
    pool: Path | None = None,
    val: Path | None = None,
    answer_key: str | None = None,
    force: bool = False,
) -> dict:
    """`gradsel audit`: audit the store, print the suspects, write --out and --fix. Returns the summary."""
    import pyarrow as pa

    from gradsel.core.fsutil import atomic_write_bytes, atomic_write_table
    from gradsel.core.schema import AUDIT_EVIDENCE

    cfg.validate()
    store = Path(store)
    stages, manifest = store_stages(store)
    pool = pool if pool is not None else pool_of(store, manifest)
    check_outputs(out, fix, pool, force)
    if val is not None and not val.is_file():
        raise GradselError(f"--val {val} does not exist", "pass the validation file, or leave --val out")
    model_path = val_rows = None
    if cfg.teach_steps:
        model_path = store_checkpoint(store, manifest)
        val_rows = val_rows_from_store(store, manifest, model_path, val)
    result = audit_stages(
        stages, cfg, reward_override=_reward_override(manifest), model_path=model_path, val=val_rows, pool=pool
    )
    suspects = result.suspects
    changes = {
        e.problem_id: (e.key, e.proposed_key)
        for e in suspects
        if e.proposed_key is not None and e.proposed_key.strip() != e.key.strip()
    }
    fixed = fixed_pool(pool, changes, answer_key=answer_key) if fix is not None else None
    print_table(result)
    if out is not None:
        rows = evidence_rows(result)
        if out.suffix.lower() == ".parquet":
            atomic_write_table(out, pa.Table.from_pylist(rows, schema=AUDIT_EVIDENCE))
        else:
            atomic_write_bytes(out, "".join(json.dumps(r) + "\n" for r in rows).encode())
    if fix is not None:
        change_rows = [
            {
                "problem_id": e.problem_id,
                "source_row": e.source_row,
                "old_key": e.key,
                "new_key": changes[e.problem_id][1],
                "suspicion": round(e.suspicion, 4),
            }
            for e in suspects
            if e.problem_id in changes
        ]
        if isinstance(fixed, bytes):
            atomic_write_bytes(fix, fixed)
        else:
            atomic_write_table(fix, fixed)
        atomic_write_bytes(changes_path(fix), "".join(json.dumps(r) + "\n" for r in change_rows).encode())
        for r in change_rows:
            console.info(f"changed {r['problem_id']} (row {r['source_row']}): key {r['old_key']!r} -> {r['new_key']!r}")
        console.info(f"wrote {fix}: {len(change_rows)} keys changed, listed in {changes_path(fix)}")
    return {
        "store": str(store),
        "problems": len(result.evidence),
        "suspects": len(suspects),
        "threshold": cfg.threshold,
        "taught": result.taught,
        "out": str(out) if out else None,
        "fix": str(fix) if fix else None,
        "changed": len(changes) if fix else 0,
    }


def print_table(result: AuditResult, limit: int = 40) -> None:
    """The suspects, most suspicious first, on stderr."""
    from rich.table import Table

    suspects = sorted(result.suspects, key=lambda e: (-e.suspicion, e.problem_id))
    console.info(f"audit: {len(suspects)} of {len(result.evidence)} problems at suspicion >= {result.threshold}")
    if not suspects:
        return
    table = Table(title="suspect keys", title_justify="left")
    for col in (
        "problem",
        "key",
        "proposed",
        "suspicion",
        "key share",
        "plurality share",
        "duplicates",
        *(["taught p(alt)"] if result.taught else []),
    ):
        table.add_column(col, overflow="fold")
    for e in suspects[:limit]:
        table.add_row(
            e.problem_id,
            e.key,
            e.proposed_key or "-",
            f"{e.suspicion:.2f}",
            f"{e.key_share:.2f}",
            f"{e.plurality_share:.2f} ({e.plurality_answer})" if e.plurality_answer is not None else "-",
            ", ".join(e.duplicate_keys) or "-",
            *([f"{e.taught_signal:.2f}" if e.taught_signal is not None else "-"] if result.taught else []),
        )
    console.stderr.print(table)
    if len(suspects) > limit:
        console.info(f"... and {len(suspects) - limit} more (--out lists them all)")
