"""The HTTP API's own description, served where its clients are: ``GET /openapi.yaml``
and ``GET /openapi.json`` on the submission listener, without authentication.

The document is ``openapi.yaml`` beside this module (package data; ``docs/openapi.yaml``
links to it), so what a relay serves is the contract of the code it runs, never a copy
that drifted.  It is read and converted to JSON once, when the listener is built: a
broken document stops startup rather than the first client that asks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import yaml

#: RFC 9512 registers application/yaml; JSON is RFC 8259's.
YAML_TYPE = b"application/yaml"
JSON_TYPE = b"application/json"


@dataclass(frozen=True)
class Representation:
    content_type: bytes
    body: bytes


@dataclass(frozen=True)
class OpenAPIDocument:
    """The document in both forms, by the last path segment that serves each."""

    representations: dict[bytes, Representation]

    @classmethod
    def load(cls) -> OpenAPIDocument:
        text = resources.files(__package__).joinpath("openapi.yaml").read_bytes()
        document = yaml.safe_load(text)
        as_json = json.dumps(document, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"
        return cls({b"openapi.yaml": Representation(YAML_TYPE, text),
                    b"openapi.json": Representation(JSON_TYPE, as_json)})

    def get(self, segment: bytes) -> Representation | None:
        return self.representations.get(segment)


__all__ = ["OpenAPIDocument", "Representation"]
