"""Checks that distillery tokenizes as llama.cpp does with the tokenizer a GGUF file carries:
the same ~100 kB of mixed prose, digits, code and non-ASCII text (scripts/mixed_text.py)
through `distillery tokenizer encode` and through llama.cpp (llama-cpp-python, vocab only).

Besides the file's own tokenizer, it checks vocabulary-only copies of the file with each other
pre-tokenizer distillery reads (gpt-2, llama-bpe, qwen2, default) and a SentencePiece (`llama`)
vocabulary trained here with the sentencepiece package: same ids, or the first difference.

    pip install llama-cpp-python gguf sentencepiece
    scripts/fetch-smollm2.sh
    python3 scripts/check_gguf_tokenizer.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from gguf_fields import copy_fields

ROOT = Path(__file__).resolve().parent.parent


def distillery_ids(binary, gguf_path, text_path):
    result = subprocess.run(
        [binary, "tokenizer", "encode", "--tokenizer", str(gguf_path), "--file", str(text_path)],
        check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


def llama_cpp_ids(gguf_path, text):
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    # Special tokens written in the text are parsed, as Hugging Face tokenizers (and so
    # distillery) always parse them.
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def compare(name, ours, theirs, text_bytes):
    if ours == theirs:
        print(f"{name}: identical, {len(ours)} tokens of {text_bytes} bytes")
        return True
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    print(f"{name}: DIFFERENT at token {first} of {len(ours)} (distillery) / {len(theirs)} "
          f"(llama.cpp): distillery {ours[first:first + 8]}, llama.cpp {theirs[first:first + 8]}")
    return False


def copy_with(source, out, changes, drop=()):
    """A vocabulary-only copy of `source` with metadata `changes` (key -> (type, value)) and
    without the keys in `drop`."""
    import gguf
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    copy_fields(reader, writer, lambda key: key not in ("general.architecture", "general.alignment")
                and key not in changes and key not in drop)
    for key, (kind, value) in changes.items():
        if kind == gguf.GGUFValueType.ARRAY:
            sub_type = gguf.GGUFValueType.get_type(value[0]) if not isinstance(value[0], float) \
                else gguf.GGUFValueType.FLOAT32
            if isinstance(value[0], int) and key.endswith("token_type"):
                sub_type = gguf.GGUFValueType.INT32
            writer.add_key_value(key, value, kind, sub_type=sub_type)
        else:
            writer.add_key_value(key, value, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def sentencepiece_vocabulary(work, text):
    """A byte-fallback SentencePiece BPE model trained on Shakespeare and the sample's scripts,
    as llama.cpp's converter writes it: pieces, scores and token types."""
    import gguf
    import sentencepiece as spm
    corpus = work / "spm-corpus.txt"
    corpus.write_text((ROOT / "datasets/tinyshakespeare.txt").read_text()[:400_000] + text[:30_000])
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(work / "spm"), vocab_size=4000, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    processor = spm.SentencePieceProcessor(model_file=str(work / "spm.model"))
    tokens, scores, types = [], [], []
    for piece_id in range(processor.vocab_size()):
        tokens.append(processor.id_to_piece(piece_id))
        scores.append(float(processor.get_score(piece_id)))
        if processor.is_unknown(piece_id):
            types.append(2)
        elif processor.is_control(piece_id):
            types.append(3)
        elif processor.is_unused(piece_id):
            types.append(5)
        elif processor.is_byte(piece_id):
            types.append(6)
        else:
            types.append(1)
    array = gguf.GGUFValueType.ARRAY
    return {
        "tokenizer.ggml.model": (gguf.GGUFValueType.STRING, "llama"),
        "tokenizer.ggml.tokens": (array, tokens),
        "tokenizer.ggml.scores": (array, scores),
        "tokenizer.ggml.token_type": (array, types),
        "tokenizer.ggml.bos_token_id": (gguf.GGUFValueType.UINT32, processor.bos_id()),
        "tokenizer.ggml.eos_token_id": (gguf.GGUFValueType.UINT32, processor.eos_id()),
        "tokenizer.ggml.unknown_token_id": (gguf.GGUFValueType.UINT32, processor.unk_id()),
        "tokenizer.ggml.add_bos_token": (gguf.GGUFValueType.BOOL, False),
        "tokenizer.ggml.add_space_prefix": (gguf.GGUFValueType.BOOL, True),
        "llama.vocab_size": (gguf.GGUFValueType.UINT32, len(tokens)),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--distillery", default=str(ROOT / "target/release/distillery"))
    args = parser.parse_args()

    import gguf
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        text = subprocess.run([sys.executable, str(ROOT / "scripts/mixed_text.py")], check=True,
                              capture_output=True, text=True).stdout
        text_path = work / "mixed.txt"
        text_path.write_text(text)
        text_bytes = len(text.encode())

        files = [("file's own (" + str(gguf.GGUFReader(args.gguf).fields["tokenizer.ggml.pre"].contents()) + ")",
                  Path(args.gguf))]
        for pre in ["gpt-2", "llama-bpe", "qwen2", "default"]:
            path = work / f"pre-{pre}.gguf"
            copy_with(args.gguf, path, {"tokenizer.ggml.pre": (gguf.GGUFValueType.STRING, pre)})
            files.append((f"pre-tokenizer {pre}", path))
        spm_path = work / "sentencepiece.gguf"
        copy_with(args.gguf, spm_path, sentencepiece_vocabulary(work, text),
                  drop=("tokenizer.ggml.merges", "tokenizer.ggml.pre",
                        "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"))
        files.append(("SentencePiece (llama) vocabulary of 4,000 pieces", spm_path))

        all_same = True
        for name, path in files:
            ours = distillery_ids(args.distillery, path, text_path)
            theirs = llama_cpp_ids(path, text)
            all_same &= compare(name, ours, theirs, text_bytes)
        print("all identical" if all_same else "DIFFERENCES FOUND")
        sys.exit(0 if all_same else 1)


if __name__ == "__main__":
    main()
