#!/usr/bin/env python3
"""Convert a Llama-family model (llama2.c .bin, Hugging Face folder or GGUF) to a Hugging Face
folder or a GGUF file.

    python tools/convert_model.py ../shared/models/stories260K/stories260K.bin --to hf out/stories-hf
    python tools/convert_model.py ../shared/models/stories260K --to gguf out/stories.gguf --type Q8_0

The tokenizer found with the model goes along: into the GGUF file's vocabulary, or (llama2.c's
tokenizer.bin) copied into the Hugging Face folder, where tpfed finds it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from tpfed.errors import TpfedError
from tpfed.model.formats import load_float_model
from tpfed.model.gguf_io import write_gguf
from tpfed.model.hf import save_hf
from tpfed.model.tokenizer import Tokenizer


def convert(src: Path, to: str, out: Path, tensor_type: str = "F32") -> Path:
    model = load_float_model(src)
    tok = model.tokenizer if isinstance(model.tokenizer, Tokenizer) else None
    if to == "gguf":
        return write_gguf(model.weights, out, tok, tensor_type=tensor_type)
    save_hf(model.weights, out)
    if tok is not None:
        folder = model.path if model.path.is_dir() else model.path.parent
        found = [folder / n for n in ("tokenizer.bin", "tok512.bin") if (folder / n).is_file()]
        if found:
            shutil.copy(found[0], out / "tokenizer.bin")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("--to", choices=("hf", "gguf"), required=True)
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", default="F32", choices=("F32", "F16", "Q8_0"), help="GGUF matrix type")
    args = ap.parse_args()
    try:
        print(convert(args.src, args.to, args.out, args.type))
    except TpfedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
