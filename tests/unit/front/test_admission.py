"""The front door's budget of sequences in flight holds when many requests arrive at once.

The slot used to be counted only after the body was read, so requests whose bodies were still
arriving all passed the check together (a CI run saw the engine hold 5 requests against a front
cap of 4). Now the route charges its sequences in one step (check and take, no await between):
here the real middleware gets 10 requests whose bodies arrive late, against a budget of 4.
"""

from __future__ import annotations

import asyncio

from services.errors import RequestError
from services.front.admission import AdmissionMiddleware
from services.front.inflight import InflightRequest, SequenceBudget

CAP = 4


def test_requests_whose_bodies_are_still_arriving_cannot_pass_the_cap_together():
    running = {"now": 0, "peak": 0}
    release = asyncio.Event()

    async def generation_app(scope, receive, send):
        await receive()
        try:
            InflightRequest.current().admit(1)
        except RequestError as error:
            await send({"type": "http.response.start", "status": error.status, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        running["now"] += 1
        running["peak"] = max(running["peak"], running["now"])
        await release.wait()  # a stream that lasts until the test ends it
        running["now"] -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    budget = SequenceBudget(CAP, per_request=CAP)
    admission = AdmissionMiddleware(generation_app, max_body_bytes=4096, budget=budget, tier=None,
                                    timeout_s=30, max_streams_per_request=1)

    async def one_request() -> int:
        body_sent = False

        async def receive():
            nonlocal body_sent
            if body_sent:
                await asyncio.sleep(3600)  # the client stays until the response is complete
            body_sent = True
            await asyncio.sleep(0.05)  # the body comes in a later packet
            return {"type": "http.request", "body": b"{}", "more_body": False}

        status = []

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        scope = {"type": "http", "path": "/v1/chat/completions", "method": "POST", "headers": []}
        await admission(scope, receive, send)
        return status[0]

    async def main() -> list[int]:
        requests = [asyncio.create_task(one_request()) for _ in range(10)]
        # every request either runs or was refused before the running ones are let finish
        deadline = asyncio.get_running_loop().time() + 10
        while running["now"] + sum(task.done() for task in requests) < 10:
            assert asyncio.get_running_loop().time() < deadline, "requests neither ran nor were refused"
            await asyncio.sleep(0.01)
        release.set()
        return await asyncio.gather(*requests)

    statuses = asyncio.run(main())
    assert sorted(statuses) == [200] * CAP + [429] * (10 - CAP)
    assert running["peak"] == CAP
    assert budget.in_use == 0
