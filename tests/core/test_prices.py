"""Model prices: which entry a model name gets, what a request costs, and files refused with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ROOT
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
