"""`gradsel handoff verl`: the next round's Parquet, the launcher's overrides, and the stale
dataloader state of verl's latest checkpoint moved aside, on a checkpoint directory laid out as
verl's `_save_checkpoint` writes it (gradsel/integrations/verl.py says where that was checked)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gradsel.demo.tasks import write_regime
from gradsel.inputs.problems import read_problems
from gradsel.integrations import recorded_selection
from helpers import OPENRLHF_PYTHON, ROOT, VERL_PYTHON, run_cli, skip_unless_importable

SCORE = ["--engine", "hf", "--max-tokens", "6", "--n", "4", "--n-val", "4"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store with rounds whose round 0 has a recorded selection of 4 problems."""
    tmp = tmp_path_factory.mktemp("handoff")
    pool, val = write_regime(tmp / "data", "clean", size=24, val_size=4, seed=3)
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
        "8",
        *SCORE,
    )
    run_cli(
        "select",
        "--store",
        str(tmp / "store"),
        "--top-k",
        "4",
        "--allow-fewer",
        "--include-zero-advantage",
        "--format",
        "ids",
        "--out",
        str(tmp / "round0.txt"),
    )
    return tmp / "store"


def write_dataloader_state(path: Path, rows: int = 8, consumed: int = 1) -> None:
    """data.pt as verl saves it: torch.save(StatefulDataLoader.state_dict()) mid-epoch. gradsel never
    reads it (it only moves it), so where torchdata is missing a torch.save'd dict stands in."""
    import torch

    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        torch.save({"_num_yielded": consumed, "_sampler_iter_yielded": consumed}, path)
        return
    loader = StatefulDataLoader(list(range(rows)), batch_size=2, shuffle=True, drop_last=True)
    it = iter(loader)
    for _ in range(consumed):
        next(it)
    torch.save(loader.state_dict(), path)


def verl_checkpoints(root: Path, steps=(3, 6)) -> Path:
    """trainer.default_local_dir after verl saved at each of `steps` (FSDP, one rank, no critic)."""
    for step in steps:
        actor = root / f"global_step_{step}" / "actor"
        (actor / "huggingface").mkdir(parents=True)
        for name in ("model", "optim", "extra_state"):
            (actor / f"{name}_world_size_1_rank_0.pt").write_bytes(b"shard")
        (actor / "huggingface" / "config.json").write_text("{}")
        write_dataloader_state(root / f"global_step_{step}" / "data.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(steps[-1]))
    return root


def handoff(store, ckpts, *args, check=True):
    return run_cli("handoff", "verl", "--store", str(store), "--checkpoints", str(ckpts), *args, check=check)


def test_handoff_writes_the_selection_moves_the_stale_state_and_prints_the_overrides(store, tmp_path):
    ckpts = verl_checkpoints(tmp_path / "ckpts")
    state = (ckpts / "global_step_6/data.pt").read_bytes()
    proc = handoff(store, ckpts, "--train-batch-size", "2", "--epochs", "2")
    out = ckpts / "gradsel-round-000.parquet"
    # 4 problems in batches of 2: 2 steps an epoch; resumed at step 6 = epoch 3; 2 more epochs.
    assert proc.stdout.splitlines() == [
        f"data.train_files={out} trainer.resume_mode=auto trainer.default_local_dir={ckpts} "
        "trainer.total_epochs=5 trainer.total_training_steps=10"
    ]
    selected = recorded_selection(store).problem_ids
    assert [p.problem_id for p in read_problems(out).problems] == selected  # rank order, verl's rows
    assert pq.read_schema(out).names == pq.read_schema(store / "rounds/round-000/chunk.parquet").names
    moved = ckpts / "global_step_6/data.pt.stale-before-round-000"
    assert not (ckpts / "global_step_6/data.pt").exists() and moved.read_bytes() == state
    assert (ckpts / "global_step_3/data.pt").is_file()  # only the checkpoint verl resumes is touched
    assert str(moved) in proc.stderr

    again = handoff(store, ckpts, "--train-batch-size", "2", check=False)
    assert again.returncode == 2 and "exists" in again.stderr and "hint:" in again.stderr
    forced = handoff(store, ckpts, "--train-batch-size", "2", "--force")
    assert f"already moved aside to {moved}" in forced.stderr and moved.read_bytes() == state


@pytest.mark.parametrize(
    "case",
    [
        "no-store",
        "no-checkpoints",
        "no-tracker",
        "tracker-names-missing-step",
        "batch-larger-than-selection",
        "no-selection-yet",
        "out-is-a-directory",
    ],
)
def test_bad_input_exits_2_and_touches_nothing(store, tmp_path, case):
    ckpts = verl_checkpoints(tmp_path / "ckpts")
    args = ["--train-batch-size", "2"]
    use_store = store
    if case == "no-store":
        use_store = tmp_path / "nowhere"
    elif case == "no-checkpoints":
        shutil.rmtree(ckpts)
    elif case == "no-tracker":
        (ckpts / "latest_checkpointed_iteration.txt").unlink()
    elif case == "tracker-names-missing-step":
        (ckpts / "latest_checkpointed_iteration.txt").write_text("9")
    elif case == "batch-larger-than-selection":
        args = ["--train-batch-size", "5"]
    elif case == "no-selection-yet":  # a refresh ran, its select did not
        use_store = tmp_path / "store"
        shutil.copytree(store, use_store)
        (use_store / "rounds/round-000/selection.json").unlink()
    elif case == "out-is-a-directory":
        args += ["--out", str(tmp_path)]
    proc = handoff(use_store, ckpts, *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert lines[0].startswith("error:") and lines[1].startswith("hint:") and "Traceback" not in proc.stderr
    if ckpts.is_dir():
        assert not list(ckpts.glob("*.parquet")) and not list(ckpts.glob("global_step_*/data.pt.stale*"))
        assert (ckpts / "global_step_6/data.pt").is_file()


VERL_LOADER = textwrap.dedent("""
    import json, sys, torch
    from omegaconf import OmegaConf
    from torchdata.stateful_dataloader import StatefulDataLoader
    from transformers import AutoTokenizer
    from verl.trainer.ppo.utils import create_rl_sampler
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 256, "filter_overlong_prompts": True,
                               "truncation": "error", "return_raw_chat": True, "shuffle": True, "seed": 1,
                               "dataloader_num_workers": 0})

    def loader(data_file, model):  # verl's train dataloader (ray_trainer._create_dataloader), batch 2
        dataset = RLHFDataset(data_files=[data_file], tokenizer=AutoTokenizer.from_pretrained(model), config=config)
        return StatefulDataLoader(dataset, batch_size=2, drop_last=True, collate_fn=collate_fn,
                                  sampler=create_rl_sampler(config, dataset))

    def indices(batches):
        return [i for batch in batches for i in batch["index"].tolist()]

    command, data_file, model, state = sys.argv[1:5]
    if command == "save":  # verl's _save_checkpoint, one batch into the old file
        old = loader(data_file, model)
        next(iter(old))
        torch.save(old.state_dict(), state)
    else:
        fresh = loader(data_file, model)  # the resumed run without data.pt
        stale = loader(data_file, model)  # what _load_checkpoint does when data.pt is still there
        stale.load_state_dict(torch.load(state, weights_only=False))
        print(json.dumps({"rows": len(fresh.dataset), "fresh": indices(fresh), "stale": indices(stale)}))
""")


def run_verl(*args: str) -> str:
    proc = subprocess.run(
        [str(VERL_PYTHON), "-c", VERL_LOADER, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_handed_off_parquet_loads_in_verls_own_dataset_and_the_moved_state_would_skip_it(store, tmp_path):
    """verl's RLHFDataset (with its prompt filtering and chat template) reads the hand-off's Parquet,
    verl's sampler over a fresh StatefulDataLoader yields every selected row, and a loader that
    loads the moved-aside state (what verl's resume does with data.pt) would skip some: the hazard
    the hand-off removes. Runs in a separate environment where verl is installed."""
    skip_unless_importable(VERL_PYTHON, "verl.utils.dataset.rl_dataset", "verl", "GRADSEL_VERL_PYTHON")
    from gradsel.inputs.models import resolve_model_path

    model = str(resolve_model_path("tiny-arith"))
    ckpts = verl_checkpoints(tmp_path / "ckpts")
    run_verl("save", str(store / "rounds/round-000/chunk.parquet"), model, str(ckpts / "global_step_6/data.pt"))
    handoff(store, ckpts, "--train-batch-size", "2")
    seen = json.loads(
        run_verl(
            "check",
            str(ckpts / "gradsel-round-000.parquet"),
            model,
            str(ckpts / "global_step_6/data.pt.stale-before-round-000"),
        ).splitlines()[-1]
    )
    selected = sorted(int(pid.rsplit(":", 1)[1]) for pid in recorded_selection(store).problem_ids)
    assert seen["rows"] == 4 and sorted(seen["fresh"]) == selected  # every selected row, from the beginning
    assert len(seen["stale"]) == 2, seen  # from the old file's position: only the new file's second batch


# -- OpenRLHF --------------------------------------------------------------------------------------

OPENRLHF_READER = textwrap.dedent("""
    import json, sys
    from types import SimpleNamespace
    from transformers import AutoTokenizer
    from openrlhf.datasets.prompts_dataset import PromptDataset
    from openrlhf.datasets.utils import blending_datasets

    data_file, model = sys.argv[1:3]
    # The arguments OpenRLHF's train_ppo_ray passes (--data.input_key input --data.label_key label
    # --data.apply_chat_template); the strategy object carries only them here.
    args = SimpleNamespace(data=SimpleNamespace(input_key="input", label_key="label", apply_chat_template=True),
                           use_ms=False)
    strategy = SimpleNamespace(args=args, print=lambda *a: None, is_rank_0=lambda: False)
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = blending_datasets(data_file, None, strategy, 42, dataset_split="train")  # as prepare_datasets calls it
    dataset = PromptDataset(data, tokenizer, strategy)
    print(json.dumps([dataset[i][1:3] for i in range(len(dataset))]))
""")


def test_openrlhf_reads_the_selection_with_its_own_prompt_reader(store, tmp_path):
    """`--format openrlhf` through OpenRLHF's own blending_datasets + PromptDataset, as its PPO
    trainer reads --data.prompt_dataset: every selected problem's chat, templated by the model's
    tokenizer, and its reference answer as the label its reward function receives."""
    skip_unless_importable(OPENRLHF_PYTHON, "openrlhf.datasets.utils", "openrlhf", "GRADSEL_OPENRLHF_PYTHON")
    from transformers import AutoTokenizer

    from gradsel.inputs.models import resolve_model_path

    out = tmp_path / "round0.jsonl"
    run_cli(
        "select",
        "--store",
        str(store),
        "--top-k",
        "4",
        "--allow-fewer",
        "--include-zero-advantage",
        "--format",
        "openrlhf",
        "--out",
        str(out),
    )
    model = str(resolve_model_path("tiny-arith"))
    proc = subprocess.run(
        [str(OPENRLHF_PYTHON), "-c", OPENRLHF_READER, str(out), model],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = {p.problem_id: p for p in read_problems(store / "rounds/round-000/chunk.parquet").problems}
    tokenizer = AutoTokenizer.from_pretrained(model)
    expected = [
        [
            tokenizer.apply_chat_template(problems[pid].prompt, tokenize=False, add_generation_prompt=True),
            problems[pid].ground_truth,
        ]
        for pid in recorded_selection(store).problem_ids
    ]
    assert read == expected
