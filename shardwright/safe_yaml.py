"""YAML for untrusted text: bounded in size, depth and node count, without anchors or aliases.

`yaml.safe_load` builds no objects but still expands aliases: a few hundred bytes of nested
anchors become gigabytes once something walks the result (the "billion laughs"). `load` refuses
anchors, aliases and merge keys (`<<`) outright, and caps the text at `MAX_BYTES`, the nesting at
`MAX_DEPTH` and the number of nodes at `MAX_NODES`, all checked while the text is composed, before
anything is built. Duplicate mapping keys are refused too (PyYAML keeps the last one silently).
Every failure is a ValueError with a one-line message naming the line.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent

MAX_BYTES = 64 * 1024
MAX_DEPTH = 16
MAX_NODES = 4096


class UnsafeYamlError(ValueError):
    """The text uses a YAML feature that untrusted input may not use, or is too large."""


class BoundedSafeLoader(yaml.SafeLoader):
    """A SafeLoader that refuses anchors, aliases and merge keys and bounds depth and node count."""

    def __init__(self, stream: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
        super().__init__(stream)
        self.max_depth, self.max_nodes = max_depth, max_nodes
        self._depth = self._nodes = 0

    def _where(self, event) -> str:
        return f"line {event.start_mark.line + 1}" if event.start_mark else "the job file"

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise UnsafeYamlError(f"YAML aliases (*{event.anchor}) are not accepted ({self._where(event)}); "
                                  "write the value out")
        if isinstance(event, (ScalarEvent, CollectionStartEvent)) and event.anchor is not None:
            raise UnsafeYamlError(f"YAML anchors (&{event.anchor}) are not accepted ({self._where(event)}); "
                                  "write the value out")
        self._nodes += 1
        if self._nodes > self.max_nodes:
            raise UnsafeYamlError(f"job file has more than {self.max_nodes} YAML nodes ({self._where(event)})")
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                raise UnsafeYamlError(f"job file nests deeper than {self.max_depth} levels ({self._where(event)})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def fetch_flow_collection_start(self, TokenClass) -> None:
        # The scanner keeps one possible simple key per flow level: cut deep '[[[[' before it is quadratic.
        if self.flow_level >= self.max_depth:
            raise UnsafeYamlError(f"job file nests deeper than {self.max_depth} levels (line {self.line + 1})")
        super().fetch_flow_collection_start(TokenClass)

    def flatten_mapping(self, node) -> None:
        for key, _ in node.value:
            if key.tag == "tag:yaml.org,2002:merge":
                raise UnsafeYamlError(f"YAML merge keys (<<) are not accepted (line {key.start_mark.line + 1}); "
                                      "write the keys out")

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise UnsafeYamlError(f"duplicate key {key.value!r} (line {key.start_mark.line + 1})")
                seen.add(key.value)
        return super().construct_mapping(node, deep=deep)


def load(text: str | bytes, max_bytes: int = MAX_BYTES) -> Any:
    """Parse one YAML (or JSON) document of untrusted text; raises ValueError with one line."""
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > max_bytes:
        raise UnsafeYamlError(f"job file is {size} bytes, over the {max_bytes // 1024} KiB limit")
    loader = None
    try:
        loader = BoundedSafeLoader(text)
        return loader.get_single_data()
    except UnsafeYamlError:
        raise
    except yaml.YAMLError as err:
        raise ValueError(f"job file is not valid YAML: {_one_line(err)}") from err
    except (ValueError, TypeError, OverflowError, RecursionError) as err:  # e.g. int('9'*5000), unhashable keys
        raise ValueError(f"job file has a value YAML cannot read: {_one_line(err)}") from err
    finally:
        if loader is not None:
            loader.dispose()


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]
