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


@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=12), with_logprobs=st.booleans(), data=st.data())
def test_consecutive_frames_of_a_choice_merge_into_one(sizes, with_logprobs, data):
    """What the front tier does with frames that queued up (services/front/llm_client.py): however they
    are grouped, the merged frame holds every token and logprob in order, and the last counts."""
    frames, produced = [], 0
    for i, size in enumerate(sizes):
        produced += size
        frames.append(GenerateDelta(
            index=1, token_ids=list(range(produced - size, produced)),
            logprobs=[TokenLogprobs(logprob=-float(t)) for t in range(produced - size, produced)] if with_logprobs else None,
            finish_reason="length" if i == len(sizes) - 1 else None, prompt_tokens=7, completion_tokens=produced,
        ))  # fmt: skip
    split = data.draw(st.integers(1, len(frames)))
    head = frames[0]
    for frame in frames[1:split]:
        head = head.followed_by(frame)
    merged = head
    for frame in frames[split:]:
        merged = merged.followed_by(frame)
    assert merged.token_ids == list(range(produced))
    assert merged.logprobs == ([TokenLogprobs(logprob=-float(t)) for t in range(produced)] if with_logprobs else None)
    assert (merged.index, merged.finish_reason, merged.prompt_tokens, merged.completion_tokens) == (1, "length", 7, produced)
    assert head.completion_tokens == sum(sizes[:split]) and head.finish_reason == (None if split < len(frames) else "length")
