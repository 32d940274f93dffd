"""Verifies webhook deliveries with the Standard Webhooks reference library.

Reads JSON from stdin: {"secret": "whsec_...", "deliveries": [{"headers": {...}, "body": "..."}]}
Prints one line per delivery and exits 1 if any signature does not verify. A tampered
copy of each delivery must fail, so a verifier that accepts anything fails this check too.
"""

import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main() -> int:
    request = json.load(sys.stdin)
    hook = Webhook(request["secret"])
    failures = 0
    for i, d in enumerate(request["deliveries"]):
        try:
            payload = hook.verify(d["body"], d["headers"])
            print(f"{i}: verified seq={payload['seq']}")
        except WebhookVerificationError as e:
            failures += 1
            print(f"{i}: NOT VERIFIED: {e}")
        try:
            hook.verify(d["body"] + " ", d["headers"])
            failures += 1
            print(f"{i}: a tampered body verified")
        except WebhookVerificationError:
            pass
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
