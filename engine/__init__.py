"""Monomyth: run Python functions as a pipeline of nodes, one process each.

A pipeline file imports what it needs from here and from `nodes`.
"""

from engine.context import NodeContext, Param, param
from engine.errors import (
    EngineError,
    ParameterError,
    PipelineError,
    RecipeError,
    StreamError,
    StreamUnavailableError,
)
from engine.pipeline import NodeSettings, Pipeline

__all__ = [
    # Declaring pipelines
    "Pipeline",
    "NodeSettings",
    "NodeContext",
    "Param",
    "param",
    # Errors
    "EngineError",
    "ParameterError",
    "PipelineError",
    "RecipeError",
    "StreamError",
    "StreamUnavailableError",
]
