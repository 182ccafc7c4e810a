"""`bertkit serve`: answers, batches concurrent requests into one forward, refuses bad and oversize requests with
4xx, answers 503 when its queue is full, survives random bodies, and finishes requests in flight on SIGTERM."""

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from bertkit import (BertConfig, BertForMultipleChoice, BertForQuestionAnswering, BertForTokenClassification,
                     BertkitError)
from bertkit.serve import ServeConfig, create_app
from tiny_folders import WORDS, save_tiny

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"classifier": save_tiny(root / "classifier"), "regressor": save_tiny(root / "regressor", num_labels=1),
            "qa": save_tiny(root / "qa", BertForQuestionAnswering)}


def served(model_dir, test, **settings):
    """Run `test(client, app)` (a coroutine function) against the app in this process, lifespan included."""
    config = ServeConfig(model_dir=model_dir, **settings)
    app = create_app(config)

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bertkit", timeout=60) as client:
                return await test(client, app)

    return asyncio.run(main())


def test_server_labels_texts_and_pairs_as_predict_does(folders):
    from bertkit.tasks.evaluation import predict

    texts = ["the movie was good", "an awful boring film", "it is not very fun"]

    async def test(client, app):
        one = await client.post("/predict", json={"inputs": texts[0]})
        many = await client.post("/predict", json={"inputs": texts})
        pairs = await client.post("/predict", json={"inputs": [{"text": "good", "pair": "bad"}, texts[1],
                                                               {"text": "fun film"}]})
        return one, many, pairs

    one, many, pairs = served(folders["classifier"], test)
    assert one.status_code == many.status_code == pairs.status_code == 200
    expected = predict(folders["classifier"], texts)
    got = many.json()["predictions"]
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    assert all(r["label"] in ("neg", "pos") for r in got)
    for g, e in zip(got, expected):
        assert abs(g["probability"] - e["probability"]) < 1e-5
    # a text alone runs unpadded, in a batch its attention is re-padded to whole blocks of 16 (the CPU kernel's
    # fast path): the same answer up to float rounding
    same = lambda a, b: a["label"] == b["label"] and abs(a["probability"] - b["probability"]) < 1e-6
    (alone,) = one.json()["predictions"]
    assert same(alone, got[0])
    mixed = pairs.json()["predictions"]
    assert len(mixed) == 3 and same(mixed[1], got[1])
    assert abs(mixed[0]["probability"] - predict(folders["classifier"], ["good\tbad"])[0]["probability"]) < 1e-5


def test_server_scores_regression_and_answers_questions(folders):
    async def score(client, app):
        return await client.post("/predict", json={"inputs": ["good film", "bad"]})

    response = served(folders["regressor"], score)
    assert response.status_code == 200
    scores = response.json()["predictions"]
    assert [set(r) for r in scores] == [{"score"}, {"score"}] and scores[0] != scores[1]

    context = "the treaty was signed in the film by the company and the profit rose"
    async def answer(client, app):
        return await client.post("/predict", json={"inputs": [
            {"question": "who signed the treaty", "context": context, "id": "q1"},
            {"question": "what rose", "context": context}]})

    response = served(folders["qa"], answer)
    assert response.status_code == 200
    answers = response.json()["predictions"]
    assert answers[0]["id"] == "q1" and "id" not in answers[1]
    assert all(r["answer"] and r["answer"] in context for r in answers)


def test_server_gives_a_multi_label_models_labels_as_predict_does(folders, tmp_path):
    from bertkit import BertForSequenceClassification, Tokenizer
    from bertkit.tasks.evaluation import predict

    three = save_tiny(tmp_path / "three", num_labels=3)
    model = BertForSequenceClassification.from_pretrained(three, id2label={0: "a", 1: "b", 2: "c"},
                                                          problem_type="multi_label_classification")
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1)  # probabilities on both sides of 0.5
    model.save_pretrained(tmp_path / "multi", tokenizer=Tokenizer.from_pretrained(three))
    texts = ["the movie was good", "an awful boring film", "it is not very fun", "who signed the treaty"]

    async def test(client, app):
        return await client.get("/metadata"), await client.post("/predict", json={"inputs": texts})

    metadata, response = served(str(tmp_path / "multi"), test)
    assert metadata.json()["kind"] == "multi-label" and metadata.json()["labels"] == ["a", "b", "c"]
    got, expected = response.json()["predictions"], predict(tmp_path / "multi", texts)
    assert [r["labels"] for r in got] == [r["labels"] for r in expected]
    assert len({tuple(r["labels"]) for r in got}) > 1
    for g, e in zip(got, expected):
        assert set(g) == {"labels", "probabilities"} and list(g["probabilities"]) == ["a", "b", "c"]
        assert max(abs(g["probabilities"][k] - e["probabilities"][k]) for k in "abc") < 1e-5


def test_server_tags_words_as_predict_does(tmp_path):
    from bertkit.tasks.evaluation import predict

    folder = save_tiny(tmp_path / "tagger", BertForTokenClassification)
    config = BertConfig.load(folder)
    config.id2label = {0: "O", 1: "B-PER"}
    config.save(folder)
    texts = ["the movie, was good", "an awful boring film"]

    async def test(client, app):
        tagged = await client.post("/predict", json={"inputs": [texts[0], {"text": texts[1]}]})
        pair = await client.post("/predict", json={"inputs": [{"text": "good", "pair": "bad"}]})
        return tagged, pair, (await client.get("/metadata")).json()

    tagged, pair, metadata = served(folder, test)
    assert tagged.status_code == 200 and metadata["kind"] == "tagging" and metadata["labels"] == ["O", "B-PER"]
    expected = [{k: v for k, v in r.items() if k != "text"} for r in predict(folder, texts)]
    assert tagged.json()["predictions"] == expected
    assert expected[0]["words"] == ["the", "movie", ",", "was", "good"] and len(expected[0]["tags"]) == 5
    assert pair.status_code == 422 and '"pair"' in pair.json()["error"]


def test_server_chooses_endings_as_predict_does(tmp_path):
    from bertkit.tasks.evaluation import predict

    folder = save_tiny(tmp_path / "choice", BertForMultipleChoice)
    inputs = [{"context": "the movie was", "endings": ["good", "bad", "not fun"]},
              {"context": "it", "lead": "was", "endings": ["fun", "awful"]}]

    async def test(client, app):
        chosen = await client.post("/predict", json={"inputs": inputs})
        bad = await client.post("/predict", json={"inputs": [{"context": "a", "endings": ["only one"]}]})
        text = await client.post("/predict", json={"inputs": "a text"})
        return chosen, bad, text, (await client.get("/metadata")).json()

    chosen, bad, text, metadata = served(folder, test)
    assert chosen.status_code == 200 and metadata["kind"] == "multiple-choice"
    expected = [{k: v for k, v in r.items() if k != "context"} for r in predict(folder, map(json.dumps, inputs))]
    assert chosen.json()["predictions"] == expected and [len(r["probabilities"]) for r in expected] == [3, 2]
    assert bad.status_code == 422 and "inputs[0].endings is an array of 1; expected an array of two or more" in \
        bad.json()["error"]
    assert text.status_code == 422 and "inputs is a string; expected an object" in text.json()["error"]


def test_health_and_metadata(folders):
    async def test(client, app):
        return (await client.get("/health")).json(), (await client.get("/metadata")).json()

    health, metadata = served(folders["classifier"], test, max_batch_size=8, int8=True)
    assert health == {"status": "ok", "queued": 0, "batches": 0, "inputs": 0}
    assert metadata["kind"] == "classification" and metadata["labels"] == ["neg", "pos"]
    assert metadata["int8"] is True and metadata["max_length"] == 128 and metadata["limits"]["max_batch_size"] == 8


def test_two_concurrent_requests_share_one_forward(folders):
    async def test(client, app):
        forwards = []
        app.state.predictor.model.register_forward_hook(
            lambda module, args, kwargs, out: forwards.append(kwargs["input_ids"].shape), with_kwargs=True)
        first, second = await asyncio.gather(client.post("/predict", json={"inputs": "the movie was good"}),
                                             client.post("/predict", json={"inputs": ["bad", "awful film"]}))
        return first, second, forwards, (await client.get("/health")).json()

    first, second, forwards, health = served(folders["classifier"], test, max_wait_ms=2000)
    assert first.status_code == second.status_code == 200
    assert len(second.json()["predictions"]) == 2
    assert len(forwards) == 1 and forwards[0][0] == 3  # one forward pass over the three inputs
    assert health["batches"] == 1 and health["inputs"] == 3


def test_a_full_batch_runs_without_waiting(folders):
    async def test(client, app):  # a 10-minute wait would time out here
        return await asyncio.wait_for(client.post("/predict", json={"inputs": ["good"] * 4}), timeout=60)

    response = served(folders["classifier"], test, max_batch_size=4, max_wait_ms=600_000)
    assert response.status_code == 200 and len(response.json()["predictions"]) == 4


BAD_REQUESTS = [
    # (body, headers, status, what the error says)
    (b"{not json", {}, 400, "not valid JSON"),
    (b"\xff\xfe\x00", {}, 400, "not valid JSON"),
    (b"[" * 100_000, {}, 400, "nested too deeply"),
    (b'{"inputs": 1' + b"0" * 5000 + b"}", {}, 400, "not valid JSON"),
    (b"[1, 2]", {}, 422, "the body is an array; expected an object"),
    (b"{}", {}, 422, 'the body has no "inputs"'),
    (b'{"inputs": "a", "x": 1}', {}, 422, 'the body has field "x"; expected only "inputs"'),
    (b'{"inputs": []}', {}, 422, "empty array"),
    (b'{"inputs": ["ok", 5]}', {}, 422, "inputs[1] is a number; expected a string"),
    (b'{"inputs": [null]}', {}, 422, "inputs[0] is null"),
    (b'{"inputs": ["   "]}', {}, 422, "inputs[0] is blank"),
    (b'{"inputs": {"text": ["a"]}}', {}, 422, "inputs.text is an array; expected a string"),
    (b'{"inputs": {"pair": "a"}}', {}, 422, 'inputs has no "text"'),
    (b'{"inputs": [{"text": "a", "label": 1}]}', {}, 422, 'inputs[0] has field "label"'),
    (b'{"inputs": NaN}', {}, 422, "inputs is a number"),
    (json.dumps({"inputs": ["good"] * 9}).encode(), {}, 413, "9 inputs; expected at most 8"),
    (json.dumps({"inputs": "a" * 101}).encode(), {}, 413, "inputs has 101 characters; expected at most 100"),
    (json.dumps({"inputs": {"text": "a", "pair": "b" * 101}}).encode(), {}, 413, "inputs.pair has 101 characters"),
    (b'{"inputs": "' + b"a" * 300_000 + b'"}', {}, 413, "the body has 300,014 bytes; expected at most 200,000"),
    (b'{"inputs": "a"}', {"content-length": "99999999"}, 413, "the body has 99,999,999 bytes"),
    (b'{"inputs": "' + b"a" * 300_000 + b'"}', {"chunked": True}, 413, "the body is over 200,000 bytes"),
]


def test_oversize_and_malformed_requests_are_refused_with_4xx(folders):
    async def test(client, app):
        results = []
        for body, headers, _, _ in BAD_REQUESTS:
            if "content-length" in headers:  # a header that lies: sent raw, as httpx would correct it
                request = client.build_request("POST", "/predict", content=body)
                request.headers["content-length"] = headers["content-length"]
                results.append(await client.send(request))
            elif "chunked" in headers:  # no Content-Length: the limit holds while reading

                async def chunks(body=body):
                    for start in range(0, len(body), 10_000):
                        yield body[start:start + 10_000]

                results.append(await client.post("/predict", content=chunks()))
            else:
                results.append(await client.post("/predict", content=body))
        return results

    responses = served(folders["classifier"], test, max_inputs=8, max_text_chars=100, max_body_bytes=200_000)
    for (body, _, status, message), response in zip(BAD_REQUESTS, responses):
        assert response.status_code == status, (body[:60], response.text)
        error = response.json()["error"]
        assert message in error and "\n" not in error, (body[:60], error)


def test_a_client_that_leaves_before_its_body_is_sent_is_a_request_error():
    """A client that closed the connection mid-body left "Exception in ASGI application" and a starlette
    ClientDisconnect traceback in the server's log; it is now refused like any other bad request."""
    from starlette.requests import Request

    from bertkit.serve import RequestError, read_body

    async def receive():
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-length", b"100")]},
                      receive)
    with pytest.raises(RequestError) as refused:
        asyncio.run(read_body(request, 1000, 5.0))
    assert refused.value.status == 400 and "closed the connection after 0 bytes" in refused.value.message


def test_qa_requests_are_checked(folders):
    async def test(client, app):
        return [await client.post("/predict", json=body) for body in (
            {"inputs": "just a text"}, {"inputs": {"question": "who"}}, {"inputs": {"question": "a", "context": "b",
                                                                                  "id": [1]}})]

    responses = served(folders["qa"], test)
    assert [r.status_code for r in responses] == [422, 422, 422]
    assert "expected an object" in responses[0].json()["error"]
    assert 'no "context"' in responses[1].json()["error"]
    assert "inputs.id is an array" in responses[2].json()["error"]


def test_a_qa_id_with_a_lone_surrogate_is_echoed_not_a_500(folders):
    """A JSON-escaped lone surrogate in "id" was echoed as itself: the response could not be encoded (500)."""
    async def test(client, app):
        return await client.post("/predict", content=b'{"inputs": {"question": "who", "context": "the company '
                                                      b'signed", "id": "q\\ud800"}}')

    response = served(folders["qa"], test)
    assert response.status_code == 200 and response.json()["predictions"][0]["id"] == "q\ufffd"


def test_a_question_that_leaves_no_room_for_context_is_refused_alone(folders):
    """Served at a short --max-length, a long question failed the whole batch: every client sharing it got 500."""
    long_question = " ".join(WORDS[:30])

    async def test(client, app):
        return await asyncio.gather(
            client.post("/predict", json={"inputs": {"question": "who", "context": "the company signed"}}),
            client.post("/predict", json={"inputs": {"question": long_question, "context": "the company"}}))

    good, bad = served(folders["qa"], test, max_length=24, max_wait_ms=2000)
    assert good.status_code == 200 and "answer" in good.json()["predictions"][0]
    assert bad.status_code == 422 and "leaves no room for the context" in bad.json()["error"]


def test_a_pair_for_a_model_with_one_segment_embedding_is_refused_with_422(tmp_path):
    """Refused on arrival, so it cannot fail the batch it would share with other clients' single texts."""
    from bertkit import BertForSequenceClassification, BertkitError
    from tiny_folders import tiny_config, tokenizer_in

    tokenizer = tokenizer_in(tmp_path)
    config = tiny_config(tokenizer.vocab_size, type_vocab_size=1, id2label={0: "neg", 1: "pos"})
    BertForSequenceClassification(config).save_pretrained(tmp_path, tokenizer=tokenizer)

    async def test(client, app):
        return [await client.post("/predict", json={"inputs": inputs}) for inputs in (
            ["good film", {"text": "bad"}], [{"text": "good", "pair": "film"}])]

    single, pair = served(str(tmp_path), test)
    assert single.status_code == 200 and len(single.json()["predictions"]) == 2
    assert pair.status_code == 422 and "one segment embedding" in pair.json()["error"]
    config = tiny_config(tokenizer.vocab_size, type_vocab_size=1)
    BertForQuestionAnswering(config).save_pretrained(tmp_path / "qa", tokenizer=tokenizer)
    with pytest.raises(BertkitError, match="type_vocab_size 1 for question answering; expected 2"):
        create_app(ServeConfig(model_dir=str(tmp_path / "qa")))


def test_overload_answers_503_and_serves_what_it_accepted(folders):
    release = threading.Event()

    async def test(client, app):
        run = app.state.predictor.run

        def slow_run(examples):  # holds the first batch until six requests have arrived
            release.wait(30)
            return run(examples)

        app.state.batcher.run = slow_run
        tasks = [asyncio.create_task(client.post("/predict", json={"inputs": f"text {i}"})) for i in range(6)]
        while sum(t.done() for t in tasks) < 3:  # the ones the queue cannot hold are answered at once
            await asyncio.sleep(0.01)
        release.set()
        return await asyncio.gather(*tasks)

    responses = served(folders["classifier"], test, max_batch_size=1, max_queue=2, max_inputs=1, max_wait_ms=0)
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(503) >= 3 and statuses.count(200) >= 2 and set(statuses) == {200, 503}
    refused = [r for r in responses if r.status_code == 503][0].json()["error"]
    assert refused.startswith("the queue is full") and "retry later" in refused


def random_json(rng, depth=0):
    kinds = ["str", "int", "float", "bool", "null", "list", "dict"] if depth < 4 else ["str", "int", "null"]
    kind = rng.choice(kinds)
    if kind == "str":
        return random_text(rng)
    if kind == "int":
        return rng.choice([0, -1, 2**63, rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.5, float("nan"), float("inf"), -1e308])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["inputs", "text", "pair", "question", "context", "id", random_text(rng)]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def random_text(rng):
    pieces = [rng.choice(WORDS), " ", "\ud800", "\x00", "\u2028", "é", "🙂", "\t", "\n", "[SEP]", "#"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))


def random_body(rng) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    if kind == 1:
        valid = json.dumps({"inputs": [random_text(rng) for _ in range(3)]}).encode()
        return valid[: rng.randint(0, len(valid))]
    if kind == 2:
        return json.dumps(random_json(rng)).encode()
    if kind == 3:
        return json.dumps({"inputs": random_json(rng)}).encode()
    if kind == 4:
        return json.dumps({"inputs": [random_json(rng) for _ in range(rng.randint(1, 12))]}).encode()
    if kind == 5:
        return json.dumps({"inputs": [" ".join(rng.choices(WORDS, k=rng.randint(1, 30))) for _ in range(rng.randint(1, 5))]}).encode()
    if kind == 6:
        return rng.choice([b"[", b"{\"inputs\":["]) * rng.randint(1, 5000)
    return json.dumps({"inputs": [{"text": random_text(rng) * rng.randint(1, 50), "pair": random_text(rng)}]}).encode()


def test_server_survives_a_fuzz_of_1000_random_bodies(folders):
    rng = random.Random(0)
    bodies = [random_body(rng) for _ in range(1000)]

    async def test(client, app):
        responses = [await client.post("/predict", content=body) for body in bodies]
        after = await client.post("/predict", json={"inputs": ["the movie was good"]})
        return responses, after, (await client.get("/health")).json()

    responses, after, health = served(folders["classifier"], test, max_wait_ms=0, max_inputs=10, max_text_chars=200)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 400, 413, 422}, sorted(set(statuses))
    assert statuses.count(200) >= 100 and statuses.count(400) >= 100 and statuses.count(422) >= 100
    for body, response in zip(bodies, responses):
        payload = response.json()
        if response.status_code == 200:
            inputs = json.loads(body)["inputs"]
            assert len(payload["predictions"]) == (len(inputs) if isinstance(inputs, list) else 1)
        else:
            assert isinstance(payload["error"], str) and "\n" not in payload["error"]
    assert after.status_code == 200 and health["status"] == "ok" and health["queued"] == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *flags) -> tuple[subprocess.Popen, str]:
    """The real command, `bertkit serve` on loopback, once it answers /health: the process and its address."""
    server = subprocess.Popen([sys.executable, "-m", "bertkit.cli", "serve", model_dir, "--port", "0", "--threads", "1",
                               *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = server.stdout.readline()  # printed once the socket is bound and the model loaded
    assert "http://127.0.0.1:" in line, line + server.stderr.read()
    url = line.split()[line.split().index("on") + 1]
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return server, url
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not answer /health within 60 s"
            time.sleep(0.1)


def test_sigterm_finishes_the_requests_in_flight(folders):
    """The real command: `bertkit serve` on loopback; a request waiting in a batch when SIGTERM arrives is still
    answered, then the process exits 0."""
    server, url = start_server(folders["classifier"], "--max-wait-ms", "1500")
    try:
        result = {}
        client = threading.Thread(target=lambda: result.update(
            response=httpx.post(f"{url}/predict", json={"inputs": ["good", "bad"]}, timeout=30)))
        client.start()
        time.sleep(0.5)  # the request now waits in its batch (1.5 s)
        server.send_signal(signal.SIGTERM)
        client.join(30)
        assert result["response"].status_code == 200 and len(result["response"].json()["predictions"]) == 2
        assert server.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_request_cut_off_by_the_shutdown_timeout_is_answered_503_in_json(folders):
    """A request still waiting when --shutdown-timeout runs out is cancelled by uvicorn: it was answered a plain-text
    500 "Internal Server Error", with a traceback in the log; it is now a 503 in the JSON shape of every refusal."""
    server, url = start_server(folders["classifier"], "--max-wait-ms", "5000", "--shutdown-timeout", "0.5")
    try:
        result = {}
        client = threading.Thread(target=lambda: result.update(
            response=httpx.post(f"{url}/predict", json={"inputs": ["good", "bad"]}, timeout=30)))
        client.start()
        time.sleep(0.5)  # the request now waits in its batch (5 s), past the shutdown timeout
        server.send_signal(signal.SIGTERM)
        client.join(30)
        assert result["response"].status_code == 503
        assert "did not finish within --shutdown-timeout 0.5 s" in result["response"].json()["error"]
        assert server.wait(30) == 0
        assert "Traceback" not in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_command_line_errors(folders, capsys):
    from bertkit.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", folders["classifier"], "--port", str(port)]) == 2
        assert f"127.0.0.1:{port}: cannot listen" in capsys.readouterr().err
    assert main(["serve", "/nonexistent/model"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["serve", folders["classifier"], "--max-inputs", "10", "--max-queue", "5"]) == 2
    error = capsys.readouterr().err
    assert "--max-inputs 10 is more than --max-queue 5" in error and error.count("\n") == 1


def test_a_body_timeout_of_zero_is_refused_before_serving(folders):
    """--body-timeout 0 passed the check, and the server then answered every request 408 (no body arrives in 0 s)."""
    with pytest.raises(BertkitError, match="--body-timeout is 0; expected a positive number"):
        ServeConfig(model_dir=folders["classifier"], body_timeout=0).check()
    ServeConfig(model_dir=folders["classifier"], body_timeout=0.5, max_wait_ms=0, shutdown_timeout=0).check()


def test_a_max_length_past_the_models_positions_is_refused_as_predict_refuses_it(folders):
    """It was served at the model's 128 positions while --max-length 1000 was asked for (the metadata said 128)."""
    from bertkit.serve import Predictor

    with pytest.raises(BertkitError, match="--max-length 1000 is more than the 128 positions of"):
        Predictor(folders["classifier"], max_length=1000)
    assert Predictor(folders["classifier"], max_length=128).config.max_length == 128


def test_served_connections_send_without_waiting_for_acks():
    """The connections asyncio (hence uvicorn) accepts on `listen`'s socket have TCP_NODELAY set: without it each
    answer on a kept-alive connection waited ~40 ms for the client's delayed ACK (16 requests/s instead of 68)."""
    from bertkit.serve import listen

    async def main():
        sock = listen("127.0.0.1", 0)
        flags = []

        def accepted(reader, writer):
            flags.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            for _ in range(100):
                if flags:
                    break
                await asyncio.sleep(0.01)
            writer.close()
        return flags

    assert asyncio.run(main()) == [1]


def test_a_client_may_connect_as_soon_as_the_address_is_known():
    """`listen` returns a listening socket: a connection made before the server runs waits instead of being
    refused (the address line is printed before uvicorn starts; the load benchmark failed on that race)."""
    from bertkit.serve import listen

    sock = listen("127.0.0.1", 0)
    try:
        with socket.create_connection(sock.getsockname()[:2], timeout=5):
            pass
    finally:
        sock.close()


def test_an_encoder_is_served_as_vectors_equal_to_bertkit_embed(minilm_dir):
    """all-MiniLM-L6-v2 (a BertModel folder, no head): each input's vector, as `bertkit embed` gives it, singles and
    pairs in one request; the metadata says what the vectors are."""
    from bertkit.tasks.embed import EmbedConfig, embed

    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]

    async def test(client, app):
        answer = await client.post("/predict", json={"inputs": [*texts, {"text": texts[0], "pair": texts[1]}]})
        return answer, (await client.get("/metadata")).json()

    answer, metadata = served(str(minilm_dir), test, normalize=True)
    assert answer.status_code == 200, answer.text
    vectors = [p["embedding"] for p in answer.json()["predictions"]]
    expected = embed(EmbedConfig(model_dir=str(minilm_dir), normalize=True), inputs=texts)
    expected += embed(EmbedConfig(model_dir=str(minilm_dir), normalize=True), inputs=[f"{texts[0]}\t{texts[1]}"])
    for got, want in zip(vectors, expected, strict=True):
        assert got == pytest.approx(want["embedding"].tolist(), abs=1e-6)
    assert metadata["kind"] == "embedding" and metadata["dimension"] == 384 and metadata["normalize"] is True
    assert metadata["max_length"] == 512 and metadata["pool"] == "mean"


def test_embed_serves_a_classifiers_encoder_cls_vectors(folders):
    from bertkit import BertModel, Tokenizer

    async def test(client, app):
        return await client.post("/predict", json={"inputs": ["the movie was good", "bad"]})

    answer = served(folders["classifier"], test, embed=True, pool="cls")
    encoder, tokenizer = BertModel.from_pretrained(folders["classifier"]).eval(), Tokenizer.from_pretrained(
        folders["classifier"])
    for text, prediction in zip(["the movie was good", "bad"], answer.json()["predictions"], strict=True):
        batch = tokenizer.encode_batch([text], return_tensors="pt")
        with torch.no_grad():
            cls = encoder(batch["input_ids"], batch["token_type_ids"]).last_hidden_state[0, 0]
        assert prediction["embedding"] == pytest.approx(cls.tolist(), abs=1e-5)


def test_a_pretraining_folder_fills_in_mask_as_predict_does(tmp_path):
    """A pretraining checkpoint is served filling in [MASK] (its vectors with --embed); an input without a mask is
    refused with 422 naming it."""
    from bertkit import BertForPreTraining
    from bertkit.tasks.evaluation import predict

    folder = save_tiny(tmp_path / "pretraining", BertForPreTraining)
    texts = ["the movie was [MASK]", "the [MASK] signed the [MASK] ."]

    async def test(client, app):
        answer = await client.post("/predict", json={"inputs": [texts[0], {"text": texts[1], "pair": "it [MASK]"}]})
        refused = await client.post("/predict", json={"inputs": ["good", "no mask here"]})
        return answer, refused, (await client.get("/metadata")).json()

    answer, refused, metadata = served(folder, test, top_k=3)
    assert answer.status_code == 200, answer.text
    expected = [predict(folder, [line], top_k=3, threads=1)[0] for line in (texts[0], f"{texts[1]}\tit [MASK]")]
    for got, want in zip(answer.json()["predictions"], expected, strict=True):
        assert got["filled"] == want["filled"] and len(got["masks"]) == len(want["masks"])
        for mine, theirs in zip(got["masks"], want["masks"]):
            assert [c["token"] for c in mine] == [c["token"] for c in theirs] and len(mine) == 3
            assert [c["probability"] for c in mine] == pytest.approx([c["probability"] for c in theirs], abs=1e-6)
    assert refused.status_code == 422 and "inputs[0] has no [MASK]" in refused.json()["error"]
    assert metadata["kind"] == "fill-mask" and "[MASK]" in metadata["input"]

    async def vectors(client, app):
        return (await client.post("/predict", json={"inputs": ["the movie was good"]})).json()

    assert "embedding" in served(folder, vectors, embed=True)["predictions"][0]
