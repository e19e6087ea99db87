"""Every endpoint captured right, end to end: the official openai client → a real mitmproxy running
keyrotor → fake OpenAI upstreams that answer each endpoint as OpenAI does."""

from __future__ import annotations

import html
import json
import re
import sqlite3
from collections.abc import Iterator

import httpx
import openai
import pytest

from core.prices import load_prices
from tests.conftest import ADMIN_KEY, ROOT, Keyrotor, stored_flows, wait_for
from tests.fake_upstream import AUDIO_BYTES_PER_SECOND, REASONING_TOKENS, FakeUpstream, speech_bytes

GOOD = ["sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-bbbbbbbbbbbbbbbbbbbbbbbbbbbb0002"]
AUDIO_KEY = "sk-good-audio-ccccccccccccccccccccc0003"
PRICES = load_prices(ROOT / "prices.toml")
# Audio the way a file holds it: a WAV header, then samples that are no text in any encoding.
WAV = b"RIFF\x24\x00\x01\x00WAVEfmt " + bytes(range(256)) * 250


def rows(kr: Keyrotor) -> list[dict]:
    """Every flow as storage's readers get it (headers and bodies unpacked), oldest first."""
    return stored_flows(kr.db_path)


def wait_rows(kr: Keyrotor, count: int) -> list[sqlite3.Row]:
    return wait_for(lambda: len(r := rows(kr)) >= count and r, what=f"{count} captured rows")


@pytest.fixture
def running(keyrotor: Keyrotor) -> Iterator[tuple[Keyrotor, openai.OpenAI]]:
    client_key = keyrotor.start_serving(*GOOD)
    yield keyrotor, openai.OpenAI(base_url=keyrotor.base_url, api_key=client_key, max_retries=0, timeout=20)


def test_a_responses_stream_has_its_tokens_cost_and_reassembled_text(running, upstream: FakeUpstream):
    kr, client = running
    kr.start_ui()
    upstream.stream_chunks = 4
    events = list(
        client.responses.create(model="gpt-5-mini", input="Stream me a reply", instructions="Be brief.", stream=True)
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    usage = events[-1].response.usage
    assert events[-1].type == "response.completed" and text.startswith("Hello from the fake upstream.")
    assert usage.input_tokens_details.cached_tokens == 2 and usage.output_tokens_details.reasoning_tokens == 4
    sent = json.loads(upstream.received[-1].body)
    assert "stream_options" not in sent  # the usage chunk injection is for chat completions only

    (row,) = wait_rows(kr, 1)
    assert (row["path"], row["model"], row["stream"], row["status"]) == ("/v1/responses", "gpt-5-mini", 1, 200)
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        usage.input_tokens,
        usage.output_tokens,
        usage.total_tokens,
    )
    assert (row["cached_tokens"], row["reasoning_tokens"]) == (2, REASONING_TOKENS)
    price = PRICES.price_of("gpt-5-mini")
    expected = (
        (usage.input_tokens - 2) * price.input + 2 * price.cached_input + usage.output_tokens * price.output
    ) / 1e6
    assert row["cost"] == pytest.approx(expected)

    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    detail = httpx.get(f"{kr.ui_url}/api/flows/{row['id']}", headers=admin).json()
    assert detail["streamed_text"] == text
    kinds = [e["type"] for e in detail["events"]]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 4
    page = httpx.get(f"{kr.ui_url}/flows/{row['id']}", headers=admin).text
    shown = re.search(r'<pre class="body streamed-text">(.*?)</pre>', page, re.S)
    assert shown and html.unescape(shown.group(1)) == text
    assert page.count('<td class="event-type">response.output_text.delta</td>') == 4


def test_a_plain_response_completion_and_embedding_are_priced_from_their_usage(running, upstream: FakeUpstream):
    kr, client = running
    answer = client.responses.create(model="gpt-4o-mini", input=[{"role": "user", "content": "Plain one"}])
    completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say this is a test")
    embedding = client.embeddings.create(model="text-embedding-3-small", input="embed these four words")
    moderation = client.moderations.create(model="omni-moderation-latest", input="hello")
    assert answer.output_text and completion.choices[0].text and embedding.data and not moderation.results[0].flagged
    by_path = {r["path"]: r for r in wait_rows(kr, 4)}
    usages = {
        "/v1/responses": (answer.usage.input_tokens, answer.usage.output_tokens, "gpt-4o-mini"),
        "/v1/completions": (
            completion.usage.prompt_tokens,
            completion.usage.completion_tokens,
            "gpt-3.5-turbo-instruct",
        ),
        "/v1/embeddings": (embedding.usage.prompt_tokens, None, "text-embedding-3-small"),
    }
    for path, (prompt, completion_tokens, model) in usages.items():
        row = by_path[path]
        assert (row["model"], row["prompt_tokens"], row["completion_tokens"]) == (model, prompt, completion_tokens)
        assert row["cost"] == pytest.approx(PRICES.cost(model, prompt, completion_tokens)), path
    moderated = by_path["/v1/moderations"]
    assert moderated["model"] == "omni-moderation-latest" and moderated["total_tokens"] is None  # it carries none
    assert moderated["cost"] is None and '"flagged": false' in moderated["response_body"]


def test_speech_is_stored_as_bytes_and_served_as_a_download_to_the_admin_only(running, upstream: FakeUpstream):
    kr, client = running
    kr.start_ui()
    spoken = "Read this sentence aloud, please."
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input=spoken)
    assert audio.content == speech_bytes(spoken)
    (row,) = wait_rows(kr, 1)
    assert row["response_body"] is None and row["response_body_size"] == len(audio.content)
    assert (row["response_body_type"], row["response_body_bytes"]) == ("audio/mpeg", audio.content)
    assert row["cost"] == pytest.approx(len(spoken) * 15.00 / 1e6)  # tts-1: by the character

    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    detail = httpx.get(f"{kr.ui_url}/api/flows/{row['id']}", headers=admin).json()
    link = f"/flows/{row['id']}/download/response"
    assert detail["response_body_download"] == link and "response_body_bytes" not in detail
    assert detail["response_body_type"] == "audio/mpeg" and detail["response_body_kept_bytes"] == len(audio.content)
    page = httpx.get(f"{kr.ui_url}/flows/{row['id']}", headers=admin).text
    assert f'<a href="{link}" download>download</a>' in page and "Binary body: audio/mpeg" in page
    download = httpx.get(kr.ui_url + link, headers=admin)
    assert download.status_code == 200 and download.content == audio.content
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.headers["content-disposition"] == f'attachment; filename="flow-{row["id"]}-response.mp3"'
    assert download.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(kr.ui_url + link).status_code == 401  # no admin credential, no audio
    assert httpx.get(f"{kr.ui_url}/flows/{row['id']}/download/request", headers=admin).status_code == 404


def test_images_are_priced_per_image_and_size_and_their_base64_is_not_kept_as_text(running, upstream: FakeUpstream):
    kr, client = running
    urls = client.images.generate(model="dall-e-3", prompt="a red fox", size="1024x1792", quality="hd", n=1)
    encoded = client.images.generate(model="gpt-image-1", prompt="a blue fox", n=2)
    assert urls.data[0].url and len(encoded.data) == 2
    dalle, gpt_image = wait_rows(kr, 2)
    assert (dalle["model"], dalle["cost"]) == ("dall-e-3", pytest.approx(0.12))
    assert gpt_image["cost"] == pytest.approx(PRICES.cost("gpt-image-1", 3, 2 * 272))
    assert encoded.data[0].b64_json not in gpt_image["response_body"]
    assert gpt_image["response_body_type"] == "image/png"
    assert gpt_image["response_body_bytes"].startswith(b"\x89PNG")


@pytest.fixture
def audio_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream().start() as up:
        yield up


def test_a_transcription_is_routed_by_its_forms_model_and_no_audio_is_stored_as_text(
    keyrotor: Keyrotor, upstream: FakeUpstream, audio_upstream: FakeUpstream
):
    kr = keyrotor
    kr.add_keys(*GOOD)  # default/default: every model
    kr.add_upstream_serving("audio/whisper", audio_upstream.url + "/v1", "whisper-1", AUDIO_KEY)
    client_key = kr.add_client("alice")
    kr.start_proxy()
    client = openai.OpenAI(base_url=kr.base_url, api_key=client_key, max_retries=0, timeout=20)

    heard = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", WAV, "audio/wav"), language="en")
    tokens = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("talk.wav", WAV, "audio/wav"))
    translated = client.audio.translations.create(model="whisper-1", file=("rede.wav", WAV, "audio/wav"))
    assert str(len(WAV)) in heard.text and tokens.text and translated.text
    # The forms said whisper-1: the group that serves it; gpt-4o-transcribe: the group for every model.
    whisper_call, translation_call = audio_upstream.received
    assert (whisper_call.path, whisper_call.key) == ("/v1/audio/transcriptions", AUDIO_KEY)
    assert (translation_call.path, translation_call.key) == ("/v1/audio/translations", AUDIO_KEY)
    assert WAV in whisper_call.body  # the upload went up whole
    assert [(r.path, r.key in GOOD) for r in upstream.received] == [("/v1/audio/transcriptions", True)]

    whisper, by_tokens, translation = wait_rows(kr, 3)
    assert (whisper["model"], whisper["status"]) == ("whisper-1", 200)
    seconds = len(WAV) // AUDIO_BYTES_PER_SECOND
    assert whisper["cost"] == pytest.approx(seconds / 60 * 0.006)  # whisper-1: by the minute
    form = json.loads(whisper["request_body"])
    assert form["model"] == "whisper-1" and form["language"] == "en"
    assert form["file"] == {"filename": "speech.wav", "content_type": "audio/wav", "size": len(WAV)}
    assert "RIFF" not in whisper["request_body"] and "\ufffd" not in whisper["request_body"]
    assert (whisper["request_body_type"], whisper["request_body_bytes"]) == ("audio/wav", WAV)
    assert whisper["request_body_size"] > len(WAV)  # the whole form travelled
    assert by_tokens["model"] == "gpt-4o-transcribe" and by_tokens["total_tokens"] == tokens.usage.total_tokens
    audio_tokens = tokens.usage.input_token_details.audio_tokens
    price = PRICES.price_of("gpt-4o-transcribe")
    expected = (audio_tokens * price.audio_input + tokens.usage.output_tokens * price.output) / 1e6
    assert by_tokens["cost"] == pytest.approx(expected)  # audio tokens at the audio price
    assert translation["model"] == "whisper-1" and translation["cost"] == whisper["cost"]
    fts = sqlite3.connect(kr.db_path)
    try:  # the search index holds the form's fields, not the audio
        assert fts.execute("SELECT count(*) FROM flows_fts WHERE flows_fts MATCH 'RIFF'").fetchone()[0] == 0
        assert fts.execute("SELECT count(*) FROM flows_fts WHERE flows_fts MATCH 'speech'").fetchone()[0] == 1
    finally:
        fts.close()
