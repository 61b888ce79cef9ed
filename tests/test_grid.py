"""Grid labels never run into a neighbour's cell: wrapped, long words broken, the rest cut with '...',
and then the full labels in a legend file beside the grid."""

import numpy as np
import pytest
from PIL import Image

from gralora_diffusion.grids import HEADER_LINES, LABEL_WIDTH, labelled_grid, legend_path, save_grid

LONG = [
    "runs/gralora_r8_k2_with_a_very_long_adapter_folder_name 0.5",  # one long word, then a short one
    "lora-baseline-of-the-teapot-subject-trained-for-a-long-time 1",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z a b c d e f g h",  # many short words: too many lines
    "x" * 200,
    "short",
]


def _ink(image, box):
    return (np.asarray(image.crop(box).convert("L")) < 128).any()


@pytest.mark.parametrize("label", LONG)
@pytest.mark.parametrize("size", [32, 64])
def test_a_column_label_stays_in_its_cell(label, size):
    cells = [[Image.new("RGB", (size, size), "white")] * 3]
    grid = labelled_grid(cells, ["row"], [label, "", ""])  # only the first column is labelled
    header = grid.height - size
    assert _ink(grid, (LABEL_WIDTH, 0, LABEL_WIDTH + size, header))  # drawn
    assert not _ink(grid, (LABEL_WIDTH + size, 0, grid.width, header))  # nothing in the neighbours' cells
    assert header <= 8 + 14 * HEADER_LINES


@pytest.mark.parametrize("label", LONG)
def test_a_row_label_stays_in_its_row(label):
    size = 32
    cells = [[Image.new("RGB", (size, size), "white")]] * 2
    grid = labelled_grid(cells, [label, ""], ["col"])
    header = grid.height - 2 * size
    assert _ink(grid, (0, header, LABEL_WIDTH, header + size))
    assert not _ink(grid, (0, header + size, LABEL_WIDTH, grid.height))  # nothing in the row below
    assert not _ink(grid, (LABEL_WIDTH - 3, header, LABEL_WIDTH, grid.height))  # nor over the images


def test_cut_labels_get_a_legend_and_whole_ones_none(tmp_path):
    cells = [[Image.new("RGB", (64, 64), "white")] * 2]
    path = tmp_path / "grid.png"
    legend = save_grid(labelled_grid(cells, ["a photo of sks teapot (seed 0)"], [LONG[2], LONG[0]]), path)
    assert legend == legend_path(path) == tmp_path / "grid_legend.txt"
    text = legend.read_text()
    assert LONG[2] in text and LONG[0] in text and "a photo of sks teapot (seed 0)" in text
    assert save_grid(labelled_grid(cells, ["row"], ["scale 0", "scale 1"]), path) is None
    assert not legend.exists()  # an old legend does not outlive its grid
