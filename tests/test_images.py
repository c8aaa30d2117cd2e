"""Tests for images.py: what preparation, caption.py and the web page share when they read a photo (colour
profiles, files that are not regular files). The decoding of odd and broken images is tested through
create_input_files in test_create_input_files.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_images_is_a_module_not_a_script_and_loads_no_preparation_machinery():
    """Issue 19: inference reads photos without importing the preparation script, its pool or HDF5."""
    code = "import sys, images\nprint(sorted({'create_input_files', 'h5py', 'torch', 'tqdm'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
