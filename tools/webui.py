"""The web UI: generate with SC-Tuners and CSC-Tuner controllers, train tuners, list and convert tuner files.
Needs the `ui` extra (`pip install -e ".[ui]"`: gradio).

    python tools/webui.py                          # http://127.0.0.1:7860 (this machine only)
    python tools/webui.py --host 0.0.0.0 --port 8000 --device cuda

Works offline on the embedded toy model (weights/toy-shapes.safetensors) and on any checkpoint in weights/.
Reads and writes only under --weights, --outputs and --data (relative to --root).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--root", default=".", help="the folder holding weights/, outputs/ and data/")
    p.add_argument("--weights", default="weights")
    p.add_argument("--outputs", default="outputs")
    p.add_argument("--data", default="data")
    args = p.parse_args()
    try:
        from ldm_sce.ui.app import launch
    except ImportError as e:
        sys.exit(f'webui.py: error: the web UI needs gradio ({e}); install it with: pip install -e ".[ui]"')
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    launch(args.root, args.host, args.port, device, args.weights, args.outputs, args.data)


if __name__ == "__main__":
    main()
