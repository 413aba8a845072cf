"""ShapeWorld, the embedded world (spec environment.md): captions and their splits (``prompts``), the
renderer and latent codec (``render``), the tokenizer (``text``), and the training of its own teacher and tiny
CLIP (``train_teacher``, ``train_clip``); ``assets/`` holds the shipped weights.

Layer 0: a self-contained world, importing nothing of ``rtdmd_ray`` outside this folder, and no Ray. The
backbone that wraps its teacher is ``models/shapes.py``, its scorer ``rewards/shapes_geneval.py``, its
evaluation ``eval/shapes.py``.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # the shipped teacher, tiny CLIP and adapters
