"""verl's V1 custom sampler (gradsel/integrations/verl_sampler.py): the ranking file it reads, and
the subclass run as verl's own trainer code builds and feeds it, over a real TransferQueue (Ray
actors on this machine). Only the rollout workers (vLLM servers behind AgentLoopManagerTQ) are not
run: a stand-in writes each group's rollouts to TransferQueue the way AgentLoopWorkerTQ does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from benchmarks.truth import model_wrong_key
from gradsel.demo.tasks import write_regime
from gradsel.integrations import recorded_selection
from helpers import ROOT, VERL_PYTHON, run_cli, skip_unless_importable

# A wrong-answer pool, so that `gradsel audit` has suspects; n 8 so some problems are mixed.
SCORE = ["--engine", "hf", "--max-tokens", "8", "--n", "8", "--n-val", "8", "--seed", "0"]


@pytest.fixture(scope="module")
def flagged_store(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(pool, store, suspects): one scored round of 24 problems, a selection, `gradsel audit --out`."""
    tmp = tmp_path_factory.mktemp("verl-sampler")
    pool, val = write_regime(
        tmp / "data", "wrong-answer", size=24, val_size=8, seed=0, wrong_key=model_wrong_key("tiny-arith")
    )
    run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(tmp / "store"),
        "--chunk-size",
        "24",
        *SCORE,
    )
    run_cli(
        "select",
        "--store",
        str(tmp / "store"),
        "--top-k",
        "8",
        "--allow-fewer",
        "--format",
        "ids",
        "--out",
        str(tmp / "round0.txt"),
    )
    run_cli("audit", "--store", str(tmp / "store"), "--out", str(tmp / "suspects.jsonl"))
    return pool, tmp / "store", tmp / "suspects.jsonl"


def write_ranking(store: Path, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m gradsel.integrations.verl`, the ranking file's writer, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "gradsel.integrations.verl", "--store", str(store), "--out", str(out), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow  # the fixture scores a round: about 2 minutes here
def test_the_ranking_file_carries_each_problems_latest_flags(flagged_store, tmp_path):
    _, store, suspects = flagged_store
    out = tmp_path / "ranking.parquet"
    proc = write_ranking(store, out, "--audit", str(suspects))
    rows = {r["problem_id"]: r for r in pq.read_table(out).to_pylist()}
    round0 = store / "rounds/round-000"
    features = json.loads((round0 / "manifest.json").read_text())["features"]
    scores = pq.read_table(round0 / features / "scores.parquet").to_pylist()
    train = {r["problem_id"]: r for r in scores if r["split"] == "train"}
    assert set(rows) == set(train) and f"{len(rows)} problems" in proc.stderr
    assert {p for p, r in rows.items() if r["zero_advantage"]} == {p for p, r in train.items() if r["zero_advantage"]}
    listed = {json.loads(line)["problem_id"] for line in suspects.read_text().splitlines()}
    assert listed and {p for p, r in rows.items() if r["suspect_key"]} == listed
    for pid, r in rows.items():
        consistency = train[pid]["judge_consistency"]
        unmeasured = consistency is None or math.isnan(consistency)  # select reads it as 1
        expected = 0.0 if train[pid]["breaks_contract"] else 1.0 if unmeasured else consistency
        assert r["round"] == 0 and r["judge_reliability"] == pytest.approx(expected)
    selected = recorded_selection(store).problem_ids
    assert [p for p, r in sorted(rows.items(), key=lambda kv: kv[1]["selected_rank"] or 10**9)][
        : len(selected)
    ] == selected

    bad = write_ranking(tmp_path / "nowhere", tmp_path / "r.parquet", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "hint:" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "r.parquet").exists()
    bad = write_ranking(store, tmp_path / "r.parquet", "--audit", str(tmp_path / "missing.jsonl"), check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and not (tmp_path / "r.parquet").exists()


# Run in verl's environment: verl's PPOTrainer methods (the dataloader fetch, the uid, the prompt
# registration in TransferQueue, the refill, the custom sampler's loading) on an object that holds
# only what they read; the groups' rollouts written as AgentLoopWorkerTQ._agent_loop_postprocess
# writes them, finished at once.
VERL_DRIVER = textwrap.dedent("""
    import json, os, shutil, sys
    import ray, torch, transfer_queue as tq
    from omegaconf import OmegaConf
    from torchdata.stateful_dataloader import StatefulDataLoader
    from transformers import AutoTokenizer
    import verl
    from verl.trainer.ppo.utils import create_rl_sampler
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict
    from tensordict import NonTensorData, NonTensorStack

    pool, model, ranking, next_ranking = sys.argv[1:5]
    N = 4  # rollouts a group
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))

    class AgentLoopStandIn:  # AgentLoopManagerTQ.generate_sequences, every group finished at once
        def __init__(self):
            self.submitted = []  # problem ids, in submission order
        def generate_sequences(self, batch):
            for i in range(len(batch)):
                prompt = {}
                for k, v in batch.items():  # as AgentLoopWorkerTQ.generate_sequences splits the batch
                    prompt[k] = v[i] if isinstance(v, torch.Tensor) else v[i].data if isinstance(v, NonTensorStack) else v.data
                uid = prompt["uid"]
                self.submitted.append(f"{prompt['data_source']}:{prompt['extra_info']['index']}")
                fields = [dict(prompt, session_id=s, rm_scores=torch.tensor([float(s % 2)])) for s in range(N)]
                tq.kv_batch_put(keys=[f"{uid}_{s}_0" for s in range(N)], fields=list_of_dict_to_tensordict(fields),
                                tags=[{"status": "success", "global_steps": prompt["global_steps"]}] * N,
                                partition_id="train")
                tq.kv_put(key=uid, partition_id="train", tag={"status": "finished"})

    sampler_defaults = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer/config/ppo_trainer.yaml")).trainer.v1.sampler

    class Trainer:  # what PPOTrainer's replay-buffer and refill methods read
        _build_replay_buffer = PPOTrainer._build_replay_buffer
        _fetch_one_gen_batch = PPOTrainer._fetch_one_gen_batch
        _next_train_batch = PPOTrainer._next_train_batch
        _submit_batch_to_rollout = PPOTrainer._submit_batch_to_rollout
        _add_prompts_to_generate = PPOTrainer._add_prompts_to_generate

        def __init__(self, batch_size, sampler_kwargs, mode="sync", name="GradselReplayBuffer"):
            data = {"prompt_key": "prompt", "max_prompt_length": 256, "filter_overlong_prompts": True,
                    "truncation": "error", "return_raw_chat": True, "shuffle": False, "seed": 1,
                    "dataloader_num_workers": 0, "train_batch_size": batch_size, "gen_batch_size": 1}
            sampler = OmegaConf.merge(sampler_defaults, {"sync_refill_failed_groups": True, "sampler_kwargs": sampler_kwargs,
                "custom_sampler": {"path": "pkg://gradsel.integrations.verl_sampler", "name": name}})
            self.config = OmegaConf.create({"data": data, "trainer": {"v1": {"trainer_mode": mode, "sampler": sampler}}})
            self.trainer_mode = mode
            dataset = RLHFDataset(data_files=[pool], tokenizer=AutoTokenizer.from_pretrained(model), config=self.config.data)
            self.train_dataloader = StatefulDataLoader(dataset, batch_size=1, drop_last=True, collate_fn=collate_fn,
                                                       sampler=create_rl_sampler(self.config.data, dataset))
            self.train_dataloader_it = None
            self.agent_loop_manager = AgentLoopStandIn()
            self.refills = []
            self.replay_buffer = self._build_replay_buffer()

        def _add_prompts_to_generate(self, num_prompts):
            self.refills.append(num_prompts)
            return PPOTrainer._add_prompts_to_generate(self, num_prompts)

        def step(self, global_steps, batch_size):  # PPOTrainer.prepare_step, then the sampling
            self.global_steps = global_steps
            start, refills = len(self.agent_loop_manager.submitted), len(self.refills)
            self._submit_batch_to_rollout(self._next_train_batch(batch_size))
            meta, metrics = self.replay_buffer.sample(global_steps, "train", batch_size)
            uids = sorted({key.split("_")[0] for key in meta.keys})
            data = tq.kv_batch_get(keys=[f"{uid}_0_0" for uid in uids], partition_id="train",
                                   select_fields=["data_source", "extra_info"])
            sampled = [f"{ds}:{info['index']}" for ds, info in zip(data["data_source"], data["extra_info"])]
            tq.kv_clear(partition_id="train", keys=list(meta.keys))  # the trainer drops a consumed batch
            return {"submitted": self.agent_loop_manager.submitted[start:], "sampled": sampled,
                    "metrics": {k: v for k, v in metrics.items() if not k.startswith("_")},
                    "refills": self.refills[refills:], "ranking_reads": self.replay_buffer.ranking_reads}

    out = {}
    # Every flag evicts; the file names the zero-advantage problems (no audit yet).
    first = Trainer(4, {"ranking": ranking})
    out["class"] = type(first.replay_buffer).__module__ + "." + type(first.replay_buffer).__name__
    out["first"] = first.step(1, 4)
    # A second run that evicts suspect keys only: none flagged, until the file is rewritten.
    second = Trainer(4, {"ranking": ranking, "evict": ["suspect_key"]})
    second.train_dataloader_it = first.train_dataloader_it  # go on where the first left the pool
    out["before"] = second.step(2, 4)
    shutil.copyfile(next_ranking, ranking + ".tmp")
    os.replace(ranking + ".tmp", ranking)  # as gradsel writes it: whole, a new mtime
    out["after_rows"] = int(sys.argv[5])
    out["after"] = second.step(3, int(sys.argv[5]))
    # The async buffer, every flag evicting, from the pool's first row again.
    third = Trainer(4, {"ranking": ranking}, mode="colocate_async", name="GradselReplayBufferAsync")
    out["async_class"] = type(third.replay_buffer).__name__
    out["async"] = third.step(4, 4)
    print(json.dumps(out))
    tq.close()
    ray.shutdown()
""")


@pytest.mark.slow
@pytest.mark.trainer
def test_verls_replay_buffer_evicts_flagged_groups_and_follows_a_rewritten_ranking(flagged_store, tmp_path):
    """verl's own `_build_replay_buffer` loads GradselReplayBuffer from its custom_sampler path; on a
    real TransferQueue its `sample` returns only unflagged groups, the flagged ones cleared and
    refilled through verl's `_add_prompts_to_generate`, and a rewritten ranking file is read once,
    at its next sample, not at every poll."""
    skip_unless_importable(VERL_PYTHON, "transfer_queue", "verl", "GRADSEL_VERL_PYTHON")
    from gradsel.inputs.models import resolve_model_path

    pool, store, suspects = flagged_store
    ranking, next_ranking = tmp_path / "ranking.parquet", tmp_path / "ranking-next.parquet"
    write_ranking(store, ranking)
    write_ranking(store, next_ranking, "--audit", str(suspects))
    rows = {r["problem_id"]: r for r in pq.read_table(next_ranking).to_pylist()}
    order = [f"{r['data_source']}:{r['extra_info']['index']}" for r in pq.read_table(pool).to_pylist()]
    zero = {p for p in order if rows[p]["zero_advantage"]}
    suspect = {p for p in order if rows[p]["suspect_key"]}

    # What each step must draw, walking the pool in order (verl's sequential sampler, one prompt a fetch).
    def draw(start: int, want: int, flagged: set[str]) -> tuple[list[str], list[str]]:
        taken, kept = [], []
        for pid in order[start:]:
            if len(kept) == want:
                break
            taken.append(pid)
            if pid not in flagged:
                kept.append(pid)
        return taken, kept

    first_taken, first_kept = draw(0, 4, zero)
    second_taken, _ = draw(len(first_taken), 4, set())
    start = len(first_taken) + len(second_taken)
    later_suspects = [p for p in order[start:] if p in suspect]
    assert later_suspects, "precondition: the audit flags a problem past the first two steps' rows"
    after_rows = len(order) - start - len(later_suspects)  # every remaining row is drawn in step 3

    proc = subprocess.run(
        [
            str(VERL_PYTHON),
            "-c",
            VERL_DRIVER,
            str(pool),
            str(resolve_model_path("tiny-arith")),
            str(ranking),
            str(next_ranking),
            str(after_rows),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["class"] == "gradsel.integrations.verl_sampler.GradselReplayBuffer"

    first = out["first"]
    evicted = [p for p in first_taken if p in zero]
    assert first["submitted"] == first_taken and sorted(first["sampled"]) == sorted(first_kept)
    assert sum(first["refills"]) == len(evicted)  # each evicted group replaced by one fresh prompt
    if evicted:
        assert first["metrics"]["training/gradsel/evicted_samples"] == len(evicted)
        assert first["metrics"]["training/gradsel/evicted_zero_advantage"] == len(evicted)
        assert "training/rollout_failure/evicted_samples" not in first["metrics"]

    before, after = out["before"], out["after"]
    assert sorted(before["sampled"]) == sorted(before["submitted"]) == sorted(second_taken)  # nothing flagged yet
    assert before["refills"] == [] and before["ranking_reads"] == 1
    assert sorted(after["submitted"]) == sorted(order[start:])
    assert sorted(after["sampled"]) == sorted(p for p in order[start:] if p not in suspect)
    assert after["metrics"]["training/gradsel/evicted_suspect_key"] == len(later_suspects)
    assert after["ranking_reads"] == 2  # the rewritten file read once, however many polls

    # The async buffer (colocate_async) evicts under every flag of the rewritten file.
    async_taken, async_kept = draw(0, 4, zero | suspect)
    assert out["async_class"] == "GradselReplayBufferAsync"
    assert out["async"]["submitted"] == async_taken and sorted(out["async"]["sampled"]) == sorted(async_kept)
    assert sum(out["async"]["refills"]) == len(async_taken) - 4
