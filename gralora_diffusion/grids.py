"""Labelled image grids and adapter labels, shared by generate, evaluate, compare, train's samples
and quickstart (rows and columns of equal-size images with their labels)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH = 192  # row labels (prompt, seed) left of the grid
HEADER_HEIGHT = 24  # at least, for the column labels (scale) above it
FONT_SIZE, LINE_HEIGHT = 12, 14


def adapter_label(source) -> str:
    """'runs/gralora/pytorch_gralora_weights.safetensors' -> 'gralora'; 'x/lora_r8.safetensors' -> 'lora_r8'."""
    path = Path(str(source))
    standard = path.suffix == ".safetensors" and path.name.startswith(("pytorch_", "adapter_model"))
    return (path.parent.name if standard and path.parent.name else path.stem if path.suffix else path.name) or str(source)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    # Words joined by two spaces: PIL's default font draws a space 2 px wide, which runs words together.
    lines, line = [], ""
    for word in text.split():
        trial = f"{line}  {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines


def labelled_grid(images: list[list[Image.Image]], row_labels: list[str], column_labels: list[str]) -> Image.Image:
    """Rows x columns of equal-size images, a label column on the left and a header row on top
    (labels wrapped to their cell: a long column label takes more lines, not its neighbour's space)."""
    w, h = images[0][0].size
    font = ImageFont.load_default(size=FONT_SIZE)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    headers = [_wrap(draw, label, font, w - 6) for label in column_labels]
    header_height = max(HEADER_HEIGHT, 8 + LINE_HEIGHT * max((len(lines) for lines in headers), default=1))
    grid = Image.new("RGB", (LABEL_WIDTH + w * len(column_labels), header_height + h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(headers):
        for i, line in enumerate(lines):
            draw.text((LABEL_WIDTH + c * w + 3, 4 + LINE_HEIGHT * i), line, fill="black", font=font)
    for r, (row, label) in enumerate(zip(images, row_labels)):
        lines = _wrap(draw, label, font, LABEL_WIDTH - 8)[: max(1, (h - 4) // LINE_HEIGHT)]
        for i, line in enumerate(lines):
            draw.text((4, header_height + r * h + 4 + LINE_HEIGHT * i), line, fill="black", font=font)
        for c, image in enumerate(row):
            grid.paste(image, (LABEL_WIDTH + c * w, header_height + r * h))
    return grid



def labelled_variant_grid(variants, prompts) -> Image.Image:
    """Rows prompts, columns variants (anything with `.name` and `.images[prompt][seed]`); each cell the
    seeds side by side (diffusers' make_image_grid)."""
    from diffusers.utils import make_image_grid

    cells = [[make_image_grid(v.images[r], rows=1, cols=len(v.images[r])) for v in variants] for r in range(len(prompts))]
    return labelled_grid(cells, list(prompts), [v.name for v in variants])
