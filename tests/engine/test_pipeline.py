"""Tests of the pipeline API: declaring nodes, wiring edges, checking the graph."""

from __future__ import annotations

import re
from typing import Any

import pytest

from engine.errors import ParameterError, PipelineError
from engine.pipeline import NodeSettings, Pipeline


def passthrough(item):
    return item


def passthrough_with_context(item, ctx):
    return item


def generate():
    yield 1


def generate_with_context(ctx):
    yield 1


def consume(item):
    pass


@pytest.fixture
def pipeline() -> Pipeline:
    return Pipeline("demo")


@pytest.fixture
def line_pipeline() -> Pipeline:
    """A valid pipeline `read` -> `double` -> `store`."""
    line = Pipeline("line")
    line.add("source", "read", generate)
    line.add("transform", "double", passthrough, after="read")
    line.add("sink", "store", consume, after="double")
    return line


class Collector:
    """A callable node object with hooks, as the built-in nodes are written."""

    batched = True

    def __init__(self) -> None:
        self.events: list[str] = []

    def setup(self, ctx: Any) -> None:
        self.events.append("setup")

    def teardown(self, ctx: Any) -> None:
        self.events.append("teardown")

    def __call__(self, items: list, ctx: Any) -> None:
        self.events.extend(items)


# Declaring nodes with the decorators.


def test_source_decorator_without_parentheses(pipeline: Pipeline) -> None:
    @pipeline.source
    def read(ctx):
        yield 1

    assert pipeline.nodes["read"].kind == "source"
    assert pipeline.nodes["read"].function is read


def test_transform_decorator_with_parentheses(pipeline: Pipeline) -> None:
    @pipeline.transform(after="read", batch_size=5)
    def double(item):
        return item * 2

    assert pipeline.nodes["double"].kind == "transform"
    assert pipeline.nodes["double"].function is double
    assert pipeline.nodes["double"].settings.batch_size == 5
    assert pipeline.upstream("double") == ["read"]


def test_sink_decorator_without_parentheses(pipeline: Pipeline) -> None:
    @pipeline.sink
    def store(item):
        pass

    assert pipeline.nodes["store"].kind == "sink"
    assert pipeline.nodes["store"].function is store


def test_decorator_name_overrides_function_name(pipeline: Pipeline) -> None:
    pipeline.sink("store", after="double")(consume)

    assert "store" in pipeline.nodes
    assert "consume" not in pipeline.nodes


def test_decorator_names_object_after_class(pipeline: Pipeline) -> None:
    collector = Collector()

    pipeline.sink(after="read")(collector)

    assert pipeline.nodes["Collector"].function is collector


def test_transform_lambda_needs_name(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match="a lambda needs a node name"):
        pipeline.transform(after="read")(lambda item: item)


def test_transform_lambda_with_name_accepted(pipeline: Pipeline) -> None:
    pipeline.transform("double", after="read")(lambda item: item * 2)

    assert pipeline.nodes["double"].function(4) == 8


def test_bare_decorator_lambda_needs_name(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match="a lambda needs a node name"):
        pipeline.transform(lambda item: item)


def test_bare_decorator_accepts_callable_object(pipeline: Pipeline) -> None:
    collector = Collector()

    pipeline.sink(collector)

    assert pipeline.nodes["Collector"].function is collector


def test_on_hooks_register_and_return_function(pipeline: Pipeline) -> None:
    def hook(params):
        pass

    assert pipeline.check_params(hook) is hook
    assert pipeline.on_start(hook) is hook
    assert pipeline.on_complete(hook) is hook
    assert pipeline.param_checks == [hook]
    assert pipeline.start_hooks == [hook]
    assert pipeline.completion_hooks == [hook]


# Names.


def test_add_rejects_duplicate_node_name(pipeline: Pipeline) -> None:
    pipeline.add("source", "read", generate)

    with pytest.raises(
        PipelineError, match="duplicate node name 'read' in pipeline 'demo'"
    ):
        pipeline.add("sink", "read", consume)


@pytest.mark.parametrize(
    "name", ["", "1st", "has-dash", "has.dot", "has space", "naïve!", None, 7]
)
def test_add_rejects_invalid_node_name(pipeline: Pipeline, name: Any) -> None:
    with pytest.raises(PipelineError, match=re.escape(f"invalid node name {name!r}")):
        pipeline.add("source", name, generate)


@pytest.mark.parametrize("name", ["read", "_private", "Read2", "a_b_c"])
def test_add_accepts_valid_node_name(pipeline: Pipeline, name: str) -> None:
    pipeline.add("source", name, generate)

    assert name in pipeline.nodes


@pytest.mark.parametrize(
    "name", ["", "-lead", ".lead", "has space", "a/b", "x:y", None, 42]
)
def test_pipeline_rejects_invalid_name(name: Any) -> None:
    with pytest.raises(
        PipelineError, match=re.escape(f"invalid pipeline name {name!r}")
    ):
        Pipeline(name)


@pytest.mark.parametrize("name", ["wordcount", "team.word-count_2", "2024_run"])
def test_pipeline_accepts_valid_name(name: str) -> None:
    assert Pipeline(name).name == name


def test_add_rejects_unknown_kind(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match="invalid node kind 'filter'"):
        pipeline.add("filter", "keep", passthrough)  # type: ignore[arg-type]


def test_add_rejects_non_callable_function(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match="node 'read': expected a function"):
        pipeline.add("source", "read", "not a function")  # type: ignore[arg-type]


# Node settings.


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [
        ("batch_size", 0, "1 or more"),
        ("batch_size", -5, "1 or more"),
        ("batch_size", True, "1 or more"),
        ("batch_size", 2.5, "1 or more"),
        ("batch_size", "10", "1 or more"),
        ("batch_timeout_s", -0.1, "0 or more"),
        ("batch_timeout_s", False, "0 or more"),
        ("batch_timeout_s", "1", "0 or more"),
        ("processes", 0, "1 or more"),
        ("processes", True, "1 or more"),
        ("retries", -1, "0 or more"),
        ("retries", False, "0 or more"),
        ("retry_backoff_s", -1.0, "0 or more"),
        ("max_restarts", -1, "0 or more"),
        ("max_restarts", 1.0, "0 or more"),
        ("restart_window_s", -60, "0 or more"),
        ("max_memory_bytes", 0, "1 or more"),
        ("max_memory_bytes", True, "1 or more"),
    ],
)
def test_settings_reject_value_out_of_bounds(
    pipeline: Pipeline, field: str, value: Any, bound: str
) -> None:
    with pytest.raises(PipelineError) as excinfo:
        pipeline.add("transform", "count", passthrough, after="read", **{field: value})

    message = str(excinfo.value)
    assert f"invalid {field}={value!r}" in message
    assert "for node 'count'" in message
    noun = "a number" if field.endswith("_s") else "an integer"
    assert f"{field} must be {noun} {bound}" in message


def test_settings_reject_too_many_processes(pipeline: Pipeline) -> None:
    pipeline.add("transform", "most", passthrough, after="read", processes=1000)

    with pytest.raises(PipelineError) as excinfo:
        pipeline.add("transform", "count", passthrough, after="read", processes=10000)

    message = str(excinfo.value)
    assert "invalid processes=10000 for node 'count'" in message
    assert "processes must be from 1 to 1000" in message


def test_settings_accept_values_at_bounds(pipeline: Pipeline) -> None:
    spec = pipeline.add(
        "transform",
        "count",
        passthrough,
        after="read",
        batch_size=1,
        batch_timeout_s=0,
        processes=1,
        retries=0,
        retry_backoff_s=0.0,
        max_restarts=0,
        restart_window_s=0,
        max_memory_bytes=1,
    )

    assert spec.settings.batch_size == 1
    assert spec.settings.batch_timeout_s == 0
    assert spec.settings.max_memory_bytes == 1


def test_settings_accept_int_for_seconds(pipeline: Pipeline) -> None:
    spec = pipeline.add(
        "transform", "count", passthrough, after="read", batch_timeout_s=2
    )

    assert spec.settings.batch_timeout_s == 2


def test_settings_default_without_options(pipeline: Pipeline) -> None:
    spec = pipeline.add("source", "read", generate)

    assert spec.settings == NodeSettings()


def test_settings_to_json_lists_every_field() -> None:
    settings = NodeSettings(batch_size=7, max_memory_bytes=2048)

    as_json = settings.to_json()

    assert as_json["batch_size"] == 7
    assert as_json["max_memory_bytes"] == 2048
    assert set(as_json) == set(NodeSettings.__slots__)


def test_settings_reject_nan_timeout(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match="invalid batch_timeout_s=nan"):
        pipeline.add(
            "transform",
            "count",
            passthrough,
            after="read",
            batch_timeout_s=float("nan"),
        )


def test_settings_float_for_int_asks_integer(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match="integer"):
        pipeline.add("transform", "count", passthrough, after="read", batch_size=2.5)


def test_add_unknown_option_lists_known(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError) as excinfo:
        pipeline.add("transform", "count", passthrough, after="read", batchsize=5)

    message = str(excinfo.value)
    assert "node 'count': unknown option 'batchsize'" in message
    assert "batch_size" in message
    assert "after" in message
    assert "setup" in message


def test_add_unknown_option_lists_batched(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match="batched"):
        pipeline.add("transform", "count", passthrough, after="read", batchsize=5)


@pytest.mark.parametrize(
    "option", [{"after": "other"}, {"batched": True}], ids=["after", "batched"]
)
def test_source_rejects_pull_options(
    pipeline: Pipeline, option: dict[str, Any]
) -> None:
    with pytest.raises(
        PipelineError, match="source node 'read' pulls nothing, so it takes no after="
    ):
        pipeline.add("source", "read", generate, **option)


def test_source_accepts_route(pipeline: Pipeline) -> None:
    def pick(item):
        return "store"

    spec = pipeline.add("source", "read", generate, route=pick)

    assert spec.route is pick


def test_source_rejects_batched_object(pipeline: Pipeline) -> None:
    class BatchedReader:
        batched = True

        def __call__(self, ctx):
            yield 1

    with pytest.raises(PipelineError, match="source node 'reader' pulls nothing"):
        pipeline.add("source", "reader", BatchedReader())


def test_sink_rejects_route(pipeline: Pipeline) -> None:
    with pytest.raises(
        PipelineError, match="sink node 'store' places nothing downstream"
    ):
        pipeline.add("sink", "store", consume, after="read", route=lambda item: "x")


def test_add_rejects_non_callable_route(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match="node 'split': route must be a function"):
        pipeline.add("transform", "split", passthrough, after="read", route="store")


def test_add_rejects_non_callable_setup(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match="node 'read': setup must be a function"):
        pipeline.add("source", "read", generate, setup="open the file")


def test_add_failure_leaves_no_node(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match="after= must be a node name"):
        pipeline.add("transform", "double", passthrough, after=42)

    assert "double" not in pipeline.nodes


# Edges and after=.


def test_after_string_adds_one_edge(pipeline: Pipeline) -> None:
    pipeline.add("transform", "double", passthrough, after="read")

    assert [(e.source, e.target, e.when) for e in pipeline.edges] == [
        ("read", "double", None)
    ]


def test_after_list_adds_edge_each(pipeline: Pipeline) -> None:
    pipeline.add("transform", "merge", passthrough, after=["left", "right"])

    assert pipeline.upstream("merge") == ["left", "right"]
    assert all(edge.when is None for edge in pipeline.edges)


def test_after_dict_adds_filtered_edges(pipeline: Pipeline) -> None:
    def is_even(item):
        return item % 2 == 0

    pipeline.add("sink", "evens", consume, after={"numbers": is_even, "extra": None})

    assert [(e.source, e.target, e.when) for e in pipeline.edges] == [
        ("numbers", "evens", is_even),
        ("extra", "evens", None),
    ]


@pytest.mark.parametrize("after", [42, ["read", 3]], ids=["int", "list-with-int"])
def test_after_rejects_other_types(pipeline: Pipeline, after: Any) -> None:
    with pytest.raises(
        PipelineError, match=re.escape("node 'double': after= must be a node name")
    ):
        pipeline.add("transform", "double", passthrough, after=after)


def test_connect_rejects_duplicate_edge(pipeline: Pipeline) -> None:
    pipeline.connect("read", "store")

    with pytest.raises(PipelineError, match="duplicate edge 'read' -> 'store'"):
        pipeline.connect("read", "store", when=lambda item: True)


def test_after_rejects_repeated_upstream(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match="duplicate edge 'read' -> 'double'"):
        pipeline.add("transform", "double", passthrough, after=["read", "read"])


def test_connect_rejects_non_callable_when(pipeline: Pipeline) -> None:
    with pytest.raises(
        PipelineError, match="edge 'read' -> 'store': when= must be a function"
    ):
        pipeline.connect("read", "store", when=True)  # type: ignore[arg-type]


def test_connect_accepts_later_declared_nodes(pipeline: Pipeline) -> None:
    pipeline.connect("read", "store")
    pipeline.add("source", "read", generate)
    pipeline.add("sink", "store", consume)

    pipeline.check()

    assert pipeline.downstream("read") == ["store"]


# Checking the graph.


def test_check_accepts_valid_line(line_pipeline: Pipeline) -> None:
    line_pipeline.check()


def test_check_rejects_no_nodes(pipeline: Pipeline) -> None:
    with pytest.raises(PipelineError, match="pipeline 'demo' has no nodes"):
        pipeline.check()


def test_check_rejects_no_source(pipeline: Pipeline) -> None:
    pipeline.add("transform", "double", passthrough)
    pipeline.add("sink", "store", consume, after="double")

    with pytest.raises(PipelineError, match="pipeline 'demo' has no source node"):
        pipeline.check()


def test_check_unknown_node_lists_known(line_pipeline: Pipeline) -> None:
    line_pipeline.connect("double", "stroe")

    with pytest.raises(PipelineError) as excinfo:
        line_pipeline.check()

    message = str(excinfo.value)
    assert "edge 'double' -> 'stroe': node 'stroe' not found" in message
    assert "known nodes are 'read', 'double', 'store'" in message


def test_check_rejects_edge_into_source(line_pipeline: Pipeline) -> None:
    line_pipeline.connect("double", "read")

    with pytest.raises(
        PipelineError, match="edge into source node 'read' from 'double'"
    ):
        line_pipeline.check()


def test_check_rejects_edge_from_sink(line_pipeline: Pipeline) -> None:
    line_pipeline.connect("store", "double")

    with pytest.raises(PipelineError, match="edge from sink node 'store' to 'double'"):
        line_pipeline.check()


def test_check_rejects_transform_without_input(line_pipeline: Pipeline) -> None:
    line_pipeline.add("transform", "orphan", passthrough)
    line_pipeline.connect("orphan", "store")

    with pytest.raises(
        PipelineError, match="transform node 'orphan' has no input; give it after="
    ):
        line_pipeline.check()


def test_check_rejects_sink_without_input(line_pipeline: Pipeline) -> None:
    line_pipeline.add("sink", "unused", consume)

    with pytest.raises(PipelineError, match="sink node 'unused' has no input"):
        line_pipeline.check()


def test_check_rejects_transform_without_output(line_pipeline: Pipeline) -> None:
    line_pipeline.add("transform", "dead_end", passthrough, after="read")

    with pytest.raises(
        PipelineError, match="transform node 'dead_end' sends its results nowhere"
    ):
        line_pipeline.check()


def test_check_rejects_source_without_output(pipeline: Pipeline) -> None:
    pipeline.add("source", "read", generate)

    with pytest.raises(
        PipelineError, match="source node 'read' sends its results nowhere"
    ):
        pipeline.check()


def test_check_cycle_shows_path(pipeline: Pipeline) -> None:
    pipeline.add("source", "read", generate)
    pipeline.add("transform", "first", passthrough, after=["read", "second"])
    pipeline.add("transform", "second", passthrough, after="first")
    pipeline.add("sink", "store", consume, after="second")

    with pytest.raises(
        PipelineError, match="cycle 'first' -> 'second' -> 'first' in pipeline 'demo'"
    ):
        pipeline.check()


def test_check_rejects_self_loop(pipeline: Pipeline) -> None:
    pipeline.add("source", "read", generate)
    pipeline.add("transform", "again", passthrough, after=["read", "again"])
    pipeline.add("sink", "store", consume, after="again")

    with pytest.raises(PipelineError, match="cycle 'again' -> 'again'"):
        pipeline.check()


def test_check_accepts_fan_out_and_fan_in(pipeline: Pipeline) -> None:
    pipeline.add("source", "read", generate)
    pipeline.add("transform", "left", passthrough, after="read")
    pipeline.add("transform", "right", passthrough, after="read")
    pipeline.add("sink", "store", consume, after=["left", "right"])

    pipeline.check()

    assert pipeline.downstream("read") == ["left", "right"]


# Queue names.


def test_edge_queue_name(line_pipeline: Pipeline) -> None:
    assert line_pipeline.edge_queue("read", "double") == "line.read-to-double"


def test_fail_queue_name(line_pipeline: Pipeline) -> None:
    assert line_pipeline.fail_queue("double") == "line.double-fail"


def test_node_type_name(line_pipeline: Pipeline) -> None:
    assert line_pipeline.node_type("double") == "line.double"


def test_input_queues_for_fan_in(pipeline: Pipeline) -> None:
    pipeline.add("source", "left", generate)
    pipeline.add("source", "right", generate)
    pipeline.add("sink", "store", consume, after=["left", "right"])

    assert pipeline.input_queues("store") == [
        "demo.left-to-store",
        "demo.right-to-store",
    ]
    assert pipeline.input_queues("left") == []


def test_data_queues_follow_edges(line_pipeline: Pipeline) -> None:
    assert line_pipeline.data_queues() == [
        "line.read-to-double",
        "line.double-to-store",
    ]


def test_all_queues_add_fail_queues(line_pipeline: Pipeline) -> None:
    assert line_pipeline.all_queues() == [
        "line.read-to-double",
        "line.double-to-store",
        "line.read-fail",
        "line.double-fail",
        "line.store-fail",
    ]


def test_queue_names_differ_between_pipelines() -> None:
    first = Pipeline("first")
    second = Pipeline("second")

    assert first.edge_queue("read", "store") != second.edge_queue("read", "store")
    assert first.fail_queue("read") != second.fail_queue("read")


# Order.


def test_topological_order_of_line(line_pipeline: Pipeline) -> None:
    assert line_pipeline.topological_order() == ["read", "double", "store"]


def test_topological_order_puts_upstream_first(pipeline: Pipeline) -> None:
    # Declared downstream-first, wired with connect afterwards.
    pipeline.add("sink", "store", consume)
    pipeline.add("transform", "right", passthrough)
    pipeline.add("transform", "left", passthrough)
    pipeline.add("source", "read", generate)
    for source, target in [
        ("read", "left"),
        ("read", "right"),
        ("left", "store"),
        ("right", "store"),
        ("left", "right"),
    ]:
        pipeline.connect(source, target)

    order = pipeline.topological_order()

    assert sorted(order) == ["left", "read", "right", "store"]
    for edge in pipeline.edges:
        assert order.index(edge.source) < order.index(edge.target), edge


def test_topological_order_rejects_cycle(pipeline: Pipeline) -> None:
    pipeline.add("transform", "first", passthrough, after="second")
    pipeline.add("transform", "second", passthrough, after="first")

    with pytest.raises(PipelineError, match="cycle in pipeline 'demo'"):
        pipeline.topological_order()


# Signature detection.


def test_transform_item_only_takes_no_context(pipeline: Pipeline) -> None:
    spec = pipeline.add("transform", "double", passthrough, after="read")

    assert spec.takes_context is False


def test_transform_item_and_ctx_takes_context(pipeline: Pipeline) -> None:
    spec = pipeline.add("transform", "double", passthrough_with_context, after="read")

    assert spec.takes_context is True


def test_transform_optional_ctx_takes_context(pipeline: Pipeline) -> None:
    def double(item, ctx=None):
        return item

    spec = pipeline.add("transform", "double", double, after="read")

    assert spec.takes_context is True


def test_transform_varargs_takes_context(pipeline: Pipeline) -> None:
    def anything(*args):
        return args[0]

    spec = pipeline.add("transform", "anything", anything, after="read")

    assert spec.takes_context is True


def test_source_without_arguments_takes_no_context(pipeline: Pipeline) -> None:
    spec = pipeline.add("source", "read", generate)

    assert spec.takes_context is False


def test_source_with_ctx_takes_context(pipeline: Pipeline) -> None:
    spec = pipeline.add("source", "read", generate_with_context)

    assert spec.takes_context is True


def test_transform_too_many_arguments_rejected(pipeline: Pipeline) -> None:
    def merge(item, ctx, extra):
        return item

    with pytest.raises(PipelineError) as excinfo:
        pipeline.add("transform", "merge", merge, after="read")

    message = str(excinfo.value)
    assert "transform node 'merge' has the signature (item, ctx, extra)" in message
    assert "expected fn(item, ctx) or fn(item)" in message


def test_transform_without_arguments_rejected(pipeline: Pipeline) -> None:
    with pytest.raises(
        PipelineError, match=re.escape("transform node 'generate' has the signature ()")
    ):
        pipeline.add("transform", "generate", generate, after="read")


def test_source_too_many_arguments_rejected(pipeline: Pipeline) -> None:
    def read(path, ctx):
        yield path

    with pytest.raises(PipelineError, match=re.escape("expected fn(ctx) or fn()")):
        pipeline.add("source", "read", read)


def test_sink_too_many_arguments_rejected(pipeline: Pipeline) -> None:
    def store(item, ctx, table):
        pass

    with pytest.raises(PipelineError, match="sink node 'store' has the signature"):
        pipeline.add("sink", "store", store, after="read")


def test_transform_required_keyword_rejected(pipeline: Pipeline) -> None:
    def lookup(item, *, table):
        return table[item]

    with pytest.raises(
        PipelineError, match="transform node 'lookup' has the signature"
    ):
        pipeline.add("transform", "lookup", lookup, after="read")


def test_callable_object_hooks_picked_up(pipeline: Pipeline) -> None:
    collector = Collector()

    spec = pipeline.add("sink", "collect", collector, after="read")

    assert spec.setup == collector.setup
    assert spec.teardown == collector.teardown
    assert spec.is_batched is True
    assert spec.takes_context is True


def test_explicit_hooks_override_object_hooks(pipeline: Pipeline) -> None:
    def open_output(ctx):
        pass

    spec = pipeline.add(
        "sink", "collect", Collector(), after="read", setup=open_output, batched=False
    )

    assert spec.setup is open_output
    assert spec.is_batched is False


def test_function_attributes_not_taken_as_hooks(pipeline: Pipeline) -> None:
    def store(item):
        pass

    store.setup = lambda ctx: None  # type: ignore[attr-defined]

    spec = pipeline.add("sink", "store", store, after="read")

    assert spec.setup is None
    assert spec.teardown is None
    assert spec.is_batched is False


def test_callable_object_signature_checked(pipeline: Pipeline) -> None:
    class Merger:
        def __call__(self, item, ctx, extra):
            return item

    with pytest.raises(PipelineError, match="transform node 'merge' has the signature"):
        pipeline.add("transform", "merge", Merger(), after="read")


# Run parameters.


@pytest.fixture
def params_pipeline() -> Pipeline:
    return Pipeline(
        "params",
        params={"input": "book.txt", "lines": 10, "ratio": 0.5, "verbose": False},
    )


def test_resolve_params_without_overrides(params_pipeline: Pipeline) -> None:
    params = params_pipeline.resolve_params({})

    assert params == {
        "input": "book.txt",
        "lines": 10,
        "ratio": 0.5,
        "verbose": False,
    }
    assert params is not params_pipeline.params


def test_resolve_params_unknown_key_lists_known(params_pipeline: Pipeline) -> None:
    with pytest.raises(ParameterError) as excinfo:
        params_pipeline.resolve_params({"line": "5"})

    message = str(excinfo.value)
    assert "unknown parameter 'line' for pipeline 'params'" in message
    assert "known parameters are 'input', 'lines', 'ratio', 'verbose'" in message


def test_resolve_params_unknown_key_without_params(pipeline: Pipeline) -> None:
    with pytest.raises(ParameterError, match="known parameters are none"):
        pipeline.resolve_params({"input": "x"})


def test_resolve_params_converts_int(params_pipeline: Pipeline) -> None:
    assert params_pipeline.resolve_params({"lines": "25"})["lines"] == 25


def test_resolve_params_converts_float(params_pipeline: Pipeline) -> None:
    assert params_pipeline.resolve_params({"ratio": "0.25"})["ratio"] == 0.25


def test_resolve_params_keeps_text(params_pipeline: Pipeline) -> None:
    assert params_pipeline.resolve_params({"input": "42"})["input"] == "42"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("Yes", True),
        ("1", True),
        (" on ", True),
        ("false", False),
        ("NO", False),
        ("0", False),
        ("off", False),
    ],
)
def test_resolve_params_converts_bool(
    params_pipeline: Pipeline, text: str, expected: bool
) -> None:
    assert params_pipeline.resolve_params({"verbose": text})["verbose"] is expected


@pytest.mark.parametrize(
    ("key", "text", "kind"),
    [
        ("lines", "ten", "int"),
        ("lines", "2.5", "int"),
        ("ratio", "half", "float"),
        ("ratio", "nan", "float"),
        ("ratio", "-inf", "float"),
        ("verbose", "maybe", "bool"),
    ],
)
def test_resolve_params_rejects_bad_value(
    params_pipeline: Pipeline, key: str, text: str, kind: str
) -> None:
    with pytest.raises(ParameterError) as excinfo:
        params_pipeline.resolve_params({key: text})

    message = str(excinfo.value)
    assert f"invalid value {text!r} for parameter {key!r}" in message
    assert f"expected {kind} like the default" in message


def test_check_params_hook_sees_converted_values(params_pipeline: Pipeline) -> None:
    seen: list[dict[str, Any]] = []
    params_pipeline.check_params(seen.append)

    params_pipeline.resolve_params({"lines": "3"})

    assert seen == [{"input": "book.txt", "lines": 3, "ratio": 0.5, "verbose": False}]


def test_check_params_hook_error_propagates(params_pipeline: Pipeline) -> None:
    @params_pipeline.check_params
    def check_lines(params):
        if params["lines"] < 1:
            raise ParameterError(
                f"invalid lines={params['lines']!r}: expected 1 or more"
            )

    with pytest.raises(ParameterError, match="invalid lines=0: expected 1 or more"):
        params_pipeline.resolve_params({"lines": "0"})


def test_check_params_hook_bug_is_pipeline_error(params_pipeline: Pipeline) -> None:
    @params_pipeline.check_params
    def check_lines(params):
        return 1 / 0

    with pytest.raises(PipelineError) as excinfo:
        params_pipeline.resolve_params({})

    message = str(excinfo.value)
    assert "check_params function 'check_lines'" in message
    assert "failed with ZeroDivisionError: division by zero" in message
    assert not isinstance(excinfo.value, ParameterError)


# Serializer.


def test_pipeline_defaults_to_json_serializer(pipeline: Pipeline) -> None:
    assert pipeline.serializer == "json"


def test_pipeline_accepts_pickle_serializer() -> None:
    assert Pipeline("demo", serializer="pickle").serializer == "pickle"


@pytest.mark.parametrize("serializer", ["yaml", "JSON", "", None])
def test_pipeline_rejects_unknown_serializer(serializer: Any) -> None:
    with pytest.raises(PipelineError) as excinfo:
        Pipeline("demo", serializer=serializer)

    message = str(excinfo.value)
    assert f"invalid serializer {serializer!r} for pipeline 'demo'" in message
    assert "expected 'json' or 'pickle'" in message
