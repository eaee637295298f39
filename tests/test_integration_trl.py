"""gradsel.integrations.trl against TRL's own GRPOTrainer on tiny-arith: the trainer draws only
the selected problems, in RepeatSampler's groups, and follows a new selection between epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradsel.core.errors import GradselError
from gradsel.demo.tasks import write_regime
from gradsel.inputs.models import resolve_model_path
from gradsel.integrations import recorded_selection
from gradsel.integrations.trl import SelectionSampler
from helpers import run_cli

SCORE = ["--engine", "hf", "--max-tokens", "6", "--n", "4", "--n-val", "4"]
SELECT = ["--top-k", "4", "--allow-fewer", "--include-zero-advantage", "--format", "ids"]


# -- the sampler alone -------------------------------------------------------------------------


def test_sampler_groups_like_repeat_sampler_and_draws_only_the_selection():
    from trl.trainer.utils import RepeatSampler

    selected = [3, 17, 8, 11, 40, 2]
    sampler = SelectionSampler(selected, mini_repeat_count=2, batch_size=3, repeat_count=2, seed=0)
    ours = list(sampler)
    theirs = list(RepeatSampler(range(6), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=0))
    assert len(ours) == len(sampler) == len(theirs) == 24
    # The same layout: each prompt twice in a row, each 3-prompt batch twice.
    assert all(ours[i] == ours[i + 1] for i in range(0, 24, 2))
    assert ours[0:6] == ours[6:12] and ours[12:18] == ours[18:24]
    assert sorted(set(ours)) == sorted(selected)
    # The same order on every rank: a second sampler (another process) yields the same indices.
    assert list(SelectionSampler(selected, mini_repeat_count=2, batch_size=3, repeat_count=2, seed=0)) == ours
    sampler.set_epoch(1)
    assert list(sampler) != ours and sorted(set(sampler)) == sorted(selected)


def test_sampler_swaps_at_the_next_generation_batch_and_keeps_its_length():
    sampler = SelectionSampler([1, 2, 3, 4], mini_repeat_count=2, batch_size=2, seed=5)
    it = iter(sampler)
    first_batch = [next(it) for _ in range(4)]
    sampler.set_selection([50, 60, 70])
    rest = list(it)  # the epoch's second (last) batch: two of the new selection
    assert set(first_batch) <= {1, 2, 3, 4} and set(rest) <= {50, 60, 70} and len(set(rest)) == 2
    assert len(first_batch + rest) == len(sampler) == 8


def test_rank_weighting_draws_the_best_ranked_most():
    from gradsel.integrations.trl import rank_weights

    sampler = SelectionSampler(
        list(range(4)), prompts_per_epoch=4000, mini_repeat_count=1, batch_size=4, weights=rank_weights(4)
    )
    drawn = list(sampler)
    counts = [drawn.count(i) for i in range(4)]
    assert counts == sorted(counts, reverse=True) and counts[0] > 3 * counts[3], counts


def test_sampler_refuses_an_epoch_without_a_whole_batch():
    with pytest.raises(GradselError, match="no whole generation batch"):
        SelectionSampler([1], mini_repeat_count=2, batch_size=2)


# -- TRL's GRPOTrainer -------------------------------------------------------------------------


def reward_recorder(drawn: list[list[str]]):
    """gradsel's registry reward, in TRL's reward-function signature, noting the problems of every
    generation batch the trainer drew."""
    from gradsel.inputs.problems import Problem
    from gradsel.rewards.registry import resolve_reward

    def reward(completions, reward_model, extra_info, data_source, **_):
        drawn.append([f"{s}:{e['index']}" for s, e in zip(data_source, extra_info)])
        out = []
        for completion, rm, extra, source in zip(completions, reward_model, extra_info, data_source):
            text = completion[0]["content"] if isinstance(completion, list) else completion
            problem = Problem(
                str(extra["index"]),
                0,
                "",
                rm["ground_truth"],
                data_source=source,
                reward_style=rm["style"],
                extra_info=extra,
            )
            out.append(resolve_reward(problem)(problem, text, 0, 0))
        return out

    return reward


def grpo_config(out: Path, epochs: int, save: str = "no"):
    from trl import GRPOConfig

    # 4 completions a step = 2 prompts x 2 generations; 4 selected prompts = 2 steps an epoch.
    return GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        num_train_epochs=epochs,
        learning_rate=1e-3,
        beta=0.0,
        temperature=1.0,
        logging_steps=1,
        save_strategy=save,
        report_to=[],
        use_cpu=True,
        seed=0,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )


def trainer(model, pool: Path, store: Path, out: Path, drawn: list, epochs: int, **kwargs):
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from gradsel.integrations.trl import GradselGRPOTrainer

    save = kwargs.pop("save", "no")
    return GradselGRPOTrainer(
        model=str(model),
        reward_funcs=reward_recorder(drawn),
        args=grpo_config(out, epochs, save),
        train_dataset=load_dataset("parquet", data_files=str(pool))["train"],
        processing_class=AutoTokenizer.from_pretrained(model),
        store=store,
        **kwargs,
    )


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.trainer
def test_grpo_trainer_follows_a_refresh_between_epochs(tmp_path):
    """One GRPOTrainer run: epoch 1 draws round 0's selection; between the epochs, another process
    (`gradsel refresh`, started by the callback) scores the next chunk with the checkpoint of epoch 1
    and selects from it; epoch 2 draws exactly that selection. Then two separate runs given the same two selections (the second resuming the
    first's checkpoint, as a relaunch does) end with the same weights, bit for bit."""
    pytest.importorskip("trl")
    import torch

    model = resolve_model_path("tiny-arith")
    pool, val = write_regime(tmp_path / "data", "clean", size=40, val_size=4, seed=3)
    store = tmp_path / "store"
    run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(store),
        "--chunk-size",
        "8",
        *SCORE,
    )
    run_cli("select", "--store", str(store), *SELECT, "--out", str(tmp_path / "round0.txt"))

    drawn: list[list[str]] = []
    # follow="epoch" + refresh: at the end of epoch 1 the callback saves the policy and runs
    # `gradsel refresh` (another process) on it, then swaps in what that refresh selected.
    following = trainer(model, pool, store, tmp_path / "a", drawn, epochs=2, follow="epoch", refresh=SELECT)
    initial = weights(following.model)
    following.train()
    rounds = [recorded_selection(store, r).problem_ids for r in (0, 1)]
    assert len(drawn) == 4 and following.gradsel.history == [(2, 1)]
    assert recorded_selection(store).round == 1 and (tmp_path / "a/gradsel-step-2/model.safetensors").is_file()
    assert sorted(set(drawn[0] + drawn[1])) == sorted(rounds[0])  # epoch 1: round 0's selection, each once
    assert sorted(set(drawn[2] + drawn[3])) == sorted(rounds[1])  # epoch 2: what the refresh selected
    assert not set(rounds[0]) & set(rounds[1])
    assert all(d[0] == d[1] and d[2] == d[3] for d in drawn)  # each prompt's 2 generations side by side
    final = weights(following.model)
    assert any(not torch.equal(initial[k], final[k]) for k in initial)  # it trained: the check below means something

    # Two separate runs given the same selections: round 0's for one epoch (saving its
    # checkpoint), then a relaunch on round 1's selection that resumes it.
    first: list[list[str]] = []
    trainer(model, pool, store, tmp_path / "b", first, epochs=1, selection_round=0, follow=None, save="epoch").train()
    second: list[list[str]] = []
    relaunch = trainer(model, pool, store, tmp_path / "b", second, epochs=2, selection_round=1, follow=None)
    relaunch.train(resume_from_checkpoint=str(tmp_path / "b/checkpoint-2"))
    assert first + second == drawn
    resumed = weights(relaunch.model)
    assert all(torch.equal(final[k], resumed[k]) for k in final), [
        k for k in final if not torch.equal(final[k], resumed[k])
    ]


def test_trainer_refuses_a_store_without_a_selection(tmp_path):
    pytest.importorskip("trl")
    pool, val = write_regime(tmp_path / "data", "clean", size=12, val_size=4, seed=3)
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"format_version": 2, "rounds_store": True, "rounds": []}))
    with pytest.raises(GradselError, match="no complete round"):
        trainer(resolve_model_path("tiny-arith"), pool, store, tmp_path / "a", [], epochs=1)


# -- the callback's reading of the store ---------------------------------------------------------


def rounds_store(root: Path, selections: dict[int, list[str] | None]) -> Path:
    """A store's round lineage as `score --chunk-size` and `refresh` record it: complete rounds
    (with their checkpoint hash) and each round's selection.json where `select` ran."""
    rounds = []
    for index, ids in selections.items():
        directory = root / "rounds" / f"round-{index:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        rounds.append(
            {
                "round": index,
                "dir": f"rounds/round-{index:03d}",
                "chunk_ids": ids or [],
                "model": "m",
                "checkpoint": f"sha256:{index}",
            }
        )
        if ids is not None:
            (directory / "selection.json").write_text(json.dumps({"selected_ids": ids}))
    (root / "manifest.json").write_text(json.dumps({"format_version": 2, "rounds_store": True, "rounds": rounds}))
    return root


def test_callback_waits_for_a_selection_then_swaps_it_in(tmp_path, capfd):
    from gradsel.integrations.trl import FollowSelection

    ids = [f"arith/add1:{i}" for i in range(12)]
    store = rounds_store(tmp_path / "store", {0: ids[:4], 1: None})  # refresh done, its select not yet
    follow = FollowSelection(store)
    follow.position_of = {pid: i for i, pid in enumerate(ids)}
    follow.current = recorded_selection(store, 0)
    follow.sampler = SelectionSampler(follow.positions(follow.current)[0], mini_repeat_count=2, batch_size=2)
    assert not follow.reload(global_step=2) and set(follow.sampler) == {0, 1, 2, 3}
    assert "warning: keeping round 0's selection: round 1" in capfd.readouterr().err
    rounds_store(tmp_path / "store", {0: ids[:4], 1: ids[6:10]})  # `gradsel select` ran
    assert follow.reload(global_step=4) and set(follow.sampler) == {6, 7, 8, 9}
    assert not follow.reload(global_step=6) and follow.history == [(4, 1)]  # nothing new: no swap
    rounds_store(tmp_path / "store", {0: ids[:4], 1: ids[6:10], 2: ["gsm8k:1"] * 4})  # not in the dataset
    assert not follow.reload(global_step=8) and set(follow.sampler) == {6, 7, 8, 9}
    assert "(first: gsm8k:1)" in capfd.readouterr().err
