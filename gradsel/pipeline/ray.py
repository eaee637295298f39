"""`gradsel score --executor ray`: the candidates' shards as Ray tasks.

Each task is one `--shard I/N` part (pipeline.run_score with a store.Part): it loads the
checkpoint once and makes many shards of rollouts and features, each under its shard lock, in
the store every worker sees. A task whose worker dies is retried by Ray; the retry skips the
shards already done (their markers and checksums) and redoes the one in flight. When every part
is done, the driver makes the validation set's shards and writes the scores, as a plain
`gradsel score` does, so the result is the one-process run's.
"""

from __future__ import annotations

from pathlib import Path

from gradsel.core.errors import GradselError
from gradsel.store.stage import split_parts

TASK_RETRIES = 3


def _score_part(store_dir: str, model: str, pool: str, val: str, ro, sc, part) -> str:
    from gradsel.core import console
    from gradsel.pipeline.score import run_score

    console.set_verbosity(quiet=True)  # the driver shows progress by part
    run_score(Path(store_dir), model=model, pool=Path(pool), val=Path(val), ro=ro, sc=sc, part=part)
    return str(part)


def run_score_ray(
    store_dir: Path, *, model: str, pool: Path, val: Path, ro, sc, address: str | None = None, parts: int | None = None
):
    """Score through Ray: `parts` tasks (default one per GPU of the cluster, else one per CPU),
    each with one GPU where the cluster has GPUs, else one CPU. `address`: an existing cluster
    (`ray.init(address=...)`); None starts a local one."""
    try:
        import ray
    except ImportError as exc:
        raise GradselError("--executor ray needs Ray", "pip install 'gradsel[ray]'") from exc
    from gradsel.core import console
    from gradsel.inputs.problems import read_problems
    from gradsel.pipeline.score import run_score
    from gradsel.rewards.registry import check_rewards

    for path in (val, pool):  # bad input is refused here, before a cluster starts
        check_rewards(read_problems(path, prompt_key=ro.prompt_key, answer_key=ro.answer_key).problems, ro.reward)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        n = parts or gpus or max(1, int(resources.get("CPU", 1)))
        per_task = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        task = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=False, **per_task)(_score_part)
        refs = [task.remote(str(store_dir), model, str(pool), str(val), ro, sc, part) for part in split_parts(n)]
        with console.progress() as bar:
            progress = bar.add_task(f"ray: {n} parts ({'1 GPU' if gpus else '1 CPU'} each)", total=n, rate="")
            pending = refs
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    ray.get(done)  # a part that failed for good raises here
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, GradselError):  # a user's mistake: the CLI's error and hint
                        raise cause from None
                    raise
                bar.advance(progress)
                bar.shard_done(progress)  # a part is a shard of the run: a line per part in a log
    finally:
        if started:
            ray.shutdown()
    return run_score(store_dir, model=model, pool=pool, val=val, ro=ro, sc=sc)
