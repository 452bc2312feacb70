"""Property-based fuzzing of the real HTTP service against its own OpenAPI schema (schemathesis):
no server errors, and every response (4xx included) matches what the schema documents."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import build_models_dir
from tests.live import LiveServer

EXAMPLES = 30  # per operation and mode: bounded so the whole schema takes about a minute
# Invalid input must be refused with a 4xx; 413 (too many files, body too large) is one of ours.
# Valid input must be accepted, except 415: a schema can say "binary", not "bytes an image decoder reads",
# so schema-valid random bytes are refused as "not an image" by design.
CONFIG = SchemathesisConfig.from_dict({"checks": {
    "negative_data_rejection": {"expected-statuses": [400, 404, 405, 406, 413, 415, 422]},
    "positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "415", "429"]}}})
# The Open Inference Protocol's request is valid only when each input's data holds prod(shape) values of its
# datatype, which JSON Schema cannot say: its schema-valid bodies are mostly invalid tensors (400).
OIP_INFER = ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer")


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory):
    models = build_models_dir(tmp_path_factory.mktemp("fuzz") / "models")
    # As prune-train writes it today: an accuracy at every TTA level, so that keep=auto can choose at any
    # level a schema-valid request pins (a manifest without them answers 422: no figures to choose by).
    manifest = json.loads((models / "manifest.json").read_text())
    for entry in manifest["variants"]:
        entry |= {f"test_acc_tta{level}_mean": entry["test_acc_mean"] - 1 + level / 2 for level in (0, 1, 2)}
    (models / "manifest.json").write_text(json.dumps(manifest))
    server = LiveServer(models, MAX_IMAGES="4")
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_within_its_schema(live_url: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json", config=CONFIG)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/predict", "/variants", "/metrics", "/health", "/ready"}
    fuzzed = set()
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            # Every check: no 5xx; status codes, content types, headers and bodies as documented; invalid
            # data rejected; valid data accepted (keep is an enum of the loaded keeps, so every
            # schema-valid keep is served), except for OIP inference (see OIP_INFER).
            excluded = [positive_data_acceptance] if case.operation.path in OIP_INFER else []
            case.call_and_validate(excluded_checks=excluded)
            fuzzed.add(case.operation.path)

        try:
            check()
        except Unsatisfiable:
            # An operation without parameters or body has no invalid input to generate.
            assert mode == GenerationMode.NEGATIVE
    assert "/predict" in fuzzed
