"""The OpenAPI description of POST /v1/crop's body and answers, which FastAPI cannot derive (the
handler reads the body itself, multipart or JSON): `crop_body()`, given to the route as its
openapi_extra."""

from __future__ import annotations

from typing import Any

SUBJECT_DOC = ("The subject without a mask: auto (faces, else persons, else the salient region), face, person, "
               "saliency, X,Y (a focal point, px) or X1,Y1,X2,Y2 (a box, px); not a file path.")
KEEP_FACES_DOC = ("No crop cuts through a detected face [default: the server's loop.keep_faces; auto: on where "
                  "a face detector is installed].")


def crop_body() -> dict[str, Any]:
    """The form fields and JSON properties of an upload, and the answers; a new dict for each app."""
    return {
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "The image file."},
                    "task": {"type": "string", "enum": ["free", "subject", "ratio"],
                             "description": "Default: ratio if a ratio is given, subject if a mask is, else free."},
                    "ratio": {"type": "string", "example": "16:9",
                              "description": "W:H; several comma-separated give one crop each."},
                    "mask": {"type": "string", "format": "binary",
                             "description": "Subject mask (white on black) of the image's size."},
                    "id": {"type": "string", "description": "Your id; an index example of this id is not "
                                                            "retrieved."},
                    "subject": {"type": "string", "example": "auto", "description": SUBJECT_DOC},
                    "keep_faces": {"type": "boolean", "description": KEEP_FACES_DOC}}}},
            "application/json": {"schema": {
                "type": "object", "required": ["image"], "additionalProperties": False,
                "properties": {
                    "image": {"type": "string", "description": "The image file as base64 (or a base64 data URL)."},
                    "task": {"type": "string", "enum": ["free", "subject", "ratio"]},
                    "ratio": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                    "mask": {"type": "string", "description": "The mask image file as base64."},
                    "id": {"type": "string"},
                    "subject": {"type": "string", "description": SUBJECT_DOC},
                    "keep_faces": {"type": "boolean", "description": KEEP_FACES_DOC}}}},
        }},
        "responses": {
            "200": {"description": "A results.jsonl line (several ratios: {\"results\": [lines]}), "
                                   "or the cropped image with ?return=image",
                    "content": {"image/jpeg": {}, "image/png": {}}},
            "400": {"description": "Malformed request"}, "401": {"description": "Missing or wrong API key"},
            "413": {"description": "Upload over the limit"}, "415": {"description": "Unsupported content type"},
            "422": {"description": "Not a usable image, mask, ratio or task"},
            "503": {"description": "Queue full, engine loading or VLM server unreachable (Retry-After)"},
            "504": {"description": "The request took longer than the server's request timeout"},
        },
    }
