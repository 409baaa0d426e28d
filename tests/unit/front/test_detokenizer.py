"""Incremental detokenization and stop strings."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.front.text.detokenizer import IncrementalDetokenizer

VOCAB = 49152


def stream(tokenizer, ids, chunks=1, **options):
    """Feed ids `chunks` at a time; return the pieces and the detokenizer."""
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, **options)
    pieces = [detok.push(ids[i : i + chunks]) for i in range(0, len(ids), chunks)]
    pieces.append(detok.finish())
    return pieces, detok


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, VOCAB - 1), max_size=40), chunks=st.integers(1, 5))
def test_streaming_decode_equals_one_shot_decode(tokenizer, ids, chunks):
    """For any id sequence, the streamed text joins to exactly the one-shot decode (less a
    character that the last token left incomplete, which would only show as U+FFFD)."""
    pieces, _ = stream(tokenizer, ids, chunks)
    assert "".join(pieces) == tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("ab é世界🎉\n")), max_size=30))
def test_streaming_real_text_one_token_at_a_time(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_multibyte_character_split_over_tokens_is_held_until_complete(tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    pieces, _ = stream(tokenizer, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and "".join(pieces) == "🎉"


def test_character_cut_off_by_the_last_token_is_dropped(tokenizer):
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)
    pieces, _ = stream(tokenizer, ids[:-1], chunks=len(ids))
    assert "".join(pieces) == "ok "


def test_stop_string_ends_the_text_before_it(tokenizer):
    ids = tokenizer.encode("The capital of France is Paris. It is big.", add_special_tokens=False)
    pieces, detok = stream(tokenizer, ids, stop=["Paris"])
    assert "".join(pieces) == "The capital of France is "
    assert detok.stop_reason == "Paris"


def test_stop_string_can_be_kept(tokenizer):
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    pieces, _ = stream(tokenizer, ids, stop=["three"], include_stop_str_in_output=True)
    assert "".join(pieces) == "one two three"


def test_stop_string_spanning_tokens_is_never_shown_in_part(tokenizer):
    ids = tokenizer.encode("abc Supercalifragilistic xyz", add_special_tokens=False)
    pieces, _ = stream(tokenizer, ids, stop=["Supercalifragilistic"])
    assert all("Super" not in piece for piece in pieces)
    assert "".join(pieces) == "abc "


def test_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer.encode("alpha beta gamma delta", add_special_tokens=False)
    pieces, detok = stream(tokenizer, ids, chunks=10, stop=["delta", "beta"])
    assert "".join(pieces) == "alpha " and detok.stop_reason == "beta"


def test_token_count_stops_at_the_token_that_completed_the_stop(tokenizer):
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)
    upto = tokenizer.encode("one two three", add_special_tokens=False)
    _, detok = stream(tokenizer, ids, chunks=len(ids), stop=["three"])
    assert detok.token_count == len(upto)


def test_special_tokens_are_skipped_unless_asked(tokenizer):
    ids = tokenizer.encode("Hi", add_special_tokens=False) + [2]  # 2 is <|im_end|>
    assert "".join(stream(tokenizer, ids)[0]) == "Hi"
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False)[0]) == "Hi<|im_end|>"


def test_stop_strings_wait_for_min_tokens(tokenizer):
    """As vLLM: no stop string ends the text before `min_tokens` tokens are out, and one counts
    only where it ends in the text of the tokens after them."""
    ids = tokenizer.encode("one, two, three, four, five", add_special_tokens=False)
    first_comma = next(i for i in range(len(ids)) if "," in tokenizer.decode(ids[: i + 1]))
    pieces, early = stream(tokenizer, ids, stop=[","])
    assert "".join(pieces) == "one" and early.token_count == first_comma + 1
    pieces, held = stream(tokenizer, ids, chunks=3, stop=[","], min_tokens=first_comma + 1)
    assert "".join(pieces) == "one, two" and held.stop_reason == ","
    pieces, never = stream(tokenizer, ids, stop=[","], min_tokens=len(ids))
    assert "".join(pieces) == "one, two, three, four, five" and never.stop_reason is None
