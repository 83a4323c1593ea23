"""A packed, resumable loader over a local text corpus.

The corpus is a `.txt` file (one document), a `.jsonl` file (one document per line, its "text"
field) or a directory of them (files in sorted name order). Documents are tokenised with the
model's tokenizer (raw bytes when the model has none), joined by the encoding of a blank line,
and cut into S non-overlapping windows of seq_len + 1 tokens: inputs are a window's first
seq_len tokens, targets its last seq_len. No padding, so every target carries loss.

Order: epoch e visits the windows in a permutation drawn from (seed, e). Global batch k of an
epoch is windows perm[kG : (k+1)G] (G = global_batch_size); DP rank r of dp takes the r-th of dp
equal slices of it. The stream of a rank is thus a function of (seed, dp_rank, dp) only, the
union over DP ranks is the single-process global batch, and the position is two integers
(`state_dict`), so a resumed loader continues bit-exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from shardwright.config import DataConfig
from shardwright.models.tokenizer import TextTokenizer

SUFFIXES = (".txt", ".jsonl")


def corpus_files(path: Path) -> list[Path]:
    """The corpus files under `path` (itself when a file), sorted by name."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    else:
        raise FileNotFoundError(f"corpus {path} does not exist; give a .txt/.jsonl file or a directory")
    bad = [p.name for p in files if p.suffix not in SUFFIXES]
    if bad or not files:
        raise ValueError(f"corpus {path}: need {SUFFIXES} files, found {bad or 'none'}")
    return files


def read_documents(path: Path) -> list[str]:
    """Every document of the corpus, in order."""
    docs = []
    for file in corpus_files(path):
        if file.suffix == ".txt":
            docs.append(file.read_text(encoding="utf-8"))
            continue
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                docs.append(_jsonl_text(file, n, line))
    return docs


def _jsonl_text(file: Path, n: int, line: str) -> str:
    try:
        text = json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{file}:{n}: each line must be a JSON object with a 'text' string ({err})") from err
    if not isinstance(text, str):
        raise ValueError(f"{file}:{n}: 'text' must be a string, got {type(text).__name__}")
    return text


def pack(documents: list[str], tokenizer: TextTokenizer, seq_len: int, vocab_size: int) -> torch.Tensor:
    """int64 [S, seq_len + 1] windows of the tokenised corpus (remainder dropped)."""
    sep = tokenizer.encode("\n\n")
    ids: list[int] = []
    for i, doc in enumerate(documents):
        ids.extend((sep if i else []) + tokenizer.encode(doc))
    tokens = torch.tensor(ids, dtype=torch.int64)
    if len(ids) and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= model vocab_size={vocab_size}: the tokenizer "
                         "does not match the model (a byte-level corpus needs vocab_size >= 256)")
    num = len(ids) // (seq_len + 1)
    return tokens[: num * (seq_len + 1)].view(num, seq_len + 1)


class PackedLoader:
    """Global batches of packed windows, this DP rank's slice of each (see module doc)."""

    def __init__(self, windows: torch.Tensor, *, global_batch_size: int, seed: int,
                 dp_rank: int = 0, dp: int = 1) -> None:
        if global_batch_size % dp:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by dp={dp}")
        if windows.shape[0] < global_batch_size:
            raise ValueError(f"the corpus gives {windows.shape[0]} sequences, fewer than one global batch "
                             f"of {global_batch_size}: use a bigger corpus or a smaller batch / seq_len")
        self.windows, self.global_batch_size, self.seed = windows, global_batch_size, seed
        self.dp_rank, self.dp = dp_rank, dp
        self.epoch, self.batch_index = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.windows.shape[0] // self.global_batch_size

    def _permutation(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
            gen = torch.Generator().manual_seed(int(state))
            self._order = (self.epoch, torch.randperm(self.windows.shape[0], generator=gen))
        return self._order[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 [global_batch_size / dp, seq_len]; advances the position."""
        if self.batch_index >= self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        per_rank = self.global_batch_size // self.dp
        start = self.batch_index * self.global_batch_size + self.dp_rank * per_rank
        rows = self.windows[self._permutation()[start : start + per_rank]]
        self.batch_index += 1
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        """The position: the next batch is batch `batch_index` of epoch `epoch`."""
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "seq_len": self.windows.shape[1] - 1}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; the seed, global batch and sequence length must be the saved ones."""
        mine = self.state_dict()
        for key in ("seed", "global_batch_size", "seq_len"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"checkpoint data {key}={state[key]} != configured {key}={mine[key]}: "
                                 "resume with the data settings the checkpoint was trained with")
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])


def build_loader(cfg: DataConfig, tokenizer: TextTokenizer, vocab_size: int, *,
                 dp_rank: int = 0, dp: int = 1) -> PackedLoader:
    """Read, tokenise and pack the corpus of `cfg`; this DP rank's loader."""
    windows = pack(read_documents(cfg.path), tokenizer, cfg.seq_len, vocab_size)
    return PackedLoader(windows, global_batch_size=cfg.global_batch_size, seed=cfg.seed,
                        dp_rank=dp_rank, dp=dp)
