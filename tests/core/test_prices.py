"""Model prices: which entry a model name gets, what a request costs, and files refused with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ROOT
from core.metering import Usage
from core.prices import Price, PriceFileError, PriceTable, load_prices

TABLE = PriceTable(
    {
        "gpt-4o": Price(2.50, 10.00),
        "gpt-4o-mini": Price(0.15, 0.60),
        "gpt-4": Price(30.00, 60.00),
        "gpt-4-turbo": Price(10.00, 30.00),
        "o1": Price(15.00, 60.00),
        "text-embedding-3-small": Price(0.02, 0),
    }
)


@pytest.mark.parametrize(
    "model, entry",
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("o1-preview", "o1"),
        ("gpt-4omni", None),  # neither gpt-4 nor gpt-4o: a prefix must be followed by "-"
        ("gpt-4.5-preview", None),
        ("o1x", None),
        ("GPT-4o", None),
        ("ft:gpt-4o-mini:acme::abc123", None),
        ("my-azure-deployment", None),
        ("", None),
    ],
)
def test_a_model_gets_its_own_entry_or_the_longest_it_extends(model, entry):
    assert TABLE.price_of(model) == (TABLE.prices[entry] if entry else None)


@pytest.mark.parametrize(
    "model, prompt, completion, cost",
    [
        ("gpt-4o", 1_000_000, 1_000_000, 12.50),
        ("gpt-4o-2024-08-06", 1000, 500, 0.0075),
        ("gpt-4o-mini", 9, 2, (9 * 0.15 + 2 * 0.60) / 1e6),
        ("text-embedding-3-small", 5000, None, 0.0001),  # embeddings report prompt tokens only
        ("gpt-4", 0, 0, 0.0),
        ("gpt-4", None, 7, 7 * 60 / 1e6),
        ("gpt-4", None, None, None),  # no usage in the response: nothing to price
        ("unknown-model", 1000, 1000, None),  # counted in tokens only
        (None, 1000, 1000, None),  # no model in the request
        (["gpt-4o"], 1000, 1000, None),  # a request body with a non-string model
    ],
)
def test_cost_of_one_request(model, prompt, completion, cost):
    result = TABLE.cost(model, prompt, completion)
    assert result == (pytest.approx(cost) if cost is not None else None)


def test_an_empty_table_prices_nothing():
    assert PriceTable().cost("gpt-4o", 10, 10) is None


def test_the_shipped_file_prices_the_common_models():
    table = load_prices(ROOT / "prices.toml")
    for model in (
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "o1",
        "o1-mini",
        "o3",
        "o3-mini",
        "o4-mini",
        "gpt-4-turbo",
        "gpt-4",
        "gpt-3.5-turbo",
        "gpt-5",
        "gpt-5-mini",
        "gpt-5-nano",
        "text-embedding-3-small",
        "text-embedding-3-large",
        "text-embedding-ada-002",
    ):
        assert model in table.prices, model
    assert table.cost("gpt-4o-mini-2024-07-18", 1_000_000, 0) == pytest.approx(0.15)
    assert table.cost("gpt-4.1-2025-04-14", 0, 1_000_000) == pytest.approx(8.00)


def test_a_file_is_read_into_a_table(tmp_path: Path):
    path = tmp_path / "prices.toml"
    path.write_text('# mine\n["gpt-4.1"]\ninput = 2\noutput = 8.0\n\n["embed"]\ninput = 0.1\noutput = 0\n')
    assert load_prices(path).prices == {"gpt-4.1": Price(2.0, 8.0), "embed": Price(0.1, 0.0)}


@pytest.mark.parametrize(
    "content, words",
    [
        ('["x"]\ninput = 1\n', ['model "x"', 'lacks "output"']),
        ('["x"]\noutput = 1\n', ['model "x"', 'lacks "input"']),
        ('["x"]\ninput = 1\noutput = 2\ncached = 0.5\n', ['model "x"', 'unknown field "cached"']),
        ('["x"]\ninput = "cheap"\noutput = 2\n', ['model "x"', "input", "'cheap'"]),
        ('["x"]\ninput = -1\noutput = 2\n', ['model "x"', "zero or more"]),
        ('["x"]\ninput = true\noutput = 2\n', ['model "x"', "input"]),
        ('["x"]\ninput = nan\noutput = 2\n', ['model "x"', "input"]),
        ("x = 3\n", ['model "x"', "table"]),
        ("[gpt-4.1]\ninput = 1\noutput = 2\n", ['model "gpt-4"', '"1"', "quotes"]),
        ('["x"\ninput = 1\n', ["not valid TOML"]),
        # prices by the unit (images, minutes, characters) and by the kind of token
        ('["x"]\nper_minute = "cheap"\n', ['model "x"', "per_minute", "'cheap'"]),
        ('["x"]\nper_image = 0.04\n', ['model "x"', "per_image", "table of sizes"]),
        ('["x"]\nper_image = { "1024x1024" = -1 }\n', ['model "x"', '"1024x1024"', "zero or more"]),
        ('["x"]\nper_minute = 0.006\ncached_input = 1\n', ['model "x"', '"cached_input" without input and output']),
        ('["x"]\ninput = 1\noutput = 2\naudio_input = -3\n', ['model "x"', "audio_input", "zero or more"]),
        ('["x"]\ncached_input = 1\n', ['model "x"', 'lacks "input"']),
    ],
)
def test_malformed_files_are_refused_with_the_file_and_the_problem(tmp_path: Path, content, words):
    path = tmp_path / "prices.toml"
    path.write_text(content)
    with pytest.raises(PriceFileError) as raised:
        load_prices(path)
    message = str(raised.value)
    assert str(path) in message and all(word in message for word in words), message
    assert "\n" not in message and message.endswith(".")


def test_a_missing_or_unreadable_file(tmp_path: Path):
    with pytest.raises(PriceFileError, match="does not exist"):
        load_prices(tmp_path / "nope.toml")
    with pytest.raises(PriceFileError, match="cannot be read"):
        load_prices(tmp_path)  # a directory


PRICED = PriceTable(
    {
        "gpt-5": Price(1.25, 10.00, cached_input=0.125),
        "gpt-realtime": Price(4.00, 16.00, cached_input=0.40, audio_input=32.00, audio_output=64.00),
        "gpt-image-1": Price(5.00, 40.00, image_input=10.00),
        "dall-e-3": Price(per_image={"standard 1024x1024": 0.04, "hd 1024x1024": 0.08, "1792x1024": 0.12}),
        "whisper-1": Price(per_minute=0.006),
        "tts-1": Price(per_million_characters=15.00),
    }
)


@pytest.mark.parametrize(
    "model, usage, cost",
    [
        ("gpt-5", Usage(1000, 100), (1000 * 1.25 + 100 * 10) / 1e6),
        ("gpt-5", Usage(1000, 100, cached_tokens=400), (600 * 1.25 + 400 * 0.125 + 100 * 10) / 1e6),
        ("gpt-5", Usage(1000, 100, reasoning_tokens=60), (1000 * 1.25 + 100 * 10) / 1e6),  # reasoning is output
        (
            "gpt-realtime",  # 50 text + 150 audio in, 64 of the audio cached; 20 text + 80 audio out
            Usage(200, 100, cached_tokens=64, audio_input_tokens=150, cached_audio_tokens=64, audio_output_tokens=80),
            (50 * 4 + 64 * 0.40 + 86 * 32 + 20 * 16 + 80 * 64) / 1e6,
        ),
        ("gpt-image-1", Usage(30, 272, image_input_tokens=20), (10 * 5 + 20 * 10 + 272 * 40) / 1e6),
        ("dall-e-3", Usage(images=2, image_size="1024x1024", image_quality="hd"), 0.16),
        ("dall-e-3", Usage(images=1, image_size="1024x1024", image_quality="standard"), 0.04),
        ("dall-e-3", Usage(images=1, image_size="1792x1024", image_quality="standard"), 0.12),  # by size alone
        ("dall-e-3", Usage(images=1, image_size="256x256", image_quality="standard"), None),  # no such size
        ("whisper-1", Usage(audio_seconds=90), 0.009),
        ("tts-1", Usage(characters=2000), 0.03),
        ("tts-1", Usage(10, 10), None),  # priced by the character, not the token
        ("whisper-1", Usage(), None),
    ],
)
def test_cost_by_tokens_images_minutes_or_characters(model, usage, cost):
    result = PRICED.cost_of(model, usage)
    assert result == (pytest.approx(cost) if cost is not None else None)


def test_the_shipped_file_prices_images_audio_and_realtime():
    table = load_prices(ROOT / "prices.toml")
    assert table.cost_of("dall-e-3", Usage(images=1, image_size="1024x1792", image_quality="hd")) == 0.12
    assert table.cost_of("whisper-1", Usage(audio_seconds=60)) == pytest.approx(0.006)
    assert table.cost_of("tts-1", Usage(characters=1_000_000)) == pytest.approx(15.0)
    assert table.cost_of("gpt-4o-mini", Usage(1_000_000, 0, cached_tokens=1_000_000)) == pytest.approx(0.075)
    for model in ("gpt-image-1", "gpt-4o-transcribe", "gpt-realtime", "gpt-4o-realtime-preview-2024-12-17"):
        assert table.price_of(model) is not None, model
