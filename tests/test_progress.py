"""Progress in a log: where stderr is not a terminal (nohup, Slurm, Ray), long stages print plain
`stage: done/total, rate, elapsed` lines, at the end of each shard and at most every 30 s between."""

import re

from gradsel.core.console import PLAIN_INTERVAL_S, PlainProgress
from helpers import run_cli


class Clock:
    """A clock the test moves by hand: the throttle is checked without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_are_throttled_to_one_per_interval_besides_shard_ends():
    clock, lines = Clock(), []
    progress = PlainProgress(lines.append, clock=clock)
    with progress:
        task = progress.add_task("gradients/train (projected, 16x16)", total=100, rate="")
        for second in range(1, 70):  # a rate update every second, as the gradient pass ticks
            clock.now += 1
            progress.update(task, rate=f"{second} tokens/s")
        assert [line.split(":")[0] for line in lines] == ["gradients/train (projected, 16x16)"] * 2
        assert lines[0] == "gradients/train (projected, 16x16): 0/100, 30 tokens/s, 0:00:30 elapsed"
        assert lines[1].endswith("60 tokens/s, 0:01:00 elapsed")
        clock.now += 5  # a shard ends 5 s after the last line: printed at once
        progress.advance(task, 40)
        progress.shard_done(task)
        assert lines[2] == "gradients/train (projected, 16x16): 40/100, 69 tokens/s, 0:01:14 elapsed"
        progress.shard_done(task)  # nothing new: no second line
        clock.now += PLAIN_INTERVAL_S - 1
        progress.update(task, rate="")
        assert len(lines) == 3
        clock.now += 1
        progress.advance(task, 60)  # the last problems: the task completes, one line, not two
        progress.shard_done(task)
        assert lines[3] == "gradients/train (projected, 16x16): 100/100, 1.0/s, 0:01:44 elapsed"
        assert len(lines) == 4


def test_a_captured_run_logs_a_line_per_shard(tmp_path):
    """stderr captured (not a terminal): every shard of the rollouts and of the gradients ends with
    a plain line. Before, a log held only the bar's last state, drawn when the stage ended."""
    from gradsel.demo.tasks import write_regime

    pool, val = write_regime(tmp_path / "data", "noisy", size=20, val_size=4)
    proc = run_cli(
        "score",
        "--model",
        "tiny-arith",
        "--pool",
        str(pool),
        "--val",
        str(val),
        "--store",
        str(tmp_path / "s"),
        "--engine",
        "hf",
        "--n",
        "2",
        "--max-tokens",
        "4",
        "--shard-size",
        "6",
    )
    line = r"{stage} \({what}\): {done}/20, [^\n]*\d+ tokens/s, \d+:\d\d:\d\d elapsed$"
    for stage, what in (("rollouts/train", "hf, k=2"), ("gradients/train", r"projected, \d+x\d+")):
        found = [
            int(m)
            for m in re.findall(line.format(stage=re.escape(stage), what=what, done=r"(\d+)"), proc.stderr, flags=re.M)
        ]
        assert found == [6, 12, 18, 20], (stage, proc.stderr[-3000:])
    assert "━" not in proc.stderr  # no bar drawn into the log
