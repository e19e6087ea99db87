"""Usage as each endpoint words it, read into one shape; what requests say when answers say nothing."""

from __future__ import annotations

import pytest

from core.metering import Usage, request_usage, summed, usage_of


@pytest.mark.parametrize(
    "usage, expected",
    [
        (  # chat completions
            {
                "prompt_tokens": 20,
                "completion_tokens": 9,
                "total_tokens": 29,
                "prompt_tokens_details": {"cached_tokens": 8, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 3},
            },
            Usage(20, 9, 29, cached_tokens=8, reasoning_tokens=3, audio_input_tokens=0),
        ),
        (  # the Responses API
            {
                "input_tokens": 13,
                "input_tokens_details": {"cached_tokens": 3},
                "output_tokens": 15,
                "output_tokens_details": {"reasoning_tokens": 4},
                "total_tokens": 28,
            },
            Usage(13, 15, 28, cached_tokens=3, reasoning_tokens=4),
        ),
        (  # Realtime's response.done: audio and cached audio apart
            {
                "total_tokens": 300,
                "input_tokens": 200,
                "output_tokens": 100,
                "input_token_details": {
                    "cached_tokens": 64,
                    "text_tokens": 50,
                    "audio_tokens": 150,
                    "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 64},
                },
                "output_token_details": {"text_tokens": 20, "audio_tokens": 80},
            },
            Usage(200, 100, 300, 64, None, 150, 64, 80),
        ),
        ({"type": "duration", "seconds": 42}, Usage(audio_seconds=42.0)),  # Whisper
        ({"prompt_tokens": 5, "total_tokens": 5}, Usage(5, None, 5)),  # embeddings
        ({"input_tokens": 5, "output_tokens": 7}, Usage(5, 7, 12)),  # no total given: the sum
        ({"prompt_tokens": -1, "completion_tokens": True}, Usage()),  # nonsense is not a count
        ({"type": "duration", "seconds": "long"}, Usage()),
        (None, Usage()),
        ([1, 2], Usage()),
    ],
)
def test_each_endpoints_usage_reads_into_one_shape(usage, expected):
    assert usage_of(usage) == expected


def test_a_sessions_usage_is_the_sum_of_its_responses():
    one = usage_of({"input_tokens": 10, "output_tokens": 5, "input_token_details": {"audio_tokens": 4}})
    two = usage_of({"input_tokens": 20, "output_tokens": 1})
    assert summed([one, two]) == Usage(30, 6, 36, audio_input_tokens=4)
    assert summed([]) == Usage()


@pytest.mark.parametrize(
    "path, request_body, response, expected",
    [
        ("/v1/audio/speech", {"model": "tts-1", "input": "Hello there"}, None, Usage(characters=11)),
        (
            "/v1/images/generations",
            {"model": "dall-e-3", "size": "1792x1024", "quality": "hd"},
            {"data": [{"url": "u"}, {"url": "v"}]},
            Usage(images=2, image_size="1792x1024", image_quality="hd"),
        ),
        (
            "/v1/images/generations",
            {"model": "dall-e-2"},
            {"data": [{"url": "u"}]},
            Usage(images=1, image_size="1024x1024", image_quality="standard"),
        ),
        ("/v1/chat/completions", {"model": "gpt-4o"}, {"choices": []}, Usage()),
    ],
)
def test_answers_without_usage_are_metered_from_the_request(path, request_body, response, expected):
    assert request_usage(path, request_body, response) == expected
