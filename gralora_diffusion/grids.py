"""Labelled image grids and adapter labels, shared by generate, evaluate, compare, train's samples
and quickstart (rows and columns of equal-size images with their labels). A label never runs into its
neighbour: it wraps to its cell (a word wider than the cell is broken), and what still does not fit is
cut with "..."; then the grid carries the full labels, and `save_grid` writes them into a legend file
beside the image."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH = 192  # row labels (prompt, seed) left of the grid
HEADER_HEIGHT = 24  # at least, for the column labels (scale) above it
HEADER_LINES = 3  # a column label takes at most this many lines; longer ones are cut, full in the legend
FONT_SIZE, LINE_HEIGHT = 12, 14
ELLIPSIS = "..."  # three dots: PIL's default font may lack the one-glyph ellipsis
LEGEND_KEY = "gralora_legend"  # Image.info key holding the legend text when a label was cut


def adapter_label(source) -> str:
    """'runs/gralora/pytorch_gralora_weights.safetensors' -> 'gralora'; 'x/lora_r8.safetensors' -> 'lora_r8'."""
    path = Path(str(source))
    standard = path.suffix == ".safetensors" and path.name.startswith(("pytorch_", "adapter_model"))
    return (path.parent.name if standard and path.parent.name else path.stem if path.suffix else path.name) or str(source)


def fit_label(draw, text: str, font, width: int, max_lines: int) -> tuple[list[str], bool]:
    """`text` as lines no wider than `width`, at most `max_lines`; True when something was cut.
    Words are joined by two spaces: PIL's default font draws a space 2 px wide, which runs words together."""
    def fits(line):
        return draw.textlength(line, font=font) <= width

    lines, line = [], ""
    for word in text.split():
        trial = f"{line}  {word}" if line else word
        if fits(trial):
            line = trial
            continue
        if line:
            lines.append(line)
        while not fits(word) and len(word) > 1:  # a word wider than the cell: break it
            cut = max(1, max(n for n in range(1, len(word) + 1) if fits(word[:n]) or n == 1))
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if len(lines) <= max_lines:
        return lines, False
    last = lines[max_lines - 1]
    while last and not fits(last + ELLIPSIS):
        last = last[:-1]
    return lines[: max_lines - 1] + [last.rstrip() + ELLIPSIS], True


def labelled_grid(images: list[list[Image.Image]], row_labels: list[str], column_labels: list[str]) -> Image.Image:
    """Rows x columns of equal-size images with their labels; each label inside its own cell."""
    w, h = images[0][0].size
    font = ImageFont.load_default(size=FONT_SIZE)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    headers = [fit_label(draw, label, font, w - 6, HEADER_LINES) for label in column_labels]
    rows = [fit_label(draw, label, font, LABEL_WIDTH - 8, max(1, (h - 8) // LINE_HEIGHT)) for label in row_labels]
    header_height = max(HEADER_HEIGHT, 8 + LINE_HEIGHT * max((len(lines) for lines, _ in headers), default=1))
    grid = Image.new("RGB", (LABEL_WIDTH + w * len(column_labels), header_height + h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (lines, _) in enumerate(headers):
        for i, line in enumerate(lines):
            draw.text((LABEL_WIDTH + c * w + 3, 4 + LINE_HEIGHT * i), line, fill="black", font=font)
    for r, (row, (lines, _)) in enumerate(zip(images, rows)):
        for i, line in enumerate(lines):
            draw.text((4, header_height + r * h + 4 + LINE_HEIGHT * i), line, fill="black", font=font)
        for c, image in enumerate(row):
            grid.paste(image, (LABEL_WIDTH + c * w, header_height + r * h))
    if any(cut for _, cut in headers + rows):
        grid.info[LEGEND_KEY] = "\n".join(
            ["columns (left to right):", *(f"  {c + 1}. {label}" for c, label in enumerate(column_labels)),
             "rows (top to bottom):", *(f"  {r + 1}. {label}" for r, label in enumerate(row_labels))]) + "\n"
    return grid


def legend_path(grid_path) -> Path:
    grid_path = Path(grid_path)
    return grid_path.with_name(f"{grid_path.stem}_legend.txt")


def save_grid(grid: Image.Image, path) -> Path | None:
    """Save the grid; when a label had to be cut, its full labels go to `<name>_legend.txt` beside it
    (returned), and a legend left by an earlier grid of that name is removed."""
    from .atomic import atomic_write

    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))  # a stopped run leaves no half image
    legend = legend_path(path)
    if LEGEND_KEY in grid.info:
        atomic_write(legend, lambda tmp: Path(tmp).write_text(grid.info[LEGEND_KEY], encoding="utf-8"))
        return legend
    legend.unlink(missing_ok=True)
    return None


def labelled_variant_grid(variants, prompts) -> Image.Image:
    """Rows prompts, columns variants (anything with `.name` and `.images[prompt][seed]`); each cell the
    seeds side by side (diffusers' make_image_grid)."""
    from diffusers.utils import make_image_grid

    cells = [[make_image_grid(v.images[r], rows=1, cols=len(v.images[r])) for v in variants] for r in range(len(prompts))]
    return labelled_grid(cells, list(prompts), [v.name for v in variants])
