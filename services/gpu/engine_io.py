"""What goes into the vLLM engine and what comes out, in the contract's terms.

`vllm_sampling_params` turns a `GenerateRequest`'s sampling parameters into vLLM's `SamplingParams`
(no detokenizing, DELTA outputs); `to_deltas` turns each `RequestOutput` back into `GenerateDelta`
frames, one per choice that moved. Token ids only: no text crosses here.
"""

from __future__ import annotations

from services.protocol import GenerateDelta, GenerateRequest, TokenLogprobs


def vllm_sampling_params(request: GenerateRequest):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    fields = request.sampling_params.model_dump()
    if (grammar := request.sampling_params.structured_outputs) is not None:
        from vllm.sampling_params import StructuredOutputsParams

        fields["structured_outputs"] = StructuredOutputsParams(**grammar.engine_fields())
    return SamplingParams(
        **fields,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        skip_clone=True,  # made fresh for each request, as vLLM's server marks its own: no deep copy (~40 us)
    )


def to_deltas(output, prompt_tokens: int, completed: dict[int, int]) -> list[GenerateDelta]:
    """A vLLM RequestOutput (DELTA kind) as frames, one per choice that moved."""
    deltas = []
    for choice in output.outputs:
        completed[choice.index] = completed.get(choice.index, 0) + len(choice.token_ids)
        logprobs = None
        if choice.logprobs is not None:
            logprobs = [
                TokenLogprobs(
                    logprob=candidates[token_id].logprob,
                    top=sorted(
                        ((candidate, entry.logprob) for candidate, entry in candidates.items()),
                        key=lambda pair: -pair[1],
                    ),
                )
                for token_id, candidates in zip(choice.token_ids, choice.logprobs)
            ]
        deltas.append(
            GenerateDelta(
                index=choice.index,
                token_ids=list(choice.token_ids),
                logprobs=logprobs,
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason if isinstance(choice.stop_reason, int) else None,
                prompt_tokens=prompt_tokens,
                completion_tokens=completed[choice.index],
            )
        )
    return deltas
