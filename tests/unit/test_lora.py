"""LoRA adapters without an engine: PIPELINE_LORA_MODULES, the adapter registry LLMService's
workers share (services/gpu/lora.py), and the front tier's side (the `model` field, /v1/models, the
load and unload routes) against the stand-in GPU tier. The real engine: tests/integration/test_lora_parity.py.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import httpx
import pytest
from fake_gpu_tier import FakeGpuTier, served_front, served_gpu_tier
from prometheus_client import REGISTRY
from pydantic import ValidationError
from test_request_life import Front

from services.config import Settings
from services.front.openai.api_router import app as openai_app
from services.front.openai.api_router import attach_lora_routes
from services.front.openai.serving import OpenAIServing
from services.gpu.lora import AdapterExists, AdapterRegistry, resolve_adapter_path
from services.lora_modules import LoraModule, parse_lora_modules
from services.protocol import AdapterInfo
from services.security import BearerAuthMiddleware

API_KEY = "lora-test-key"


# --- PIPELINE_LORA_MODULES -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a=/x b=/y", "a=/x,b=/y", " a=/x ,  b=/y ",
                                   '[{"name": "a", "path": "/x"}, {"name": "b", "path": "/y"}]'])
def test_lora_modules_are_read_as_vllm_reads_them(value: str):
    """`name=path` items (spaces or commas) or JSON objects, in their order."""
    assert [(m.name, m.path) for m in parse_lora_modules(value)] == [("a", "/x"), ("b", "/y")]


def test_a_json_module_keeps_its_base_model_name():
    [module] = parse_lora_modules('{"name": "a", "path": "/x", "base_model_name": "base"}')
    assert module == LoraModule(name="a", path="/x", base_model_name="base")


@pytest.mark.parametrize("value", ["a", "=/x", "a=", '{"name": "a"}', "[{bad json"])
def test_a_malformed_module_is_refused(value: str):
    with pytest.raises((ValueError, ValidationError)):
        parse_lora_modules(value)


@pytest.mark.parametrize("env, message", [
    ({"PIPELINE_LORA_MODULES": "a=/x a=/y"}, "appears twice"),
    ({"PIPELINE_LORA_MODULES": "base=/x", "PIPELINE_SERVED_MODEL_NAME": "base"}, "conflicts"),
    ({"PIPELINE_MAX_LORAS": "4", "PIPELINE_MAX_CPU_LORAS": "2"}, "PIPELINE_MAX_CPU_LORAS"),
])
def test_a_bad_lora_configuration_stops_the_start(monkeypatch, env: dict, message: str):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_lora_is_on_in_the_engine_only_when_adapters_may_be_served(monkeypatch):
    assert not Settings().lora_enabled
    monkeypatch.setenv("PIPELINE_LORA_MODULES", "a=/x")
    assert Settings().lora_enabled
    monkeypatch.delenv("PIPELINE_LORA_MODULES")
    monkeypatch.setenv("PIPELINE_ALLOW_RUNTIME_LORA_UPDATING", "true")
    assert Settings().lora_enabled


def test_an_adapter_path_may_be_a_model_store_tag(tmp_path: Path):
    """A folder stays a folder; a store tag becomes its folder; anything else is left to vLLM."""
    import bentoml

    from services.config import DEFAULT_MODEL

    assert resolve_adapter_path(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_adapter_path(DEFAULT_MODEL) == bentoml.models.get(DEFAULT_MODEL).path
    assert resolve_adapter_path("someone/some-adapter") == "someone/some-adapter"


# --- the registry ------------------------------------------------------------------------------------


def same(path: str) -> str:
    return path


def modules(*names: str) -> list[LoraModule]:
    return [LoraModule(name=name, path=f"/adapters/{name}") for name in names]


def test_configured_adapters_get_ids_in_configuration_order(tmp_path: Path):
    registry = AdapterRegistry(modules("b", "a", "c"), str(tmp_path / "r.json"), resolve=same)
    assert [(a.name, a.id, a.path) for a in registry.adapters()] == [
        ("b", 1, "/adapters/b"), ("a", 2, "/adapters/a"), ("c", 3, "/adapters/c")]
    assert registry.get("a").id == 2 and registry.get("nope") is None


def test_workers_sharing_the_file_see_each_others_loads_and_unloads(tmp_path: Path):
    """Two workers (two registries on one file): a load through one is served, with the same id
    and path, by the other; so is an unload."""
    path = str(tmp_path / "r.json")
    one = AdapterRegistry(modules("a"), path, resolve=same)
    two = AdapterRegistry(modules("a"), path, resolve=same)
    one.commit(one.reserve("new", "/adapters/new"))
    assert two.get("new") == one.get("new") and two.get("new").id == 2
    two.remove("new")
    assert one.get("new") is None
    assert [a.name for a in one.adapters()] == ["a"]


def test_an_id_is_never_given_twice(tmp_path: Path):
    """The engine caches adapters by id: an unloaded adapter's id, or one spent on a load the
    engine refused, is not given to another adapter."""
    registry = AdapterRegistry(modules("a"), str(tmp_path / "r.json"), resolve=same)
    registry.commit(first := registry.reserve("x", "/adapters/x"))
    registry.remove("x")
    registry.reserve("refused", "/nowhere")  # never committed: the engine said no
    registry.commit(again := registry.reserve("x", "/adapters/x"))
    assert (first.id, again.id) == (2, 4)
    assert registry.get("refused") is None


def test_a_name_is_loaded_once_unless_in_place(tmp_path: Path):
    """vLLM's rule: loading a served name again needs load_inplace, which keeps its id."""
    registry = AdapterRegistry(modules("a"), str(tmp_path / "r.json"), resolve=same)
    with pytest.raises(AdapterExists):
        registry.reserve("a", "/adapters/other")
    replaced = registry.reserve("a", "/adapters/other", inplace=True)
    registry.commit(replaced, inplace=True)
    assert (registry.get("a").id, registry.get("a").path) == (1, "/adapters/other")


def test_a_load_that_lost_a_race_is_refused(tmp_path: Path):
    """Two workers loading one name at once: one of them is refused when it commits."""
    path = str(tmp_path / "r.json")
    one, two = (AdapterRegistry([], path, resolve=same) for _ in range(2))
    mine, theirs = one.reserve("x", "/adapters/x"), two.reserve("x", "/adapters/x")
    one.commit(mine)
    with pytest.raises(AdapterExists):
        two.commit(theirs)
    assert mine.id != theirs.id


def test_a_registry_file_of_another_configuration_is_started_afresh(tmp_path: Path):
    path = str(tmp_path / "r.json")
    old = AdapterRegistry(modules("a"), path, resolve=same)
    old.commit(old.reserve("runtime", "/adapters/runtime"))
    new = AdapterRegistry(modules("b"), path, resolve=same)
    assert [(a.name, a.id) for a in new.adapters()] == [("b", 1)]
    # the same configuration (another worker starting) keeps what was loaded
    assert [a.name for a in AdapterRegistry(modules("b"), path, resolve=same).adapters()] == ["b"]
    assert json.loads(Path(path).read_text())["next_id"] == 2


def _load_many(path: str, prefix: str, count: int) -> None:
    registry = AdapterRegistry(modules("a"), path, resolve=same)
    for i in range(count):
        registry.commit(registry.reserve(f"{prefix}{i}", f"/adapters/{prefix}{i}"))


def test_processes_loading_at_once_get_distinct_ids(tmp_path: Path):
    """The file lock: four processes loading 10 adapters each end with 41 adapters, 41 ids."""
    path = str(tmp_path / "r.json")
    AdapterRegistry(modules("a"), path, resolve=same)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_load_many, args=(path, f"p{n}-", 10)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    adapters = AdapterRegistry(modules("a"), path, resolve=same).adapters()
    assert len(adapters) == 41 and len({a.id for a in adapters}) == 41


# --- the front tier ------------------------------------------------------------------------------------


class LoraFront(Front):
    """The front's request path, with the adapter view PromptService keeps and refreshes."""

    def __init__(self, gpu_url: str) -> None:
        super().__init__(gpu_url)
        attach_lora_routes()
        self.serving = OpenAIServing(self.generation, model_name="fake", refresh_models=self._refresh)
        openai_app.state.serving = self.serving
        self.door = BearerAuthMiddleware(self.admission, keys=[API_KEY])

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await super().__call__(scope, receive, send)
        await self.door(scope, receive, send)

    async def _learn(self) -> None:
        await super()._learn()
        await self._refresh()

    async def _refresh(self) -> None:
        self.serving.use_engine(await self.client.model_info())


@pytest.fixture(scope="module")
def gpu():
    with served_gpu_tier(FakeGpuTier(adapters=[AdapterInfo(name="a", path="/adapters/a", parent="fake")])) as fake:
        yield fake


@pytest.fixture(scope="module")
def http(gpu):
    with served_front(LoraFront(gpu.url)) as server:
        try:
            with httpx.Client(base_url=server.url, timeout=15, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
                yield client
        finally:
            openai_app.state.serving = None  # as before any front was built (test_openai_protocol's 503)


def chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_models_lists_each_adapter_with_the_base_model_as_parent(http):
    cards = http.get("/v1/models").json()["data"]
    assert [(c["id"], c["parent"], c["root"]) for c in cards][1:] == [("a", "fake", "/adapters/a")]
    assert cards[0]["id"] == "fake" and cards[0]["parent"] is None


def test_the_model_field_picks_the_adapter(http, gpu):
    """The adapter's name goes to the GPU tier with the token ids; the base model's name sends none;
    the answer names the model asked for."""
    for model, expected in (("a", "a"), ("fake", None)):
        response = http.post("/v1/chat/completions", json=chat(model))
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model
        assert gpu.adapter_of[gpu.started[-1]] == expected
    response = http.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 200 and gpu.adapter_of[gpu.started[-1]] == "a"


def test_an_unknown_model_is_vllms_404_and_reaches_no_engine(http, gpu):
    started = len(gpu.started)
    for path, body in (("/v1/chat/completions", chat("nope")),
                       ("/v1/completions", {"model": "nope", "prompt": "hi", "max_tokens": 2})):
        response = http.post(path, json=body)
        assert response.status_code == 404
        assert response.json() == {"error": {"message": "The model `nope` does not exist. Valid aliases: fake.",
                                             "type": "NotFoundError", "param": "model", "code": 404}}
    assert len(gpu.started) == started


def test_requests_per_adapter_are_counted(http):
    before = REGISTRY.get_sample_value("pipeline_lora_requests_total", {"adapter": "a"}) or 0.0
    tokens = REGISTRY.get_sample_value("pipeline_lora_completion_tokens_total", {"adapter": "a"}) or 0.0
    assert http.post("/v1/chat/completions", json=chat("a")).status_code == 200
    assert REGISTRY.get_sample_value("pipeline_lora_requests_total", {"adapter": "a"}) == before + 1
    assert REGISTRY.get_sample_value("pipeline_lora_completion_tokens_total", {"adapter": "a"}) == tokens + 3


def test_load_and_unload_go_to_the_gpu_tier_and_change_what_is_served(http, gpu):
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "/adapters/b"})
    assert (response.status_code, response.text) == (200, "Success: LoRA adapter 'b' added successfully.")
    assert "b" in [card["id"] for card in http.get("/v1/models").json()["data"]]
    assert http.post("/v1/chat/completions", json=chat("b")).status_code == 200
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "/adapters/b"})
    assert again.status_code == 400 and again.json()["error"]["type"] == "InvalidUserInput"
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
    assert http.post("/v1/chat/completions", json=chat("b")).status_code == 404
    gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "NotFoundError"


def test_an_adapter_loaded_through_another_worker_is_found(http, gpu):
    """Not in this worker's view yet: it asks the GPU tier again before answering 404."""
    gpu.adapters.append(AdapterInfo(name="elsewhere", path="/adapters/elsewhere", parent="fake"))
    try:
        assert http.post("/v1/chat/completions", json=chat("elsewhere")).status_code == 200
    finally:
        gpu.adapters.pop()


def test_models_lists_an_adapter_loaded_through_another_worker(http, gpu):
    gpu.adapters.append(AdapterInfo(name="listed", path="/adapters/listed", parent="fake"))
    try:
        assert "listed" in [card["id"] for card in http.get("/v1/models").json()["data"]]
    finally:
        gpu.adapters.pop()
    assert "listed" not in [card["id"] for card in http.get("/v1/models").json()["data"]]


def test_an_adapter_unloaded_through_another_worker_is_a_404(http, gpu):
    """Still in this worker's view: the GPU tier's 404 comes back as vLLM's unknown-model answer."""
    gpu.adapters.append(AdapterInfo(name="going", path="/adapters/going", parent="fake"))
    assert http.post("/v1/chat/completions", json=chat("going")).status_code == 200
    gpu.adapters.pop()
    response = http.post("/v1/chat/completions", json=chat("going"))
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    assert "going" not in [card["id"] for card in http.get("/v1/models").json()["data"]]


def test_loading_and_unloading_need_the_api_key(http):
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "/adapters/c"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "a"})):
        assert http.post(path, json=body, headers={"Authorization": ""}).status_code == 401
    assert "a" in [card["id"] for card in http.get("/v1/models").json()["data"]]
