"""Zero-copy pooling on one node: a peer's shared segment bound in place as a block's weights.

Exactness: the bound parameters are the peer's bytes themselves in the same kernels, so greedy
tokens and logits must equal the all-resident model's exactly (no tolerance). The segment must
be unmodified after generation (sha256 before and after), the owner's ledger must not count the
bound bytes, and a worker with only such layers keeps all its compute threads (no fetch thread).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import pytest
import torch

from shardwright.actors.shard_runner import ShardRunner
from shardwright.config import ModelSpec, ParallelLayout
from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.parallel.context import ParallelContext
from shardwright.pool import MemoryLedger
from shardwright.pool.fetch import LayerFetcher, MappedSource
from shardwright.pool.sizing import shard_sizes
from shardwright.pool.store import PeerStore, map_segment

POOLED = [1, 4, 7, 10]


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.fixture
def peer(pool_model):
    """A memory peer's store in this process holding POOLED of rank 0's layers in shared memory."""
    store = PeerStore(MemoryLedger(None, owner="peer"), shared=True)
    if not store.shared:
        pytest.skip("no /dev/shm on this machine: same-node segments are not shared memory")
    store.load(str(pool_model), ModelSpec.from_hf_dir(pool_model), ParallelLayout(), [(0, i) for i in POOLED])
    yield store
    store.close()


@pytest.fixture
def torch_threads():
    """Restore this process's intra-op thread count (ShardRunner sets it for its worker)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_bound_segment_gives_the_resident_tokens_and_stays_unmodified(pool_model, peer):
    ctx = ParallelContext.single()
    _, resident = load_model(pool_model, ctx)
    prompt = [3, 14, 15, 92, 65, 35]
    ref = greedy_generate(resident, prompt, 24)
    assert len(set(ref)) > 4, "reference continuation too repetitive to be a test"
    before = {key: digest(flat) for key, flat in peer.flat.items()}
    sources = {layer: map_segment(h) for (_, layer), h in peer.handles().items()}
    assert all(isinstance(s, MappedSource) for s in sources.values())
    peer.unlink()  # as the engine does once every owner has mapped: the mappings must outlive the names
    _, model = load_model(pool_model, ctx, skip_blocks=frozenset(POOLED))
    ledger = MemoryLedger(None, owner="rank 0")
    fetcher = LayerFetcher(model.blocks, sources, ledger, ctx.device, depth=2)
    model.layer_weights = fetcher
    # Bound in place: every parameter of a pooled block lives in the mapped segment's memory.
    for i in POOLED:
        base = sources[i].flat.untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() == base for p in model.blocks[i].parameters())
    assert greedy_generate(model, prompt, 24) == ref
    assert {key: digest(flat) for key, flat in peer.flat.items()} == before
    assert fetcher.bytes_fetched == 0 and ledger.high_water == 0 and not fetcher.background
    peer.close()  # the peer drops its layers (as when it exits): the owner's mapping keeps the bytes
    assert greedy_generate(model, prompt, 24) == ref
    fetcher.close()


def test_a_write_to_a_bound_segment_faults_instead_of_changing_it(pool_model, peer):
    handle = next(iter(peer.handles().values()))
    before = digest(peer.flat[(0, POOLED[0])])
    script = textwrap.dedent(f"""
        from shardwright.pool.store import map_segment
        source = map_segment({handle!r})
        print(float(source.flat[0]), flush=True)  # reading works
        source.flat.add_(1.0)
        print("wrote", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -11, (proc.returncode, proc.stdout, proc.stderr[-2000:])  # SIGSEGV
    assert proc.stdout.strip() == repr(float(peer.flat[(0, POOLED[0])][0])), proc.stdout
    assert digest(peer.flat[(0, POOLED[0])]) == before


def load_runner(pool_model, pooled: dict) -> ShardRunner:
    runner = ShardRunner(0, ParallelLayout(), threads_per_worker=2)
    runner.init_group("127.0.0.1", 0, 30)
    runner.load(str(pool_model), None, pooled, 2)
    return runner


def test_only_same_node_layers_keep_every_compute_thread_and_stay_off_the_ledger(pool_model, peer,
                                                                                  torch_threads):
    sizes = shard_sizes(ModelSpec.from_hf_dir(pool_model), ParallelLayout(), 0)
    pooled_bytes = sum(sizes.layer_bytes[i] for i in POOLED)
    handles = {layer: h for (_, layer), h in peer.handles().items()}
    runner = load_runner(pool_model, handles)
    memory = runner.memory()
    assert runner.num_threads == 2 and torch.get_num_threads() == 2
    assert memory["by_kind"] == {"weights": sizes.weight_bytes - pooled_bytes}
    assert memory["bytes_mapped"] == pooled_bytes and memory["bytes_fetched"] == 0
    runner.fetcher.close()
    # The same layers from host memory need the fetch thread, which takes a compute thread.
    runner = load_runner(pool_model, {i: {"host": True} for i in POOLED})
    assert runner.num_threads == 1 and torch.get_num_threads() == 1
    assert runner.memory()["bytes_mapped"] == 0
    runner.fetcher.close()


PEER_SCRIPT = """
import hashlib, json, sys, time
from shardwright.config import ModelSpec, ParallelLayout
from shardwright.pool import MemoryLedger
from shardwright.pool.store import PeerStore
store = PeerStore(MemoryLedger(None, owner="peer"), shared=True)
store.load({model!r}, ModelSpec.from_hf_dir({model!r}), ParallelLayout(), [(0, i) for i in {pooled!r}])
digests = {{k[1]: hashlib.sha256(f.view(__import__("torch").uint8).numpy().tobytes()).hexdigest()
           for k, f in store.flat.items()}}
print(json.dumps({{"handles": {{k[1]: h for k, h in store.handles().items()}}, "digests": digests}}), flush=True)
sys.stdin.readline()  # the owner has mapped every layer
store.unlink()  # as the engine has a peer do once its owners mapped
print("unlinked", flush=True)
time.sleep(600)
"""


def test_a_peer_killed_while_its_layers_are_bound_leaves_the_owner_its_bytes(pool_model):
    """The peer is a real process holding the layers in /dev/shm; the owner maps and binds them, the
    peer unlinks their names and is killed (SIGKILL: nothing of its own teardown runs). The owner's
    mapping keeps the pages: the bound layers hash as the peer loaded them and greedy tokens equal
    the all-resident model's; the memory goes only when the owner drops its mapping. (That such a
    death fails the deployment's step naming the peer is tests/pool/test_pool_engine.py's
    test_a_dead_peer_fails_the_deployment_which_rebuilds, where the layers are bound the same way.)"""
    import json
    import signal
    from pathlib import Path

    ctx = ParallelContext.single()
    _, resident = load_model(pool_model, ctx)
    prompt = [3, 14, 15, 92, 65, 35]
    ref = greedy_generate(resident, prompt, 24)
    peer = subprocess.Popen([sys.executable, "-c", PEER_SCRIPT.format(model=str(pool_model), pooled=POOLED)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        told = json.loads(peer.stdout.readline())
        handles = {int(layer): h for layer, h in told["handles"].items()}
        if any(h["path"] is None for h in handles.values()):
            pytest.skip("no /dev/shm on this machine: same-node segments are not shared memory")
        sources = {layer: map_segment(h) for layer, h in handles.items()}
        _, model = load_model(pool_model, ctx, skip_blocks=frozenset(POOLED))
        fetcher = LayerFetcher(model.blocks, sources, MemoryLedger(None, owner="rank 0"), ctx.device, depth=2)
        model.layer_weights = fetcher  # bound in place, now the peer dies
        peer.stdin.write("mapped\n")
        peer.stdin.flush()
        assert peer.stdout.readline().strip() == "unlinked"
        assert not any(Path(h["path"]).exists() for h in handles.values())
        peer.send_signal(signal.SIGKILL)
        assert peer.wait(timeout=60) == -signal.SIGKILL
    finally:
        peer.kill()
        peer.wait()
    assert {str(i): digest(s.flat) for i, s in sources.items()} == told["digests"]
    assert greedy_generate(model, prompt, 24) == ref
    assert fetcher.bytes_fetched == 0
    fetcher.close()
