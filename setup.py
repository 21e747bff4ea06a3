from setuptools import find_packages, setup

setup(
    name="ldm-sce",
    version="0.1.0",
    description="Stable Diffusion in the CompVis layout with SCEdit (skip connection editing) in the UNet",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ldm_sce", "ldm_sce.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "einops",
        "open_clip_torch>=2.20",  # its BPE tokenizer (ships the vocabulary) for both text encoders
        "safetensors>=0.4",
        "opencv-python-headless",  # Canny edges and colour maps for controllers, as the official annotators
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        # diffusers/transformers are test-only oracles: independent implementations to compare against;
        # peft is the LoRA baseline of tools/bench.py, whose every subcommand a test runs
        "test": [
            "pytest>=7",
            "diffusers>=0.30",
            "transformers>=4.40",
            "peft>=0.10",
            "ruff>=0.5",
            "hypothesis>=6",
            "matplotlib>=3.5",
            "playwright>=1.40",  # drives Debian's chromium in the web UI's browser tests (no browser download)
        ],
        # tools/webui.py: gradio, the field's standard for model web UIs (A1111, scepter Studio, ComfyUI's
        # peers); 6.x for launch(theme=...) and gr.Timer
        "ui": ["gradio>=6,<7"],
        # tools/analyze_skips.py: its plots (matplotlib, the field's standard plotting library)
        "analysis": ["matplotlib>=3.5"],
        # tools/bench.py train: peft's LoRA on diffusers' UNet, the baseline users would actually run
        "bench": ["diffusers>=0.30", "transformers>=4.40", "peft>=0.10"],
    },
)
