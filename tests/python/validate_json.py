"""Validates a JSON document against a JSON Schema (draft 2020-12).

    python validate_json.py SCHEMA DOCUMENT

Exits non-zero naming the first error's path and message."""
import json
import sys

import jsonschema


def main() -> None:
    schema_path, doc_path = sys.argv[1:3]
    with open(schema_path, encoding="utf-8") as f:
        schema = json.load(f)
    with open(doc_path, encoding="utf-8") as f:
        doc = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        for e in errors[:5]:
            print(f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}", file=sys.stderr)
        sys.exit(1)
    print("valid")


if __name__ == "__main__":
    main()
