"""Version of the DrafterService session protocol (Open/Commit/Candidates semantics).

Bump it when the meaning of a message changes in a way field numbers cannot express
(e.g. what `accepted_length` counts); a drafter rejects an Open whose version differs
with FAILED_PRECONDITION, and the verifier then decodes with k = 0.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
