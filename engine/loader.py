"""Loading a pipeline file: a plain `.py` file that defines a `Pipeline`."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
from pathlib import Path

import cloudpickle

from engine.errors import EngineError, PipelineError
from engine.pipeline import Pipeline

logger = logging.getLogger(__name__)


def load_pipeline(path: str | Path, name: str | None = None) -> Pipeline:
    """Run the pipeline file at `path` and return the `Pipeline` it defines.

    With several pipelines in one file, `name` picks one. The file's folder
    goes on `sys.path`, as for a script. Raises `PipelineError` when the file
    fails to run or defines no matching pipeline.

    Limits: functions and classes of the file itself travel to the workers by
    value; a module that the file imports travels by reference, so it must be
    installed on every worker.
    """
    path = Path(path).resolve()
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    digest = hashlib.blake2b(str(path).encode(), digest_size=6).hexdigest()
    module_name = f"monomyth_pipeline_{_identifier(path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PipelineError(
            f"cannot load pipeline file {str(path)!r}: expected a Python file "
            "ending in .py"
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except EngineError:
        del sys.modules[module_name]
        raise
    except (Exception, SystemExit) as exc:
        del sys.modules[module_name]
        raise PipelineError(
            f"pipeline file {str(path)!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    # The workers have no copy of this file: send its functions by value.
    cloudpickle.register_pickle_by_value(module)

    # A dict keyed by id: one pipeline bound to two names counts once.
    found = {id(v): v for v in vars(module).values() if isinstance(v, Pipeline)}
    defined = list(found.values())
    pipelines = [p for p in defined if name is None or p.name == name]
    if len(pipelines) == 1:
        pipelines[0].source_file = str(path)
        return pipelines[0]
    if not pipelines and name is not None and defined:
        names = ", ".join(repr(pipeline.name) for pipeline in defined)
        raise PipelineError(
            f"no Pipeline named {name!r} in {str(path)!r}; it defines {names}"
        )
    if not pipelines:
        raise PipelineError(
            f"no Pipeline found in {str(path)!r}; define one at module "
            "level, for example: pipeline = Pipeline('wordcount')"
        )
    names = ", ".join(repr(pipeline.name) for pipeline in pipelines)
    raise PipelineError(
        f"{str(path)!r} defines several pipelines ({names}); choose one with "
        "--pipeline NAME"
    )


def _identifier(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)
