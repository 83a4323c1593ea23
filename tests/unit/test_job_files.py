"""Job files and tenants files on plain objects: the bounded YAML loader, one-line errors with
"did you mean", the tenants file (both formats) and path confinement (the server-side matrix is
tests/api/test_front_door.py)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from shardwright import safe_yaml
from shardwright.config import JobFileError, TrainingJob, check_spec_size, parse_job
from shardwright.tenants import TenantPolicy, Tenants, confine_paths, load_tenants

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TRAIN = (EXAMPLES / "train_tiny.yaml").read_text()


@pytest.mark.parametrize("text, message", [
    ("a: &x [1, 2]\nb: *x\n", "anchors (&x) are not accepted (line 1)"),
    ("b: *x\n", "aliases (*x) are not accepted"),  # even without its anchor
    ("base: {a: 1}\nc:\n  <<: {a: 2}\n", "merge keys (<<) are not accepted (line 3)"),
    ("a: 1\na: 2\n", "duplicate key 'a' (line 2)"),
    ("[" * 100 + "]" * 100, "nests deeper than 16 levels"),
    ("x:\n" + "".join("  " * i + "- \n" for i in range(1, 40)), "nests deeper than 16 levels"),
    ("[" + "1, " * 5000 + "1]", "more than 4096 YAML nodes"),
    ("a: '" + "x" * 70_000 + "'", "over the 64 KiB limit"),
    ("a: " + "9" * 5000, "a value YAML cannot read"),
    ("a: !!python/object/apply:os.system [ls]", "not valid YAML"),
    ("\x00", "not valid YAML"),
])
def test_unsafe_yaml_is_refused_in_one_line(text, message):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        safe_yaml.load(text)
    assert "\n" not in str(err.value)
    assert time.perf_counter() - start < 1.0  # generous: each is well under a millisecond here


def test_plain_yaml_and_json_load_as_before():
    assert safe_yaml.load(TRAIN) == yaml.safe_load(TRAIN)
    assert safe_yaml.load('{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    assert safe_yaml.load("[" * 16 + "]" * 16) is not None  # exactly the depth limit


@pytest.mark.parametrize("old, new, expected", [
    ("    path:", "    pth:", "train.data.pth: unknown field (did you mean 'path'?"),
    ("  checkpoint_every_steps:", "  checkpoint_evry_steps:", "did you mean 'checkpoint_every_steps'?"),
    ("layout:", "layot:", "layot: unknown field (did you mean 'layout'?"),
    ("\n  steps: 50", "\n  steps: -1", "train.steps: Input should be greater than 0 (got -1)"),
    ("seq_len: 64", "seq_len: long", "train.data.seq_len: Input should be a valid integer"),
    ("lr: 0.003", "lr: .nan", "train.optim.lr: Input should be a finite number"),
    ("min_lr: 0.0003", "min_lr: 0.5", "train.optim: min_lr=0.5 exceeds lr=0.003"),
    ("global_batch_size: 8", "global_batch_size: 7",
     "train.data.global_batch_size=7 must be divisible by layout.dp * train.num_micro_batches = 1 * 2 = 2"),
    ("kind: training", "kind: trainin", "kind: must be 'training' or 'inference' (got 'trainin')"),
])
def test_job_file_errors_are_one_line_naming_the_field(old, new, expected):
    assert old in TRAIN
    with pytest.raises(JobFileError) as err:
        parse_job(TRAIN.replace(old, new, 1))
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_train_is_typed_and_required():
    job = parse_job(TRAIN)
    assert isinstance(job, TrainingJob) and job.train.data.seq_len == 64 and job.train.optim.lr == 0.003
    with pytest.raises(JobFileError, match="train: Field required"):
        parse_job("kind: training\nname: x\nmodel: {preset: tiny-llama}\n")


def test_stored_spec_has_a_size_cap():
    job = parse_job(TRAIN)
    check_spec_size(job)
    huge = job.model_copy(update={"name": "x" * 70_000})  # past validation, as a direct caller could
    with pytest.raises(JobFileError, match="job spec: .* bytes once stored, over the 64 KiB limit"):
        check_spec_size(huge)


def test_run_resolves_relative_paths_against_the_job_files_folder():
    job = confine_paths(parse_job(TRAIN), base=EXAMPLES)
    assert job.train.data.path == (EXAMPLES / "corpus").resolve()  # a link to the package data
    with pytest.raises(JobFileError, match="train.data.path: relative path 'corpus' has no folder"):
        confine_paths(parse_job(TRAIN), base=None)


def test_tenants_file_and_the_old_tokens_format(tmp_path):
    (tmp_path / "alice").mkdir()
    new = tmp_path / "tenants.yaml"
    new.write_text(f"tenants:\n  alice:\n    tokens: [alice-token-1]\n    roots: [{tmp_path}/alice]\n"
                   "    max_priority: serving\n    quota_gpus: 4\n  bob:\n    tokens: [bob-token-12]\n    roots: []\n")
    alice, bob = load_tenants(new)
    assert (alice.name, alice.roots, alice.max_priority, alice.quota_gpus) == ("alice", [tmp_path / "alice"], "serving", 4)
    assert (bob.roots, bob.max_priority) == ([], "batch")
    assert Tenants.load(new).tokens() == {"alice-token-1": "alice", "bob-token-12": "bob"}
    old = tmp_path / "tokens.yaml"
    old.write_text("alice-token-1: alice\nalice-token-2: alice\n")
    (only,) = load_tenants(old)
    assert (only.name, only.tokens, only.roots, only.max_priority) == ("alice", ["alice-token-1", "alice-token-2"],
                                                                      None, "serving")


@pytest.mark.parametrize("text, message", [
    ("tenants:\n  'a:b':\n    tokens: [token-0001]\n    roots: []\n", r"name: String should match pattern"),
    ("tok-0001: 'a:jobs'\n", "name: String should match pattern"),
    ("tenants:\n  a:\n    tokens: [short]\n    roots: []\n", "tokens are shorter than 8 characters"),
    ("tenants:\n  a:\n    tokens: [token-0001]\n    roots: []\n    max_priority: top\n", "max_priority"),
    ("tenants:\n  a:\n    tokens: [token-0001]\n    rots: []\n", "did you mean 'roots'?"),
    ("tenants:\n  a:\n    tokens: [token-0001]\n    roots: [rel/dir]\n", "must be an absolute path"),
    ("tenants:\n  a: {tokens: [token-0001]}\n  b: {tokens: [token-0001]}\n", "one token belongs to tenants a and b"),
    ("tenants: {}\nextra: 1\n", "unknown top-level keys"),
])
def test_bad_tenants_files_are_refused_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_tenants(path)


def test_priority_and_quota_checks_name_the_maximum():
    policy = TenantPolicy(name="t", tokens=["token-0001"], max_priority="batch", quota_gpus=2)
    policy.check_priority("low")
    policy.check_priority("batch")
    with pytest.raises(PermissionError, match="'serving' is above the maximum of tenant t, 'batch'"):
        policy.check_priority("serving")
    policy.check_quota(2)
    with pytest.raises(PermissionError, match="asks for 4 GPUs but tenant t has a quota of 2 GPUs"):
        policy.check_quota(4)
    with pytest.raises(ValueError, match="not a valid name"):
        Tenants(None).policy("a:b")


def test_the_example_tenants_file_loads():
    tenants = {p.name: p for p in load_tenants(EXAMPLES / "tenants.yaml")}
    assert {n: p.max_priority for n, p in tenants.items()} == {"research": "batch", "product": "serving",
                                                               "oncall": "high"}
    assert tenants["product"].roots == [Path("/data/product"), Path("/models/shared")]


def test_other_models_errors_keep_their_location():
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    from shardwright.field_errors import describe_validation_error

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        top_p: float = Field(1.0, gt=0)
        stop: list[int] = []

    with pytest.raises(ValidationError) as err:
        Params(top_p=-1, stop=[1, "a"], top_pp=3)
    assert describe_validation_error(err.value).startswith("top_p: Input should be greater than 0 (got -1); stop[1]: ")
    assert "top_pp: unknown field (did you mean 'top_p'?" in describe_validation_error(err.value, root=Params,
                                                                                    max_errors=5)


def test_a_draft_model_path_is_confined_like_the_model(tmp_path):
    """engine.speculative.draft_model is a path the job reads: resolved, checked and kept under the
    tenant's roots exactly as `model` is."""
    from shardwright.config import InferenceDeployment

    root = tmp_path / "alice"
    for name in ("target", "draft"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text("{}")
    policy = TenantPolicy(name="alice", tokens=["alice-token-1"], roots=[root], max_priority="serving")

    def deployment(draft: str) -> InferenceDeployment:
        return InferenceDeployment(name="d", model="target",
                                   engine={"speculative": {"method": "draft", "draft_model": draft}})

    job = confine_paths(deployment("draft"), base=None, policy=policy)
    assert (job.model, job.engine.speculative.draft_model) == (root / "target", root / "draft")
    with pytest.raises(PermissionError, match="engine.speculative.draft_model: not permitted"):
        confine_paths(deployment(str(tmp_path / "elsewhere")), base=None, policy=policy)
    with pytest.raises(JobFileError, match=r"engine.speculative.draft_model: .* \(no config.json there\)"):
        confine_paths(deployment("missing"), base=None, policy=policy)
