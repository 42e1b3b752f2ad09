import sys
from pathlib import Path

# The repository's modules (models.py, checkpoint.py, diffusion/) live at the root, next to tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
