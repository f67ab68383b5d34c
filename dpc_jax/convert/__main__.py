"""Convert a CLIP checkpoint once into dpc_jax's format.

    python -m dpc_jax.convert SOURCE OUT_DIR [--tokenizer DIR_OR_HUB_ID]

SOURCE: an OpenAI model name ("ViT-B/16"), an OpenAI .pt file, a Hugging Face directory or hub
id, or a dpc_jax checkpoint. Training then loads OUT_DIR with `load_clip(OUT_DIR)`.
"""

from __future__ import annotations

import argparse
import sys

from dpc_jax import cli
from dpc_jax.convert.load import convert_checkpoint, resolve_source


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpc_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="OpenAI name/.pt file, HF directory/hub id, or dpc_jax dir")
    parser.add_argument("out_dir", help="directory to write the dpc_jax checkpoint to")
    parser.add_argument("--tokenizer", default=None,
                        help="directory or hub id whose tokenizer files are copied to OUT_DIR")
    args = parser.parse_args(argv)
    try:
        if resolve_source(args.source)[0] == "openai_name":
            # Before a download of hundreds of MB that torch would then be needed to read (a
            # .pt file is read first thing: its missing torch is reported there).
            cli.require_extra("torch", f"reading OpenAI's CLIP {args.source!r}")
        summary = convert_checkpoint(args.source, args.out_dir, tokenizer=args.tokenizer)
    except (OSError, ValueError) as e:  # a wrong source or file: the message says what and why
        parser.exit(2, f"Error: {e}\n")
    except ModuleNotFoundError as e:  # a PyTorch file without torch installed
        text = cli.missing_extra(e)
        if text is None or cli.show_tracebacks():
            raise
        parser.exit(2, f"Error: {text}\n")
    cfg = summary["config"]
    print(f"converted {summary['source']} ({summary['kind']}) -> {summary['out_dir']}")
    print(f"  ViT: width {cfg['vision_width']}, {cfg['vision_layers']} layers, patch "
          f"{cfg['vision_patch_size']}, resolution {cfg['image_resolution']}; text: width "
          f"{cfg['transformer_width']}, {cfg['transformer_layers']} layers, "
          f"{cfg['transformer_heads']} heads, vocab {cfg['vocab_size']}; embed {cfg['embed_dim']}")
    print(f"  parameters: {summary['n_params']:,}")
    if summary["tokenizer_files"]:
        print(f"  tokenizer: {summary['tokenizer_files']} from {summary['tokenizer_from']}")
    else:
        print("  tokenizer: none copied (pass --tokenizer DIR_OR_HUB_ID to add one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
