"""Tenants: who may call (tokens), which paths their jobs may read (roots), how high they may
queue (max_priority) and how much they may hold (quota_gpus). Read from the tenants file.

The tenants file (YAML or JSON, SHARDWRIGHT_TOKENS_FILE):

    tenants:
      alice:
        tokens: [s3cr3t-alice-0001]
        roots: [/data/alice, /models/shared]   # model and data paths must lie under one of these
        max_priority: serving                  # low < batch < serving < high (default batch)
        quota_gpus: 8                          # the most GPUs one job may ask for (and, with
                                               # --policy fairshare, the tenant may hold at once)
        max_jobs: 20                           # the most unfinished jobs (queued or holding GPUs)

The old tokens format, `{token: tenant}`, is still read: its tenants have no roots (their paths
are not confined, as before) and a max_priority of `serving`. `confine_paths` resolves and checks
a job's model and data paths at submission; see its docstring for the rules.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from shardwright.config import (CHECKPOINT_MANIFEST, CHECKPOINT_STEP_PATTERN, PRIORITY_ORDER, SERVED_EXPORT_SUFFIX,
                                InferenceDeployment, JobFileError, PriorityClass, StrictModel, TrainingJob)
from shardwright.field_errors import describe_validation_error

# No ':' (the Redis key separator), '/', whitespace or '*': two tenants' keys can never collide.
TENANT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
OPEN_TENANT = "default"
CORPUS_SUFFIXES = (".txt", ".jsonl")
MAX_TENANTS_FILE_BYTES = 1 << 20
MAX_PATH_CHARS = 4096


class TenantPolicy(StrictModel):
    """One tenant's entry in the tenants file."""

    name: str = Field(pattern=TENANT_NAME_PATTERN, description="Tenant name (letters, digits, '_', '.', '-').")
    tokens: list[str] = Field(min_length=1, description="Bearer tokens of this tenant, 8+ characters each.")
    roots: list[Path] | None = Field(
        None, description="Directories the tenant's model and data paths must lie under (symlinks "
                          "followed); relative paths resolve against the first. None: not confined.")
    max_priority: PriorityClass = Field("batch", description="Highest priority class the tenant may submit.")
    quota_gpus: int | None = Field(None, ge=0, description="Most GPUs one job (and, with fairshare, the "
                                                           "tenant at once) may hold; None: no quota.")
    max_jobs: int | None = Field(None, ge=1, description="Most unfinished jobs (waiting or holding GPUs) the "
                                                         "tenant may have at once; None: no limit.")

    @field_validator("tokens")
    @classmethod
    def _long_enough(cls, tokens: list[str]) -> list[str]:
        short = [t for t in tokens if len(t) < 8]
        if short:
            raise ValueError(f"{len(short)} tokens are shorter than 8 characters")
        return tokens

    def check_priority(self, priority: PriorityClass) -> None:
        """PermissionError when `priority` is above this tenant's maximum."""
        if PRIORITY_ORDER.index(priority) > PRIORITY_ORDER.index(self.max_priority):
            raise PermissionError(f"priority: {priority!r} is above the maximum of tenant {self.name}, "
                                  f"{self.max_priority!r}; submit with a priority of {self.max_priority!r} or lower")

    def check_quota(self, num_gpus: int) -> None:
        if self.quota_gpus is not None and num_gpus > self.quota_gpus:
            raise PermissionError(f"layout: the job asks for {num_gpus} GPUs but tenant {self.name} has a quota "
                                  f"of {self.quota_gpus} GPUs; shrink the gang or ask for a larger quota_gpus")


# The open mode (no tokens file, loopback only): one tenant, unconfined, any priority.
OPEN_POLICY = TenantPolicy.model_construct(name=OPEN_TENANT, tokens=[], roots=None, max_priority="high",
                                           quota_gpus=None, max_jobs=None)


class Tenants:
    """The tenants of one server: token -> tenant, tenant -> policy. `Tenants(None)` is the open,
    single-tenant mode (no tokens file): everyone is `default`, unconfined, any priority."""

    def __init__(self, policies: list[TenantPolicy] | None) -> None:
        self.policies = None if policies is None else {p.name: p for p in policies}

    @property
    def open(self) -> bool:
        return self.policies is None

    def policy(self, tenant: str) -> TenantPolicy:
        if self.policies is None:
            if not re.fullmatch(TENANT_NAME_PATTERN, tenant):
                raise ValueError(f"tenant {tenant!r} is not a valid name: letters, digits, '_', '.', '-'")
            return OPEN_POLICY.model_copy(update={"name": tenant})
        found = self.policies.get(tenant)
        if found is None:
            raise PermissionError(f"tenant {tenant!r} is not in the tenants file")
        return found

    def tokens(self) -> dict[str, str] | None:
        if self.policies is None:
            return None
        return {token: p.name for p in self.policies.values() for token in p.tokens}

    @classmethod
    def load(cls, path: Path | None) -> Tenants:
        return cls(None if path is None else load_tenants(path))


def load_tenants(path: Path) -> list[TenantPolicy]:
    """The tenants of `path`, in the tenants format or the old `{token: tenant}` one; raises
    ValueError naming the file and the problem."""
    from shardwright import safe_yaml

    try:
        data = safe_yaml.load(Path(path).read_bytes(), max_bytes=MAX_TENANTS_FILE_BYTES)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read tenants file {path}: {err}") from err
    if isinstance(data, dict) and isinstance(data.get("tenants"), dict):
        policies = _tenants_format(path, data)
    else:
        policies = _tokens_format(path, data)
    seen: dict[str, str] = {}
    for policy in policies:
        for token in policy.tokens:
            if seen.setdefault(token, policy.name) != policy.name:
                raise ValueError(f"tenants file {path}: one token belongs to tenants {seen[token]} and {policy.name}")
    return policies


def _tenants_format(path: Path, data: dict) -> list[TenantPolicy]:
    if set(data) != {"tenants"}:
        raise ValueError(f"tenants file {path}: unknown top-level keys {sorted(set(data) - {'tenants'})}; "
                         "only 'tenants' is allowed")
    policies = []
    for name, entry in data["tenants"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"tenants file {path}: tenants.{name} must be a mapping (tokens, roots, ...)")
        try:
            policy = TenantPolicy(name=str(name), **entry)
        except ValidationError as err:
            raise ValueError(f"tenants file {path}: tenants.{name}: "
                             f"{describe_validation_error(err, root=TenantPolicy)}") from None
        if policy.roots is not None:
            policy = policy.model_copy(update={"roots": [_root(path, name, r) for r in policy.roots]})
        policies.append(policy)
    return policies


def _root(path: Path, name: str, root: Path) -> Path:
    if not root.is_absolute() or ".." in root.parts:
        raise ValueError(f"tenants file {path}: tenants.{name}.roots: {root} must be an absolute path without '..'")
    return Path(os.path.realpath(root))


def _tokens_format(path: Path, data) -> list[TenantPolicy]:
    if not isinstance(data, dict) or not data:
        raise ValueError(f"tenants file {path} must hold 'tenants:' (see README) or map tokens to tenants, "
                         "e.g. 'TOKEN: alice'")
    bad = [t for t, tenant in data.items() if not isinstance(t, str) or not isinstance(tenant, str) or len(t) < 8]
    if bad:
        raise ValueError(f"tokens file {path}: {len(bad)} entries are not 'TOKEN (8+ chars): tenant' strings")
    by_tenant: dict[str, list[str]] = {}
    for token, tenant in data.items():
        by_tenant.setdefault(tenant, []).append(token)
    try:
        return [TenantPolicy(name=name, tokens=tokens, max_priority="serving") for name, tokens in by_tenant.items()]
    except ValidationError as err:
        raise ValueError(f"tokens file {path}: {describe_validation_error(err, root=TenantPolicy)}") from None


# ---- job paths ------------------------------------------------------------------------------------

PathKind = Literal["model", "corpus"]
DRAFT_FIELD = "engine.speculative.draft_model"


def job_paths(spec: TrainingJob | InferenceDeployment) -> list[tuple[str, Path, PathKind]]:
    """(field, path, kind) of every filesystem path a job reads."""
    if isinstance(spec, InferenceDeployment):
        draft = spec.engine.speculative.draft_model
        return [("model", spec.model, "model")] + ([(DRAFT_FIELD, draft, "model")] if draft is not None else [])
    found: list[tuple[str, Path, PathKind]] = []
    if spec.model.path is not None:
        found.append(("model.path", spec.model.path, "model"))
    found.append(("train.data.path", spec.train.data.path, "corpus"))
    return found


def confine_paths(spec: TrainingJob | InferenceDeployment, *, base: Path | None,
                  policy: TenantPolicy | None = None) -> TrainingJob | InferenceDeployment:
    """The spec with every model and data path resolved (absolute, symlinks followed) and checked.

    - A relative path resolves against `base` (the job file's folder for `shardwright run`, the
      tenant's first root on a server); without a base it is refused (INVALID_ARGUMENT).
    - With a confined `policy` (roots set), a path with `..` or whose resolved form lies outside every
      root raises PermissionError with one message per field that never says whether it exists.
    - Then the path must exist: a model is a directory with config.json (a deployment's may also be a
      training checkpoint or a run's checkpoint folder), a corpus a .txt/.jsonl file or a directory
      (JobFileError naming the field otherwise).
    """
    roots = None if policy is None else policy.roots
    if roots is not None and base is None and roots:
        base = roots[0]
    updates: dict[str, Path] = {}
    for field, path, kind in job_paths(spec):
        updates[field] = _resolve_one(field, path, kind, base, roots, policy)
    return _with_paths(spec, updates)


def _denied(field: str, policy: TenantPolicy) -> PermissionError:
    return PermissionError(f"{field}: not permitted: the paths of tenant {policy.name} must lie under its roots "
                           "(`roots` in the tenants file)")


def _resolve_one(field: str, path: Path, kind: PathKind, base: Path | None, roots: list[Path] | None,
                 policy: TenantPolicy | None) -> Path:
    if roots is not None and ".." in path.parts:
        raise _denied(field, policy)
    if len(str(path)) > MAX_PATH_CHARS:
        raise JobFileError(f"{field}: the path is {len(str(path))} characters long, over {MAX_PATH_CHARS}")
    if not path.is_absolute():
        if base is None:
            raise JobFileError(f"{field}: relative path {str(path)!r} has no folder to resolve against; "
                               "give an absolute path")
        path = base / path
    try:
        resolved = Path(os.path.realpath(path))
    except (OSError, ValueError) as err:
        if roots is not None:
            raise _denied(field, policy) from None
        raise JobFileError(f"{field}: cannot resolve {str(path)!r}: {err}") from None
    if roots is not None and not any(resolved.is_relative_to(root) for root in roots):
        raise _denied(field, policy)
    try:
        _check_exists(field, resolved, kind)
    except OSError as err:  # e.g. a name too long for the filesystem, a directory it may not read
        raise JobFileError(f"{field}: cannot read {resolved}: {err.strerror or err}") from None
    return resolved


def _check_exists(field: str, path: Path, kind: PathKind) -> None:
    if kind == "model":
        if not (path / "config.json").is_file() and not _is_training_checkpoint(path, field):
            raise JobFileError(f"{field}: {path} is neither a Hugging Face model directory (no config.json there) "
                               f"nor a training checkpoint (no {CHECKPOINT_MANIFEST} in it or in a step-N folder)")
    elif path.is_dir():
        return
    elif not path.is_file():
        raise JobFileError(f"{field}: {path} does not exist; give a {'/'.join(CORPUS_SUFFIXES)} file or a directory")
    elif path.suffix not in CORPUS_SUFFIXES:
        raise JobFileError(f"{field}: {path} is not a {' or '.join(CORPUS_SUFFIXES)} file")


def _is_training_checkpoint(path: Path, field: str) -> bool:
    """A deployment's model may be a training checkpoint (a step-N folder) or a run's checkpoint
    folder (step-N folders below it), or the export a submission resolved such a model to (a
    `step-N.hf` beside a checkpoint, written on the deployment's first start); a training job's
    model.path may not."""
    if field != "model":
        return False
    step_dir = path.name.removesuffix(SERVED_EXPORT_SUFFIX)
    if step_dir != path.name and re.fullmatch(CHECKPOINT_STEP_PATTERN, step_dir):
        return (path.with_name(step_dir) / CHECKPOINT_MANIFEST).is_file()
    if not path.is_dir():
        return False
    if (path / CHECKPOINT_MANIFEST).is_file():
        return True
    return any(re.fullmatch(CHECKPOINT_STEP_PATTERN, p.name) and (p / CHECKPOINT_MANIFEST).is_file()
               for p in path.iterdir())


def _with_paths(spec, updates: dict[str, Path]):
    if isinstance(spec, InferenceDeployment):
        update = {"model": updates["model"]}
        if DRAFT_FIELD in updates:  # engine.speculative.draft_model
            speculative = spec.engine.speculative.model_copy(update={"draft_model": updates[DRAFT_FIELD]})
            update["engine"] = spec.engine.model_copy(update={"speculative": speculative})
        return spec.model_copy(update=update)
    changes = {}
    if "model.path" in updates:
        changes["model"] = spec.model.model_copy(update={"path": updates["model.path"]})
    data = spec.train.data.model_copy(update={"path": updates["train.data.path"]})
    changes["train"] = spec.train.model_copy(update={"data": data})
    return spec.model_copy(update=changes)
