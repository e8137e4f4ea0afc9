"""Copying metadata between GGUF files with the `gguf` package, for the scripts that write
test files."""

import gguf


def copy_fields(reader, writer, keep):
    """Copies every field of a `gguf.GGUFReader` whose key `keep` accepts into a
    `gguf.GGUFWriter`, with its value type."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not keep(key):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), kind)
