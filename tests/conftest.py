import os
import sys

import torch

# Tests import the flat top-level modules (tft2v.py, unet3d.py, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))
