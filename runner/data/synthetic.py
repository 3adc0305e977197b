"""A small synthetic dataset in MedPix-VQA's schema (`image_id` image, `question`, `answer`).

Tests and the demo train on this without a dataset hub. Images are real PNGs of
varied sizes and aspect ratios (tiny, tall, wide, large) so every resize and patch path of the Gemma4
image processor runs. Answers are a function of what is drawn (shape → finding, position → location,
colour → modality), so even a tiny model's loss can fall in a demo.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from runner.errors import UserError

FINDINGS = {
    "circle": "a round cystic lesion",
    "square": "a calcified nodule",
    "triangle": "a wedge-shaped infarct",
}
MODALITIES = {(200, 60, 60): "CT", (60, 180, 80): "MRI", (70, 90, 210): "X-ray"}
QUESTIONS = {
    "finding": ["What abnormality is shown in this image?", "What is the main finding?"],
    "location": ["Where is the lesion located?", "In which region is the abnormality?"],
    "modality": ["Which imaging modality was used?", "What kind of scan is this?"],
}
# (height, width): tiny, tall, wide, square, large, mildly oblong — resized up, down and across ratios.
SIZES = [(40, 56), (512, 150), (140, 600), (256, 256), (768, 1024), (300, 420)]


def _draw(rng: random.Random, height: int, width: int) -> tuple[Image.Image, str, str, str]:
    """One scan-like image: smooth gray background, a body outline, one coloured shape."""
    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse([width * 0.05, height * 0.05, width * 0.95, height * 0.95], outline=(180, 180, 180), width=2)
    shape = rng.choice(list(FINDINGS))
    color = rng.choice(list(MODALITIES))
    upper, left = rng.random() < 0.5, rng.random() < 0.5
    cx = width * (0.3 if left else 0.7)
    cy = height * (0.3 if upper else 0.7)
    r = max(3.0, min(width, height) * 0.15)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    region = f"{'upper' if upper else 'lower'} {'left' if left else 'right'}"
    return img.filter(ImageFilter.SMOOTH), shape, region, MODALITIES[color]


def _row(rng: random.Random) -> dict:
    """One MedPix-shaped row: PNG bytes plus a question whose answer the picture determines."""
    height, width = rng.choice(SIZES)
    jitter = rng.uniform(0.9, 1.1)
    img, shape, region, modality = _draw(rng, max(8, int(height * jitter)), max(8, int(width * jitter)))
    kind = rng.choice(list(QUESTIONS))
    answer = {
        "finding": f"The image shows {FINDINGS[shape]}.",
        "location": f"The lesion is in the {region} region.",
        "modality": f"This is a {modality} image.",
    }[kind]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"image_id": {"bytes": buf.getvalue(), "path": None}, "question": rng.choice(QUESTIONS[kind]), "answer": answer}


def make_data(out_dir: str | Path, n: int, seed: int = 0) -> Path:
    """Write `n` train rows and max(1, n // 10) validation rows as parquet under `out_dir/data/`.

    The `train-*.parquet` / `validation-*.parquet` names let `datasets.load_dataset(out_dir)` find
    both splits, exactly as it would for the hub copy of MedPix-VQA.
    """
    from datasets import Dataset, Features, Image as ImageFeature, Value

    if n < 1:
        raise UserError(f"make-data: --n must be at least 1, got {n}")
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    features = Features({"image_id": ImageFeature(), "question": Value("string"), "answer": Value("string")})
    rng = random.Random(seed)
    for split, count in (("train", n), ("validation", max(1, n // 10))):
        rows = [_row(rng) for _ in range(count)]
        columns = {key: [row[key] for row in rows] for key in features}
        Dataset.from_dict(columns, features=features).to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    return out
