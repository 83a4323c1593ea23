"""Gang workers (Ray actors) release their process groups in their shutdown path (issue 21).

`WorkerGang.kill` ends a worker with `ray.kill`, which exits the process at once (`_Exit`: no
destructor runs, so no running std::thread can be destroyed). A graceful exit (an actor out of
scope, `exit_actor`) finalizes the interpreter instead; `ShardWorker.__ray_shutdown__` then calls
the runner's `shutdown`, which must leave no more gloo threads than run_ranks' teardown does
(tests/training/test_rank_teardown.py): at most one group's, held inside torch. Before this,
`shutdown` only called destroy_process_group while the trainer or the model still held every
group: a dp2 training rank kept both groups' 6 gloo threads running (measured: 6 -> 6; now 6 -> 3;
this test fails on the old code). A tp2 serving worker already fell to at most one group's threads with
the old shutdown (this test's check, run on the old code, passed), so it is not tested here.
Threads are counted from /proc/<pid>/task of each worker (same node), not by a method of the worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from model_helpers import tiny_spec
from shardwright.config import DataConfig, OptimConfig, ParallelLayout, TrainConfig
from shardwright.models.random_init import write_random_checkpoint

GLOO_THREADS = ("gloo_tcp_loop", "pt_gloo_runloop")
ONE_GROUP = 3  # a gloo group's native threads: its 2 work threads and its device's tcp loop
CORPUS = Path(__file__).resolve().parents[2] / "examples" / "corpus"


def gloo_threads(pid: int) -> int:
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            count += (task / "comm").read_text().strip() in GLOO_THREADS
        except OSError:  # the thread ended while we looked
            continue
    return count


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    spec = tiny_spec("llama", vocab_size=259, num_kv_heads=2)
    return str(write_random_checkpoint(tmp_path_factory.mktemp("teardown-model") / "llama", spec, seed=0))


def training_gang(model_dir: str):
    from shardwright.actors.gang import GangConfig
    from shardwright.actors.training import TrainingGang

    train = TrainConfig(data=DataConfig(path=CORPUS, seq_len=32, global_batch_size=8, seed=3),
                        optim=OptimConfig(lr=1e-3, warmup_steps=1, decay_steps=4), steps=1, num_micro_batches=2)
    gang = TrainingGang(GangConfig(layout=ParallelLayout(dp=2), collective_timeout_s=60),
                        train=train.model_dump(mode="json"))
    gang.start()
    gang.setup({"path": model_dir}, None)
    gang.train_step()  # the DP gradient hooks and their all-reduces have run
    return gang


def test_a_training_workers_shutdown_leaves_at_most_one_gloo_group_running(model_dir, ray_cluster):
    gang = training_gang(model_dir)
    try:
        pids = [node["pid"] for node in gang.nodes]
        before = [gloo_threads(pid) for pid in pids]
        assert all(n > ONE_GROUP for n in before), f"each worker should run several groups' threads: {before}"
        gang.shutdown_runners()
        after = [gloo_threads(pid) for pid in pids]
        assert all(n <= ONE_GROUP for n in after), f"gloo threads before / after shutdown: {before} / {after}"
    finally:
        gang.kill()
