"""A queue consumer: reads messages (one JSON object per stdin line), restores each message's
context with the SDK's ``extract`` and takes it only if ``current_routing_key()`` says it is meant
for this worker, answering one JSON line per message on stdout.

``VERSION`` is ``baseline`` or the key of the override this worker belongs to. A baseline worker
leaves messages whose key has its own override worker (``OVERRIDE_KEYS``, comma-separated) to that
worker, and takes the rest, as the shared stack does for keys with no override.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from opentelemetry.context import attach, detach

from propagation import current_routing_key, extract
from tests.e2e_services.common import report

VERSION = os.environ.get("VERSION", "baseline")
OVERRIDE_KEYS = frozenset(filter(None, os.environ.get("OVERRIDE_KEYS", "").split(",")))


def meant_for_me() -> bool:
    key = current_routing_key()
    if VERSION == "baseline":
        return key not in OVERRIDE_KEYS
    return key == VERSION


def consume(message: dict[str, Any]) -> dict[str, Any]:
    token = attach(extract(message.get("headers", {})))
    try:
        if not meant_for_me():
            return {"taken": False, "version": VERSION}
        return {"taken": True, **report({}), "body": message.get("body")}
    finally:
        detach(token)


def main() -> None:
    for line in sys.stdin:
        print(json.dumps(consume(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
