"""The contract between the tiers: validation of requests and the framing of the stream."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.protocol import DeltaDecoder, GenerateDelta, GenerateRequest, SamplingParams, TokenLogprobs, encode_frame

deltas = st.builds(
    GenerateDelta,
    index=st.integers(0, 3),
    token_ids=st.lists(st.integers(0, 49151), max_size=8),
    logprobs=st.none() | st.lists(st.builds(TokenLogprobs, logprob=st.floats(-50, 0), top=st.just([])), max_size=3),
    finish_reason=st.sampled_from([None, "stop", "length", "abort"]),
    completion_tokens=st.integers(0, 10_000),
)


@given(frames=st.lists(deltas, min_size=1, max_size=20), cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_frames_survive_any_transport_chunking(frames, cuts):
    """However the byte stream is cut into chunks, the receiver gets exactly the frames sent."""
    wire = "".join(encode_frame(frame) for frame in frames).encode()
    points = sorted({cut % (len(wire) + 1) for cut in cuts} | {0, len(wire)})
    decoder = DeltaDecoder()
    received = []
    for start, end in zip(points, points[1:]):
        received += decoder.feed(wire[start:end])
    assert received == frames
    assert not decoder.pending


def test_frames_are_ascii_lines():
    """Every frame is one ASCII line, so no character can be split between chunks."""
    frame = encode_frame(GenerateDelta(token_ids=[1, 2], finish_reason="stop", completion_tokens=2))
    assert frame.endswith("\n") and frame.count("\n") == 1 and frame.isascii()


def test_a_cut_frame_is_reported_pending():
    decoder = DeltaDecoder()
    assert decoder.feed(encode_frame(GenerateDelta(token_ids=[5]))[:-3]) == []
    assert decoder.pending


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 0},
        {"max_tokens": 10, "temperature": -0.5},
        {"max_tokens": 10, "top_p": 0},
        {"max_tokens": 10, "min_tokens": 11},
        {"max_tokens": 10, "repetition_penalty": float("inf")},
        {"max_tokens": 10, "logprobs": 21},
        {"max_tokens": 10, "unknown_field": 1},
    ],
)
def test_sampling_params_out_of_range_are_refused(fields):
    with pytest.raises(ValidationError):
        SamplingParams(**fields)


def test_request_needs_prompt_tokens():
    with pytest.raises(ValidationError):
        GenerateRequest(request_id="r", token_ids=[], sampling_params=SamplingParams(max_tokens=1))
