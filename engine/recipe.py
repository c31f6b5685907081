"""Recipes: everything a worker needs to run a node, serialized on the master.

A recipe is a JSON header line followed by the cloudpickled `Recipe`. The
header contains what the worker reads without running any code (the Python
version, the node's type and settings); only the node process unpickles the
body, so that a recipe that fails to load fails that node alone.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cloudpickle

from engine.errors import RecipeError

if TYPE_CHECKING:
    from engine.pipeline import NodeSpec, Pipeline

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Output:
    """One outgoing edge of a node, as its process uses it."""

    target: str
    queue: str
    when: Any = None
    # The target's batch size, which is the max items that one message on
    # the edge packs, so that no message contains more than the target takes.
    batch_size: int = 100


@dataclass(frozen=True, slots=True)
class Recipe:
    """A node with everything around it that its process needs."""

    pipeline: str
    node_type: str
    spec: NodeSpec
    input_queues: tuple[str, ...]
    outputs: tuple[Output, ...]
    fail_queue: str
    params: dict[str, Any]
    serializer: str
    # The pipeline file, for tracebacks; "" when the pipeline was not loaded
    # from a file.
    source_file: str = ""


@dataclass(frozen=True, slots=True)
class RecipeHeader:
    """The part of a recipe that is read without unpickling anything."""

    node_type: str
    kind: str
    python: str
    settings: dict[str, Any]
    input_queues: list[str]
    # A digest of the run parameters, "" in recipes of older versions.
    params_digest: str = ""


def python_version() -> str:
    """Return this interpreter's `major.minor` version."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def params_digest(params: dict[str, Any]) -> str:
    """Return a short digest of run parameters that is equal for equal values."""
    text = json.dumps(params, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_recipe(pipeline: Pipeline, node: str, params: dict[str, Any]) -> bytes:
    """Serialize the recipe of `node`; raises `RecipeError` if it cannot be pickled."""
    spec = pipeline.nodes.get(node)
    if spec is None:
        known = ", ".join(repr(name) for name in pipeline.nodes)
        raise RecipeError(f"node {node!r} not found; known nodes are {known}")
    outputs = tuple(
        Output(
            edge.target,
            pipeline.edge_queue(node, edge.target),
            edge.when,
            pipeline.nodes[edge.target].settings.batch_size,
        )
        for edge in pipeline.edges
        if edge.source == node
    )
    recipe = Recipe(
        pipeline=pipeline.name,
        node_type=pipeline.node_type(node),
        spec=spec,
        input_queues=tuple(pipeline.input_queues(node)),
        outputs=outputs,
        fail_queue=pipeline.fail_queue(node),
        params=params,
        serializer=pipeline.serializer,
        source_file=pipeline.source_file,
    )
    header = {
        "format": FORMAT_VERSION,
        "node_type": recipe.node_type,
        "kind": spec.kind,
        "python": python_version(),
        "settings": spec.settings.to_json(),
        "input_queues": list(recipe.input_queues),
        "params_digest": params_digest(params),
    }
    try:
        body = cloudpickle.dumps(recipe)
    except Exception as exc:
        raise RecipeError(
            f"node {node!r} cannot be serialized for the workers: "
            f"{type(exc).__name__}: {exc}; open files, connections and locks in "
            "the node's setup hook, not at import time or in a closure"
        ) from exc
    return json.dumps(header).encode() + b"\n" + body


def read_header(data: bytes) -> RecipeHeader:
    """Read a recipe's header without unpickling; raises `RecipeError`."""
    line, _, _ = data.partition(b"\n")
    try:
        header = json.loads(line)
        if header["format"] != FORMAT_VERSION:
            raise RecipeError(
                f"recipe format {header['format']!r} is not supported by this "
                f"worker, which reads format {FORMAT_VERSION}; install the same "
                "monomyth version on the master and every worker"
            )
        return RecipeHeader(
            node_type=header["node_type"],
            kind=header["kind"],
            python=header["python"],
            settings=header["settings"],
            input_queues=header["input_queues"],
            params_digest=str(header.get("params_digest", "")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise RecipeError(f"invalid recipe header {line[:120]!r}: {exc}") from exc


def load_recipe(data: bytes) -> Recipe:
    """Unpickle a recipe, in the node process; raises `RecipeError` with the reason.

    Limits: unpickling runs code from the pipeline file, so only a recipe
    from an authenticated master reaches this function.
    """
    header = read_header(data)
    if header.python != python_version():
        raise RecipeError(
            f"recipe of node type {header.node_type!r} was built with Python "
            f"{header.python}, but this worker runs Python {python_version()}; run "
            "the master and every worker on the same Python minor version"
        )
    _, _, body = data.partition(b"\n")
    try:
        recipe = cloudpickle.loads(body)
    except ModuleNotFoundError as exc:
        raise RecipeError(
            f"recipe of node type {header.node_type!r} needs the module "
            f"{exc.name!r}, which is not installed on this worker; install it "
            "here or move the code into the pipeline file"
        ) from exc
    except Exception as exc:
        raise RecipeError(
            f"recipe of node type {header.node_type!r} cannot be loaded on this "
            f"worker: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(recipe, Recipe):
        raise RecipeError(
            f"recipe of node type {header.node_type!r} contains a "
            f"{type(recipe).__name__}, not a Recipe"
        )
    return recipe
